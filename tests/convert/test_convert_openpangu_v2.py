"""The converter on a tiny OpenPanguV2: per-tensor formats (architectures.md §3.8) and quality.

The model is random but conditioned like tests/convert/test_convert_gemma4.py explains (a head
scaled to give confident logits); one trunk layer with DSA, MoME, sinks, mHC and MoE (two
routed experts and the shared one), and one MTP layer, which stays unquantized.
"""

from __future__ import annotations

import pytest
import torch

import exl3_triton
from exl3_triton.checkpoint import Checkpoint
from exl3_triton.convert import ConvertOptions, convert_model
from exl3_triton.kernels import exl3_full_weight

from ..conftest import rel_err
from ..pangu_models import tiny_pangu
from .noise_baseline import with_weight_noise

FAST = dict(cal_rows=8, cal_cols=128, scale_search="fast")
SHAPE = dict(num_hidden_layers=1, dsa_layers=[0], swa_layers=[1], sliding_window_list=[16],
             first_k_dense_replace=0, block_post_layernorm_idx=[0])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src = tiny_pangu(tmp_path_factory.mktemp("pangu") / "src", channel_spread=1.0, **SHAPE)
    out = src.parent / "q4"
    result = convert_model(src, out, ConvertOptions(bits=4, head_bits=6, codebook="mcg", **FAST))
    return src, out, result


def test_pangu_tensor_formats(converted):
    src, out, _ = converted
    ck, source = Checkpoint(out), Checkpoint(src)
    p = "model.layers.0"
    expected = {"lm_head", f"{p}.self_attn.q_b_proj", f"{p}.self_attn.o_proj"} | {
        f"{p}.mlp.{e}.{m}" for e in ("experts.0", "experts.1", "shared_experts")
        for m in ("gate_proj", "up_proj", "down_proj")}
    assert set(ck.exl3_linear_keys()) == expected
    for name in source.tensor_names():  # MLA down-projections, kv_b, indexer, mHC, MoME, sinks, router, MTP
        if name.rpartition(".")[0] not in expected:
            assert ck.info(name).dtype == source.info(name).dtype, name
            assert torch.equal(ck.tensor(name), source.tensor(name)), name


def test_pangu_tracks_the_unquantized_model(converted, tmp_path):
    """Top-1 >= 90% at 4 bits (head 6), and better than unshaped noise of each tensor's measured error."""
    src, out, result = converted
    ids = torch.randint(3, 256, (96,), generator=torch.Generator().manual_seed(7))
    ref = exl3_triton.load(src).forward(ids)
    quantized = exl3_triton.load(out)
    got = quantized.forward(ids)
    assert quantized.network.layers[0].mlp.experts.quantized
    ck, source = Checkpoint(out), Checkpoint(src)
    errors = {}
    for key in result.records:
        w = exl3_full_weight(ck.exl3_linear(key))
        want = source.tensor(f"{key}.weight").float().T
        errors[key] = rel_err(w[: want.shape[0], : want.shape[1]], want)
        assert errors[key] < (0.03 if key == "lm_head" else 0.1), key
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert top1 >= 0.9, top1
    noisy = [exl3_triton.load(with_weight_noise(src, tmp_path / f"noise{s}", errors, s)).forward(ids)
             for s in range(2)]
    noise_rel = min(rel_err(n, ref) for n in noisy)
    assert rel_err(got, ref) < noise_rel, (rel_err(got, ref), noise_rel)
    # the MTP layer loads unquantized with the trunk's embedding and head, and runs
    net = quantized.network
    with torch.inference_mode():
        hidden = net.forward_hidden(ids[None])[0]
        logits, _ = net.mtp_forward(1, hidden[:-1], ids[1:], None)
    assert logits.shape == (95, 256) and torch.isfinite(logits).all()
