"""MLA decode attention at openPangu-2.0-Flash shapes: the Triton kernels (kernels/triton_mla.py)
against MLA's PyTorch decode path (``MLAAttention._decode_attention``), checked and timed.

    python bench/mla_decode.py [--positions 200,4096,32767] [--batch 1,8] [--max-seq-len 32768]
                               [--sweep] [--out DIR]

Per layer kind (DSA: global, lightning indexer top-2048; sliding: window 512 in a ring; MTP:
window 2048), position and batch (all rows at that position, each its own sequence):

* check: the latent context of both paths (relative error) and, on DSA layers, how much of the
  indexer's top-k the kernels' scores select in common with the PyTorch scores;
* time: both paths captured in CUDA graphs (``common.time_graph``). The PyTorch path's
  per-step memo (history index and masks, shared by every layer of a kind in a real step) is
  rebuilt on every call ("torch_us") and also kept across calls ("torch_memo_kept_us", the
  cost a further layer of the same kind adds);
* ``--sweep``: the kernel's launch settings (block sizes, splits, tf32 / tf32x3), each timed.

The cache holds ``--max-seq-len`` tokens per row (pages of 256) so the PyTorch path pays what a
Generator with that capacity pays. Results: JSON in ``--out`` (default bench/results).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Results, environment, time_graph  # noqa: E402

from exl3_triton.arch.batch import ForwardBatch  # noqa: E402
from exl3_triton.arch.blocks.lightning_indexer import LightningIndexer  # noqa: E402
from exl3_triton.arch.blocks.mla import MLAAttention  # noqa: E402
from exl3_triton.kernels import triton_mla  # noqa: E402

HEADS, RANK, ROPE, SINKS, INDEX_HEADS, INDEX_DIM, TOP_K, PAGE = 48, 512, 64, 128, 24, 128, 2048, 256
KINDS = {"dsa": dict(window=None, ring=False, indexer=True), "sliding": dict(window=512, ring=True, indexer=False),
         "mtp_sliding": dict(window=2048, ring=True, indexer=False)}
SWEEP = [dict(block_h=16, block_n=32, splits=32, min_split=128, precision="tf32x3", num_warps=4),
         dict(block_h=16, block_n=32, splits=32, min_split=128, precision="tf32", num_warps=4),
         dict(block_h=16, block_n=64, splits=32, min_split=128, precision="tf32x3", num_warps=8),
         dict(block_h=16, block_n=16, splits=64, min_split=64, precision="tf32x3", num_warps=4),
         dict(block_h=32, block_n=32, splits=32, min_split=128, precision="tf32x3", num_warps=8),
         dict(block_h=64, block_n=32, splits=32, min_split=128, precision="tf32x3", num_warps=8),
         dict(block_h=16, block_n=32, splits=16, min_split=256, precision="tf32x3", num_warps=4),
         dict(block_h=16, block_n=32, splits=64, min_split=64, precision="tf32x3", num_warps=4)]


def attention_layer(kind: dict, g: torch.Generator) -> MLAAttention:
    """An MLAAttention carrying only what the decode attention reads (sinks, scale, window, indexer top-k)."""
    attn = MLAAttention.__new__(MLAAttention)
    nn.Module.__init__(attn)
    attn.num_heads, attn.kv_rank, attn.rope_dim = HEADS, RANK, ROPE
    attn.scale = (128 + ROPE) ** -0.5
    attn.window, attn.ring, attn.layer_idx = kind["window"], kind["ring"], 0
    attn.sink_c = torch.randn(SINKS, RANK, generator=g, device="cuda")
    attn.sink_pe = torch.randn(SINKS, ROPE, generator=g, device="cuda")
    attn.indexer = LightningIndexer(None, None, None, None, num_heads=INDEX_HEADS, head_dim=INDEX_DIM,
                                    top_k=TOP_K) if kind["indexer"] else None
    return attn


def decode_batch(kind: dict, position: int, batch: int, max_seq_len: int, dtype, g) -> ForwardBatch:
    """``batch`` sequences at ``position``, each with pages for ``max_seq_len`` tokens (or its ring)."""
    logical = -(-max_seq_len // PAGE)
    if kind["ring"]:
        ring = -(-(kind["window"] + 64) // PAGE)
        lp = torch.arange(logical)
        table = torch.stack([b * ring + lp % ring for b in range(batch)])
        pages = batch * ring
    else:
        table = torch.arange(batch * logical).view(batch, logical)
        pages = batch * logical
    table = torch.where(torch.arange(logical)[None, :] <= position // PAGE, table, -1).to(torch.int32).cuda()
    paged = {"c": torch.randn(pages, PAGE, RANK, generator=g, device="cuda").to(dtype),
             "kpe": torch.randn(pages, PAGE, ROPE, generator=g, device="cuda").to(dtype)}
    if kind["indexer"]:
        paged["kidx"] = torch.randn(pages, PAGE, INDEX_DIM, generator=g, device="cuda").to(dtype)
    positions = torch.full((batch,), position, dtype=torch.long, device="cuda")
    cache = SimpleNamespace(paged=[paged], page_size=PAGE)
    return ForwardBatch(positions=positions, slot_mapping=positions, page_table=table,
                        kv_lens_t=(positions + 1).int(), seq_slots=torch.arange(batch, device="cuda"),
                        cu_q=list(range(batch + 1)), kv_lens=[position + 1] * batch, cache=cache, is_decode=True,
                        ring_page_table=table if kind["ring"] else None)


def queries(batch: int, g: torch.Generator, with_index: bool):
    q_abs = torch.randn(batch, HEADS, RANK, generator=g, device="cuda") * 0.05  # scores of a few units
    q_pe = torch.randn(batch, HEADS, ROPE, generator=g, device="cuda") * 0.3
    if not with_index:
        return q_abs, q_pe, None, None
    return (q_abs, q_pe, torch.randn(batch, INDEX_HEADS, INDEX_DIM, generator=g, device="cuda"),
            torch.randn(batch, INDEX_HEADS, generator=g, device="cuda"))


def one_case(res: Results, name: str, kind: dict, position: int, batch: int, max_seq_len: int, sweep: bool):
    g = torch.Generator(device="cuda").manual_seed(position + batch)
    attn = attention_layer(kind, g)
    fb = decode_batch(kind, position, batch, max_seq_len, torch.float16, g)
    q_abs, q_pe, q_idx, w_idx = queries(batch, g, kind["indexer"])
    fused = SimpleNamespace(decode=triton_mla.mla_decode_triton, index_scores=triton_mla.index_scores_triton)

    def torch_path(fresh_memo: bool):
        if fresh_memo:
            fb.memo.clear()
        return attn._decode_attention(fb, q_abs, q_pe, q_idx, w_idx)

    want = torch_path(True)
    got = attn._decode_attention_fused(fused, fb, q_abs, q_pe, q_idx, w_idx)
    rec = {"kind": name, "position": position, "batch": batch, "max_seq_len": max_seq_len,
           "ctx_rel_err": ((got - want).norm() / want.norm()).item(),
           "ctx_max_abs_err": (got - want).abs().max().item()}
    if kind["indexer"]:
        paged, table = fb.cache.paged[0], fb.page_table
        scores = triton_mla.index_scores_triton(q_idx, w_idx, paged["kidx"], table, fb.positions)
        keys = paged["kidx"].flatten(0, 1)[attn._decode_history_index(fb)[1]]
        ref = attn.indexer._best(q_idx, w_idx, keys, ~(torch.arange(keys.shape[1], device="cuda")[None] <= fb.positions[:, None]))
        k = min(TOP_K, scores.shape[1])
        mine = torch.topk(scores, k).indices
        common = [len(set(a.tolist()) & set(b.tolist())) / min(k, position + 1) for a, b in zip(mine, ref.indices)]
        rec["selection_agreement_min"] = min(common)
        finite = torch.isfinite(ref.values)
        rec["index_score_max_rel_err"] = ((scores.gather(1, ref.indices) - ref.values).abs()[finite].max()
                                          / ref.values[finite].abs().max()).item()
    rec["torch_us"] = time_graph(lambda i: torch_path(True), 1)["median_us"]
    torch_path(True)
    rec["torch_memo_kept_us"] = time_graph(lambda i: torch_path(False), 1)["median_us"]
    rec["triton_us"] = time_graph(lambda i: attn._decode_attention_fused(fused, fb, q_abs, q_pe, q_idx, w_idx),
                                  1)["median_us"]
    rec["speedup"] = rec["torch_us"] / rec["triton_us"]
    res.add("mla_decode", rec)
    if sweep:
        for cfg in SWEEP:
            def run(i, cfg=cfg):
                selected = None
                if kind["indexer"]:
                    s = triton_mla.index_scores_triton(q_idx, w_idx, fb.cache.paged[0]["kidx"], fb.page_table,
                                                       fb.positions)
                    selected = torch.topk(s, min(TOP_K, s.shape[1]), dim=-1).indices
                table = fb.ring_page_table if kind["ring"] else fb.page_table
                return triton_mla.mla_decode_triton(q_abs, q_pe, attn.sink_c, attn.sink_pe, fb.cache.paged[0]["c"],
                                                    fb.cache.paged[0]["kpe"], table, fb.positions, scale=attn.scale,
                                                    window=attn.window, selected=selected, **cfg)
            try:
                err = ((run(0) - want).norm() / want.norm()).item()
                res.add("sweep", {"kind": name, "position": position, "batch": batch, **cfg, "ctx_rel_err": err,
                                  "triton_us": time_graph(run, 1)["median_us"]})
            except Exception as e:  # a setting the GPU cannot compile (shared memory): record it, go on
                res.add("sweep", {"kind": name, "position": position, "batch": batch, **cfg,
                                  "error": f"{type(e).__name__}: {str(e)[:200]}"})
    del fb
    torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", default="200,4096,32767")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--max-seq-len", type=int, default=32768)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/mla_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else REPO / "bench" / "results"
    res = Results(out / "mla_decode.json", environment())
    for name in args.kinds.split(","):
        for position in (int(x) for x in args.positions.split(",")):
            if position >= args.max_seq_len:
                raise SystemExit(f"--positions {position} must be below --max-seq-len {args.max_seq_len}")
            for batch in (int(x) for x in args.batch.split(",")):
                one_case(res, name, KINDS[name], position, batch, args.max_seq_len, args.sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
