"""Shared fixtures: the golden data directory and helpers that write tiny checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

# Without a GPU, Triton kernels run under Triton's interpreter. Switch it on before any test module
# imports Triton (transformers does, for the Gemma 4 tests): set later, the Triton-backend tests that
# follow such a module fail with "Cannot call @triton.jit'd outside of the scope of a kernel".
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Under pytest-xdist (.ci/run runs two workers on CI's two cores), each worker gets its share of the
# cores: torch's default of one thread per core in every worker would oversubscribe them, and a
# parallel op whose threads are not all running stalls (the converter's Viterbi already keeps to one
# thread for that reason).
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _XDIST_WORKERS))

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("EXL3_TRITON_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))
# CI sets this so that a missing golden directory fails instead of skipping.
REQUIRE_GOLDEN = os.environ.get("EXL3_TRITON_REQUIRE_GOLDEN") == "1"

GOLDEN_EXL3 = ["llama_k4_mcg", "llama_k3_mcg", "llama_k4_3inst", "llama_k25_mul1"]


@pytest.fixture(scope="session")
def golden() -> Path:
    if not GOLDEN_DIR.is_dir():
        if REQUIRE_GOLDEN:
            pytest.fail(f"golden data not found at {GOLDEN_DIR}")
        pytest.skip(f"golden data not found at {GOLDEN_DIR}")
    return GOLDEN_DIR


@pytest.fixture
def output_dir(request) -> Path:
    """A per-test folder under tests/output/ for artefacts worth looking at (screenshots, tables)."""
    path = REPO_ROOT / "tests" / "output" / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_checkpoint(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    config: dict | None = None,
    *,
    shards: int = 1,
    with_index: bool = True,
    quantization_config: dict | None = None,
) -> Path:
    """Write ``tensors`` as a model directory (optionally split into shards)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(config or {"architectures": ["LlamaForCausalLM"]})
    (directory / "config.json").write_text(json.dumps(config))
    if quantization_config is not None:
        (directory / "quantization_config.json").write_text(json.dumps(quantization_config))
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        save_file(part, str(directory / fname))
        weight_map.update({n: fname for n in part})
    if with_index:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def random_exl3_tensors(key: str, k: int, n: int, bits: float, codebook: str = "mcg",
                        bias: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """The stored tensors of one EXL3 linear with random trellis and scales."""
    g = torch.Generator().manual_seed(seed)
    words = int(16 * bits)
    out = {
        f"{key}.trellis": torch.randint(-32768, 32768, (k // 16, n // 16, words), generator=g, dtype=torch.int32).to(torch.int16),
        f"{key}.suh": (torch.randn(k, generator=g) * 0.05).half(),
        f"{key}.svh": (torch.randn(n, generator=g) * 0.05).half(),
    }
    if codebook == "mcg":
        out[f"{key}.mcg"] = torch.tensor(0xCBAC1FED - (1 << 32), dtype=torch.int32)
    elif codebook == "mul1":
        out[f"{key}.mul1"] = torch.tensor(0x83DCD12D - (1 << 32), dtype=torch.int32)
    if bias:
        out[f"{key}.bias"] = torch.randn(n, generator=g).half()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_exl3_weight(k: int, n: int, bits: float, codebook, *, bias: bool = False, seed: int = 0,
                       device: str = "cpu"):
    """An ``Exl3Weight`` with a random trellis (any bit pattern decodes) and realistic scales."""
    from exl3_triton.kernels.weights import Codebook, Exl3Weight

    g = torch.Generator().manual_seed(seed)
    words = int(16 * bits)
    trellis = torch.randint(-32768, 32768, (k // 16, n // 16, words), generator=g, dtype=torch.int32).to(torch.int16)
    suh = (torch.randn(k, generator=g) * 0.05).half()
    svh = (torch.randn(n, generator=g) * 0.05).half()
    b = torch.randn(n, generator=g).half() if bias else None
    w = Exl3Weight(trellis, suh, svh, bits, Codebook(codebook), bias=b, key=f"random_{k}x{n}_{bits}")
    return w.to(device)
