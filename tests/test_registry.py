"""Architecture registry: built-ins, runtime registration, and adapters from other packages."""

import json
import shutil
import textwrap

import pytest
import torch

from exl3_triton import UnsupportedArchitectureError
from exl3_triton.arch import registry
from exl3_triton.arch.llama import LlamaForCausalLM
from exl3_triton.model import load


def _clone_with_architecture(src, dst, arch: str):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = [arch]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_builtin_llama():
    assert registry.resolve("LlamaForCausalLM") is LlamaForCausalLM
    assert "LlamaForCausalLM" in registry.supported_architectures()


def test_every_registered_architecture_is_declared_by_its_class():
    for arch in registry.supported_architectures():
        assert arch in registry.resolve(arch).architectures


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as e:
        registry.resolve("NopeForCausalLM")
    assert "NopeForCausalLM" in str(e.value) and "LlamaForCausalLM" in str(e.value)


def test_runtime_registration(golden, tmp_path):
    class MyLlama(LlamaForCausalLM):
        architectures = ("MyLlamaForCausalLM",)

    registry.register("MyLlamaForCausalLM")(MyLlama)
    try:
        model = load(_clone_with_architecture(golden / "exl3" / "llama_k4_mcg", tmp_path / "m", "MyLlamaForCausalLM"))
        assert type(model.network) is MyLlama
    finally:
        registry.unregister("MyLlamaForCausalLM")
    with pytest.raises(UnsupportedArchitectureError):
        registry.resolve("MyLlamaForCausalLM")


def _install_fake_distribution(site, module_body: str, entry: str):
    """A package + .dist-info on a sys.path entry, as pip would leave it."""
    (site / "fakearch_plugin").mkdir(parents=True)
    (site / "fakearch_plugin" / "__init__.py").write_text(textwrap.dedent(module_body))
    dist = site / "fakearch_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakearch-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{entry}\n")


def test_adapter_from_an_installed_package_entry_point(golden, tmp_path, monkeypatch):
    site = tmp_path / "site"
    _install_fake_distribution(site, """
        from exl3_triton.arch.llama import LlamaForCausalLM

        class PluginLlama(LlamaForCausalLM):
            architectures = ("PluginLlamaForCausalLM",)
        """, "PluginLlamaForCausalLM = fakearch_plugin:PluginLlama")
    monkeypatch.syspath_prepend(str(site))
    assert "PluginLlamaForCausalLM" in registry.supported_architectures()

    src = golden / "exl3" / "llama_k4_mcg"
    model = load(_clone_with_architecture(src, tmp_path / "m", "PluginLlamaForCausalLM"))
    assert type(model.network).__name__ == "PluginLlama"
    ids = torch.arange(2, 20)
    torch.testing.assert_close(model.forward(ids), load(src).forward(ids), rtol=0, atol=0)


def test_broken_entry_point_is_reported(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _install_fake_distribution(site, "x = 1\n", "BrokenForCausalLM = fakearch_plugin:DoesNotExist")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(UnsupportedArchitectureError) as e:
        registry.resolve("BrokenForCausalLM")
    assert "fakearch_plugin:DoesNotExist" in str(e.value)
