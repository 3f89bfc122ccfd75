"""bench/count_ops.py counts the kernels a decode step launches (issue 8): checked on ops whose
kernel count is known by hand, then on the tiny synthetic OpenPanguV2's decode step."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import count_ops  # noqa: E402

from exl3_triton.arch.blocks.norm import RMSNorm  # noqa: E402


def _count(fn, gpu_like=True):
    modules = count_ops._ModuleStack()
    counter = count_ops.OpCounter(modules)
    fused = count_ops.gpu_fused_kernels(counter) if gpu_like else contextlib.nullcontext()
    with torch.inference_mode(), modules, fused, counter:
        fn()
    return [op for _, op in counter.ops]


def test_casts_that_change_nothing_and_views_launch_nothing_and_composites_decompose():
    x, w = torch.randn(2, 3, 4), torch.randn(3, 4, 5)
    assert _count(lambda: x.float().view(6, 4).t()) == []
    assert _count(lambda: x.half()) == ["aten._to_copy"]
    assert _count(lambda: torch.einsum("nhd,hdr->nhr", x, w)) == ["aten.bmm"]


def test_rms_norm_counts_as_the_cuda_fused_kernel_or_its_cpu_reference():
    norm = RMSNorm(torch.ones(8), 1e-5)
    x = torch.randn(2, 8, dtype=torch.float16)
    # half precision in or out: the Triton norm reads and writes the stored dtypes (no casts around it)
    assert _count(lambda: norm(x)) == ["triton.rms_norm"]
    assert _count(lambda: norm(x, torch.float32)) == ["triton.rms_norm"]
    # fp32 in and out: F.rms_norm, one kernel already
    assert _count(lambda: norm(x.float(), torch.float32)) == ["aten._to_copy", "fused.rms_norm"]
    assert _count(lambda: norm(x), gpu_like=False) == ["aten._to_copy", "aten.pow", "aten.mean", "aten.add",
                                                       "aten.rsqrt", "aten.mul", "aten.mul", "aten._to_copy"]


def test_a_fused_kernels_stand_in_counts_once_whatever_it_calls():
    counter = count_ops.OpCounter(count_ops._ModuleStack())
    inner = counter.opaque("fused.inner", lambda x: x * 2)
    outer = counter.opaque("fused.outer", lambda x: inner(x) + 1)
    x = torch.ones(2)
    with torch.inference_mode(), counter:
        y = outer(x)
        z = x * 3
    assert torch.equal(y, torch.full((2,), 3.0)) and torch.equal(z, y)
    assert [op for _, op in counter.ops] == ["fused.outer", "aten.mul"]


def _tiny_model(name: str):
    from synthetic import SyntheticCheckpoint

    from exl3_triton.model import load_checkpoint

    ckpt = SyntheticCheckpoint(name, bits=4, head_bits=4, device="cpu", dtype=torch.float16)
    return load_checkpoint(ckpt, device="cpu", dtype=torch.float16)


@pytest.fixture(scope="module")
def tiny_pangu():
    return _tiny_model("openpangu-tiny")


def _decode_step(model):
    """One counted decode step after a 20-token prefill: the summary, the layer names, ops by name."""
    res = count_ops.count_decode_step(model, batch=1, prefill_len=20)
    return res, [k for k in res["per_layer"] if k.startswith("layer")], res["per_op_outside_matmuls"]


def test_decode_step_counts_every_layer_and_the_fused_kernels(tiny_pangu):
    res, layers, ops = _decode_step(tiny_pangu)
    assert layers == ["layer0:dsa-dense-postnorm", "layer1:swa-moe", "layer2:swa-moe", "layer3:dsa-moe"]
    # per trunk layer: two mHC sites, each entered and left by one kernel, the first site's
    # projection one kernel of its own (the second's is fused into the first's exit);
    # three MoME convolutions in MLA
    assert ops["triton.mhc_site_partials"] == len(layers)
    assert ops["triton.mhc_site_enter"] == ops["triton.mhc_site_exit"] == 2 * len(layers)
    assert "triton.mhc_weights" not in ops
    # MLA: the MoME convs of the q latent (with its norm) and the output (each storing its input in its
    # ring), the key side (the latent's conv and norm, k_pe's rotation, the indexer key, the cache
    # stores) in one kernel
    assert ops["triton.mome_decode"] == 2 * len(layers)
    assert ops["triton.mla_store_keys"] == len(layers)
    assert "aten.index_put_" not in ops and "aten.index_copy_" not in ops
    # the norms that are not fused into other kernels read and write the stored dtypes: the two branch
    # output norms per layer, the final norm; F.rms_norm for the fp32 block post norm
    assert ops["triton.rms_norm"] == 2 * len(layers) + 1
    assert ops["fused.rms_norm"] == 2  # the block post norm (fp32 in and out) and the mHC merge's
    # MLA's decode kernels on every layer (the q prologue, split, merge with the w_uv product) and the
    # indexer's scores on the global (DSA) layers
    assert ops["triton.mla_q_prologue"] == ops["triton.mla_decode_split"] == len(layers)
    assert ops["triton.mla_decode_merge_out"] == len(layers)
    assert ops["triton.mla_index_scores"] == 2
    assert ops["triton.index_queries"] == 2  # the indexer's query rotation and casts, one kernel
    # the indexer's top-k on the DSA layers; the router's selection, one kernel, on the MoE layers
    assert ops["aten.topk"] == 2
    assert ops["triton.router_select"] == 3
    assert res["ops_in_matmuls"] > 0
    assert res["ops_total"] == res["ops_outside_matmuls"] + res["ops_in_matmuls"]


@pytest.fixture(scope="module")
def tiny_gemma4():
    return _tiny_model("gemma4-tiny")


def test_gemma4_decode_step_names_sliding_and_full_layers_and_counts_the_attention_kernels(tiny_gemma4):
    res, layers, ops = _decode_step(tiny_gemma4)
    assert layers == ["layer0:swa-dense", "layer1:swa-dense", "layer2:full-dense"]
    # one fused RoPE + cache store and one paged decode attention per layer, as on the GPU
    assert ops["triton.rope_store_kv"] == 3
    assert ops["triton.paged_decode_attention"] == 3
    # the rest of a layer: the residual add + norms after attention and after the MLP (that one also
    # norming the next layer's input), the gated activation; the first layer norms its own input
    assert ops["triton.gated_activation"] == 3
    assert ops["triton.residual_norm"] == 2 * 3 + 1 + 1  # + the final norm before the head
    assert ops["triton.softcap"] == 1
    other = {k: v["other"] for k, v in res["per_layer"].items()}
    assert other == {"layer0:swa-dense": 6, "layer1:swa-dense": 5, "layer2:full-dense": 5,
                     "outside layers": 5}  # embedding gather, cast, scale; final norm; softcap
