"""Gemma 4's decode path with its fused Triton kernels (residual add + norms, head norms + RoPE +
cache store, GELU-tanh * up, logit softcap), run by Triton's interpreter on the CPU, against the
golden transformers logits: the same bound as the unfused path (tests/test_gemma4.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import exl3_triton
from exl3_triton import kernels
from exl3_triton.kernels import triton_ops

from .conftest import rel_err
from .runtime_helpers import cached_logits



@pytest.fixture
def fused_kernels_on_cpu(monkeypatch):
    """Route the CUDA-only fused paths to the Triton kernels on CPU tensors (interpreter); records
    which kernels ran."""
    ops = triton_ops.load()
    if ops is None:
        pytest.fail(f"Triton kernels unavailable: {triton_ops.unavailable_reason()}")
    ran = set()

    def cuda_kernel(x, module, name):
        fn = getattr(getattr(ops, module), name)

        def run(*args):
            ran.add(name)
            return fn(*args)
        return run

    plain_rope = kernels.rope_store_kv

    def rope_store_kv(q, k, v, *, positions, inv_freq, slot_mapping, k_cache, v_cache, scaling=1.0, tables=None,
                      norms=None, backend=None):
        if norms is None:
            return plain_rope(q, k, v, positions=positions, inv_freq=inv_freq, slot_mapping=slot_mapping,
                              k_cache=k_cache, v_cache=v_cache, scaling=scaling, tables=tables, backend=backend)
        ran.add("norm_rope_store_kv_triton")
        return ops.rope.norm_rope_store_kv_triton(q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache,
                                                  norms, scaling)

    monkeypatch.setattr(triton_ops, "cuda_kernel", cuda_kernel)
    monkeypatch.setattr(kernels, "rope_store_kv", rope_store_kv)
    return ran


ALL_FUSED = {"residual_norm_triton", "gated_activation_triton", "softcap_triton", "norm_rope_store_kv_triton"}


def _load(path):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors only without CUDA
    return exl3_triton.load(path, device=device, dtype=torch.float32)


def test_fused_decode_path_matches_transformers(golden, fused_kernels_on_cpu):
    """36 tokens (the window is 32: the sliding layers' rings wrap), 8 prefilled, 28 decode steps."""
    ref = load_file(str(golden / "hf" / "gemma4_hf_logits.safetensors"))
    ids = json.loads((golden / "hf" / "gemma4_ids.json").read_text())[:36]
    step = cached_logits(_load(golden / "hf" / "gemma4"), ids, chunks=[8]).cpu()
    assert fused_kernels_on_cpu == ALL_FUSED
    want = ref["logits"].reshape(-1, step.shape[-1])[:36]
    assert rel_err(step, want) < 1e-4
    assert torch.equal(step.argmax(-1), want.argmax(-1))


def test_fused_decode_path_of_the_moe_variant_matches_transformers(tmp_path, fused_kernels_on_cpu):
    """The MoE block's branch goes into the fused residual add after the MLP (window 9, 2.5 windows)."""
    from .hf_models import gemma4_model, hf_logits
    from .test_gemma4 import VARIANTS, _ids

    hf = gemma4_model(tmp_path / "m", **VARIANTS["moe"])
    ids = _ids(24, hf.config.get_text_config().vocab_size)
    step = cached_logits(_load(tmp_path / "m"), ids, chunks=[4], page_size=8).cpu()
    assert fused_kernels_on_cpu == ALL_FUSED
    assert rel_err(step, hf_logits(hf, ids)) < 1e-4
