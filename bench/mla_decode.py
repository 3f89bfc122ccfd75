"""MLA decode attention at openPangu-2.0-Flash shapes: the Triton kernels (kernels/triton_mla.py)
against MLA's PyTorch decode path (``MLAAttention._decode_attention``), checked and timed.

    python bench/mla_decode.py [--positions 200,4096,32767] [--batch 1,8] [--max-seq-len 32768]
                               [--sweep] [--out DIR]
    python bench/mla_decode.py --tiny     # a CPU check of this script (tiny shapes, interpreter, no timing)

Per layer kind (DSA: global, lightning indexer top-2048; sliding: window 512 in a ring; MTP:
window 2048), position and batch (all rows at that position, each its own sequence):

* check: the latent context of both paths (relative error) and, on DSA layers, how much of the
  indexer's top-k the kernels' scores select in common with the PyTorch scores;
* time: both paths captured in CUDA graphs (``common.time_graph``). The PyTorch path's
  per-step memo (history index and masks, shared by every layer of a kind in a real step) is
  rebuilt on every call ("torch_us") and also kept across calls ("torch_memo_kept_us", the
  cost a further layer of the same kind adds); on DSA layers also the index-score kernel and
  ``torch.topk`` alone ("index_scores_us", "topk_us"), parts of "triton_us";
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
from exl3_triton.kernels import triton_ops  # noqa: E402

# through load(): on a CPU it switches Triton's interpreter on before the kernels are defined
triton_mla = triton_ops.load().mla

# openPangu-2.0-Flash; --tiny: a CPU check of this script's logic (Triton interpreter, no timing)
FLASH = dict(heads=48, rank=512, rope=64, sinks=128, index_heads=24, index_dim=128, top_k=2048, page=256,
             windows={"dsa": None, "sliding": 512, "mtp_sliding": 2048})
TINY = dict(heads=3, rank=32, rope=16, sinks=4, index_heads=4, index_dim=16, top_k=8, page=8,
            windows={"dsa": None, "sliding": 12, "mtp_sliding": 20})
KINDS = ("dsa", "sliding", "mtp_sliding")  # DSA: global with the indexer; the others: a window in a ring
SWEEP = [dict(block_h=16, block_n=16, splits=32, min_split=128, precision="tf32x3", num_warps=4, num_stages=1),
         dict(block_h=16, block_n=16, splits=32, min_split=128, precision="tf32x3", num_warps=4, num_stages=2),
         dict(block_h=16, block_n=16, splits=32, min_split=128, precision="tf32x3", num_warps=8, num_stages=1),
         dict(block_h=16, block_n=32, splits=32, min_split=128, precision="tf32", num_warps=4, num_stages=1),
         dict(block_h=16, block_n=32, splits=32, min_split=128, precision="tf32", num_warps=4, num_stages=2),
         dict(block_h=32, block_n=16, splits=32, min_split=128, precision="tf32x3", num_warps=8, num_stages=1),
         dict(block_h=16, block_n=16, splits=16, min_split=256, precision="tf32x3", num_warps=4, num_stages=1),
         dict(block_h=16, block_n=16, splits=64, min_split=64, precision="tf32x3", num_warps=4, num_stages=1),
         dict(block_h=16, block_n=16, splits=32, min_split=32, precision="tf32x3", num_warps=4, num_stages=1)]


def attention_layer(sh: dict, kind: str, g: torch.Generator, device) -> MLAAttention:
    """An MLAAttention carrying only what the decode attention reads (sinks, scale, window, indexer top-k)."""
    attn = MLAAttention.__new__(MLAAttention)
    nn.Module.__init__(attn)
    attn.num_heads, attn.kv_rank, attn.rope_dim = sh["heads"], sh["rank"], sh["rope"]
    attn.scale = (128 + sh["rope"]) ** -0.5
    attn.window, attn.ring, attn.layer_idx = sh["windows"][kind], kind != "dsa", 0
    attn.sink_c = torch.randn(sh["sinks"], sh["rank"], generator=g, device=device)
    attn.sink_pe = torch.randn(sh["sinks"], sh["rope"], generator=g, device=device)
    attn.indexer = LightningIndexer(None, None, None, None, num_heads=sh["index_heads"], head_dim=sh["index_dim"],
                                    top_k=sh["top_k"]) if kind == "dsa" else None
    return attn


def decode_batch(sh: dict, attn: MLAAttention, position: int, batch: int, max_seq_len: int, dtype, g,
                 device) -> ForwardBatch:
    """``batch`` sequences at ``position``, each with pages for ``max_seq_len`` tokens (or its ring)."""
    page = sh["page"]
    logical = -(-max_seq_len // page)
    if attn.ring:
        ring = -(-(attn.window + 64) // page)
        lp = torch.arange(logical)
        table = torch.stack([b * ring + lp % ring for b in range(batch)])
        pages = batch * ring
    else:
        table = torch.arange(batch * logical).view(batch, logical)
        pages = batch * logical
    table = torch.where(torch.arange(logical)[None, :] <= position // page, table, -1).to(torch.int32).to(device)
    paged = {"c": torch.randn(pages, page, sh["rank"], generator=g, device=device).to(dtype),
             "kpe": torch.randn(pages, page, sh["rope"], generator=g, device=device).to(dtype)}
    if attn.indexer is not None:
        paged["kidx"] = torch.randn(pages, page, sh["index_dim"], generator=g, device=device).to(dtype)
    positions = torch.full((batch,), position, dtype=torch.long, device=device)
    cache = SimpleNamespace(paged=[paged], page_size=page)
    return ForwardBatch(positions=positions, slot_mapping=positions, page_table=table,
                        kv_lens_t=(positions + 1).int(), seq_slots=torch.arange(batch, device=device),
                        cu_q=list(range(batch + 1)), kv_lens=[position + 1] * batch, cache=cache, is_decode=True,
                        ring_page_table=table if attn.ring else None)


def queries(sh: dict, batch: int, g: torch.Generator, with_index: bool, device):
    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)
    q_abs, q_pe = randn(batch, sh["heads"], sh["rank"]) * 0.05, randn(batch, sh["heads"], sh["rope"]) * 0.3
    if not with_index:  # (scores of a few units)
        return q_abs, q_pe, None, None
    return q_abs, q_pe, randn(batch, sh["index_heads"], sh["index_dim"]), randn(batch, sh["index_heads"])


def one_case(res: Results | None, sh: dict, name: str, position: int, batch: int, max_seq_len: int, sweep: bool,
             device: str, timed: bool) -> dict:
    g = torch.Generator(device=device).manual_seed(position + batch)
    attn = attention_layer(sh, name, g, device)
    fb = decode_batch(sh, attn, position, batch, max_seq_len, torch.float16, g, device)
    q_abs, q_pe, q_idx, w_idx = queries(sh, batch, g, attn.indexer is not None, device)
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
    if attn.indexer is not None:
        paged, table = fb.cache.paged[0], fb.page_table
        scores = triton_mla.index_scores_triton(q_idx, w_idx, paged["kidx"], table, fb.positions)
        keys = paged["kidx"].flatten(0, 1)[attn._decode_history_index(fb)[1]]
        later = torch.arange(keys.shape[1], device=device)[None] > fb.positions[:, None]
        ref = attn.indexer._best(q_idx, w_idx, keys, later)
        k = min(sh["top_k"], scores.shape[1])
        mine = torch.topk(scores, k).indices
        chosen = min(k, position + 1)  # topk sorts: the candidates first, then -inf fillers
        common = [len(set(a[:chosen].tolist()) & set(b[:chosen].tolist())) / chosen
                  for a, b in zip(mine, ref.indices)]
        rec["selection_agreement_min"] = min(common)
        finite = torch.isfinite(ref.values)
        rec["index_score_max_rel_err"] = ((scores.gather(1, ref.indices) - ref.values).abs()[finite].max()
                                          / ref.values[finite].abs().max()).item()
    if not timed:
        return rec
    rec["torch_us"] = time_graph(lambda i: torch_path(True), 1)["median_us"]
    torch_path(True)
    rec["torch_memo_kept_us"] = time_graph(lambda i: torch_path(False), 1)["median_us"]
    rec["triton_us"] = time_graph(lambda i: attn._decode_attention_fused(fused, fb, q_abs, q_pe, q_idx, w_idx),
                                  1)["median_us"]
    rec["speedup"] = rec["torch_us"] / rec["triton_us"]
    if attn.indexer is not None:  # where the DSA layer's time goes: index scores, top-k, attention
        paged, table = fb.cache.paged[0], fb.page_table
        scores = triton_mla.index_scores_triton(q_idx, w_idx, paged["kidx"], table, fb.positions)
        k = min(sh["top_k"], scores.shape[1])
        rec["index_scores_us"] = time_graph(lambda i: triton_mla.index_scores_triton(
            q_idx, w_idx, paged["kidx"], table, fb.positions), 1)["median_us"]
        rec["topk_us"] = time_graph(lambda i: torch.topk(scores, k, dim=-1), 1)["median_us"]
    res.add("mla_decode", rec)
    if sweep:
        for cfg in SWEEP:
            def run(i, cfg=cfg):
                selected = None
                if attn.indexer is not None:
                    s = triton_mla.index_scores_triton(q_idx, w_idx, fb.cache.paged[0]["kidx"], fb.page_table,
                                                       fb.positions)
                    selected = torch.topk(s, min(sh["top_k"], s.shape[1]), dim=-1).indices
                table = fb.ring_page_table if attn.ring else fb.page_table
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
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", default="200,4096,32767")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--max-seq-len", type=int, default=32768)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--tiny", action="store_true", help="check this script on a CPU: tiny shapes, no timing")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.tiny:
        for name in args.kinds.split(","):
            for position in (3, 30, 60):
                print(one_case(None, TINY, name, position, 2, 64, False, "cpu", timed=False))
        return 0
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
                one_case(res, FLASH, name, position, batch, args.max_seq_len, args.sweep, "cuda", timed=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
