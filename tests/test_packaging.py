"""The distribution: one import package built from plugin/, arch/, kernels/, ui/."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

FOLDERS = {"plugin": "exl3_triton", "arch": "exl3_triton/arch", "kernels": "exl3_triton/kernels",
           "ui": "exl3_triton/ui"}


def _expected_wheel_paths() -> set[str]:
    paths = set()
    for folder, target in FOLDERS.items():
        for f in (REPO_ROOT / folder).rglob("*.py"):
            rel = f.relative_to(REPO_ROOT / folder).as_posix()
            if rel.split("/")[0] in FOLDERS.values() or "__pycache__" in rel:
                continue
            paths.add(f"{target}/{rel}")
    return paths


@pytest.mark.slow
def test_regular_install_from_wheel(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(REPO_ROOT)],
                   check=True, capture_output=True)
    wheel = next(wheel_dir.glob("exl3_triton-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"exl3_triton", next(t for t in top_level if t.endswith(".dist-info"))}
    missing = _expected_wheel_paths() - names
    assert not missing, f"source files missing from the wheel: {sorted(missing)}"
    bundled = {f"exl3_triton/ui/demo_model/{f.name}" for f in (REPO_ROOT / "ui" / "demo_model").iterdir()}
    assert bundled and bundled <= names, f"the demo's bundled model is missing from the wheel: {sorted(bundled - names)}"
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert re.search(r"exl3-triton\s*=\s*exl3_triton\.cli:main", entry_points)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = ("import exl3_triton, exl3_triton.kernels.reference, exl3_triton.arch.llama, exl3_triton.ui;"
            "print(exl3_triton.kernels.reference.__file__)")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert Path(out).is_relative_to(site)


def test_editable_install_maps_the_folders():
    import exl3_triton
    import exl3_triton.arch
    import exl3_triton.kernels
    import exl3_triton.ui

    # Whichever install is active, the modules must come from one consistent tree.
    root = Path(exl3_triton.__file__).parent
    if root == REPO_ROOT / "plugin":  # editable install of this checkout
        assert Path(exl3_triton.kernels.__file__).parent == REPO_ROOT / "kernels"
        assert Path(exl3_triton.arch.__file__).parent == REPO_ROOT / "arch"
        assert Path(exl3_triton.ui.__file__).parent == REPO_ROOT / "ui"
    else:
        assert Path(exl3_triton.kernels.__file__).parent == root / "kernels"


def test_ci_script_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2, "README must open with two command blocks (main job, tests)"
    test_command = blocks[1].strip().splitlines()[-1].strip()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert test_command in ci, f"README test command not found in .ci/run: {test_command}"
