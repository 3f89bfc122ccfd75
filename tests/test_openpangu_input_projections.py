"""OpenPanguV2's MLA runs every projection of the layer input in one ``LinearGroup`` (issue 8):
q_a, kv_a and, on DSA layers, the indexer's key and head-weight projections: one matmul on the
Triton backend where their formats match (the published EXL3 keeps all four 16-bit), each
member's output the same as that member on its own."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synthetic import SyntheticCheckpoint  # noqa: E402

from exl3_triton.model import load_checkpoint  # noqa: E402


def _tiny(backend: str):
    ckpt = SyntheticCheckpoint("openpangu-tiny", bits=4, head_bits=4, device="cpu", dtype=torch.float16)
    return load_checkpoint(ckpt, device="cpu", dtype=torch.float16, backend=backend).network


def test_layer_input_projections_are_one_matmul_with_each_members_output():
    grouped, alone = _tiny("triton"), _tiny("reference")
    cfg = grouped.config
    x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).half()
    layers = list(grouped.layers) + list(grouped.mtp_layers)
    singles = list(alone.layers) + list(alone.mtp_layers)
    assert any(layer.self_attn.indexer is not None for layer in layers)
    for layer, single in zip(layers, singles):
        attn = layer.self_attn
        widths = [cfg.q_lora_rank, cfg.kv_lora_rank + cfg.rope_dim]
        if attn.indexer is not None:
            widths += [cfg.index_head_dim, cfg.index_heads]
            # handed over: the weights live in the group only
            assert attn.indexer.wk is None and attn.indexer.weights_proj is None
        assert attn.x_proj.launches == 1
        assert single.self_attn.x_proj.launches == len(widths)  # the reference backend runs them apart
        got, want = attn.x_proj(x), single.self_attn.x_proj(x)
        assert [t.shape[-1] for t in got] == widths
        for g, w in zip(got, want):
            assert torch.allclose(g.float(), w.float(), rtol=1e-3, atol=1e-3)
