"""The whole MLA decode attention of one layer at openPangu-2.0-Flash shapes -- from ``q_b_proj``'s fp16
output to o_proj's fp16 input -- on three paths, checked against the fp32 PyTorch reference and timed.

    python bench/mla_decode.py [--positions 200,4096] [--batch 1,8] [--max-seq-len 32768] [--sweep] [--out DIR]
    python bench/mla_decode.py --resources  # compile the decode kernel's sweep settings for sm_90 (no GPU needed)
    python bench/mla_decode.py --tiny       # a CPU check of this script (tiny shapes, interpreter, no timing)

Paths (``MLAAttention``'s decode methods, kernels/triton_mla.py):

* "reference": fp32 q split / RoPE / ``q_abs`` einsum, ``_decode_attention`` (gather, cat, einsums, softmax),
  the ``w_uv`` einsum and a cast -- the CPU path, and before this change the CUDA path of window layers;
* "previous": the same products around the split/merge kernels with fp32 tf32x3 operands (block_n 16,
  1 stage): before this change the CUDA path of DSA layers;
* "new": the q prologue kernel (``q_abs`` in fp16, rotated ``q_pe``), the fp16 split kernel and the merge
  with the ``w_uv`` product (``mla_decode_out_triton``) -- the CUDA path of every layer now.

On DSA layers all three add the lightning indexer's scores and ``torch.topk`` (the previous and new paths
through ``index_scores_triton``). Per layer kind (DSA: global, top-2048; sliding: window 512 in a ring;
MTP: window 2048), position and batch (all rows at that position, each its own sequence): the relative
error of o_proj's input against the reference, the DSA selections' agreement, and the time of each
path captured in a CUDA graph ("*_us"; the reference path's per-step memo kept across calls, the cost
a further layer of the same kind adds), with the new path's parts ("prologue_us", "index_scores_us",
"topk_us", "decode_out_us"). ``--sweep``: ``mla_decode_out_triton``'s launch settings, each checked
and timed alone (the selection fixed). The cache holds ``--max-seq-len`` tokens per row (pages of 256).
Results: JSON in ``--out`` (default bench/results).
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

# calls captured back to back in one CUDA graph per timing: a graph of one small call measures the graph's launch
# (~13 us on the H100: the start event runs before the CPU has submitted the graph), not the call
CALLS = 16

from exl3_triton.arch.batch import ForwardBatch  # noqa: E402
from exl3_triton.arch.blocks.lightning_indexer import LightningIndexer  # noqa: E402
from exl3_triton.arch.blocks.mla import MLAAttention  # noqa: E402
from exl3_triton.arch.blocks.rope import fold_sin  # noqa: E402
from exl3_triton.kernels import triton_ops  # noqa: E402

if "--resources" in sys.argv:  # compiled for a GPU target, never interpreted
    from exl3_triton.kernels import triton_mla  # noqa: E402
else:  # through load(): on a CPU it switches Triton's interpreter on before the kernels are defined
    triton_mla = triton_ops.load().mla

# openPangu-2.0-Flash; --tiny: a CPU check of this script's logic (Triton interpreter, no timing)
FLASH = dict(heads=48, rank=512, rope=64, nope=128, v=128, sinks=128, index_heads=24, index_dim=128, top_k=2048,
             page=256, windows={"dsa": None, "sliding": 512, "mtp_sliding": 2048})
TINY = dict(heads=3, rank=32, rope=16, nope=16, v=16, sinks=4, index_heads=4, index_dim=16, top_k=8, page=8,
            windows={"dsa": None, "sliding": 12, "mtp_sliding": 20})
KINDS = ("dsa", "sliding", "mtp_sliding")  # DSA: global with the indexer; the others: a window in a ring
# the split kernel's settings before this change (fp32 operands)
PREVIOUS = dict(block_h=16, block_n=16, splits=32, min_split=32, precision="tf32x3", num_warps=4, num_stages=1)


def _setting(block_h=16, block_n=32, splits=32, min_split=None, num_warps=8, num_stages=1, r_parts=1, v_parts=None):
    """A launch setting; the fewest keys of a split defaults to 32 or one key block, whichever is more, and the
    merge's programs along V to ``mla_decode_out_triton``'s rule (None)."""
    return dict(block_h=block_h, block_n=block_n, splits=splits, min_split=min_split or max(32, block_n),
                precision="fp16", num_warps=num_warps, num_stages=num_stages, r_parts=r_parts, v_parts=v_parts)


# mla_decode_out_triton's launch settings (--sweep, --resources): heads per program, key block, pipelining,
# warps, programs along the latent's columns, the split rule (splits, fewest keys a split takes) and the
# merge's programs along V. Compiled for sm_90 here: 16 or 32 heads with 8 warps need no spills; 4 warps spill
# (the [16, 512] q operand is held by every warp), as do 64 heads. The first H100 sweep (2 stages then) put
# 1 stage first everywhere, v_parts 2-4 first at one row, 4 warps or 32 heads level at 8 rows.
SWEEP = [_setting(), _setting(num_stages=2), _setting(v_parts=1), _setting(v_parts=2), _setting(v_parts=4),
         _setting(block_n=16), _setting(block_n=64), _setting(num_warps=4), _setting(num_warps=4, block_h=32),
         _setting(block_h=32), _setting(block_h=64), _setting(r_parts=2), _setting(min_split=64),
         _setting(min_split=128), _setting(splits=16), _setting(splits=64), _setting(splits=64, min_split=64),
         _setting(splits=16, min_split=64)]
INDEX_SPANS = (64, 128, 256, 1024)  # --sweep: index_scores_triton's positions per program


def attention_layer(sh: dict, kind: str, g: torch.Generator, device) -> MLAAttention:
    """An MLAAttention carrying only what the decode attention reads (absorbed weights, sinks, scale, window,
    indexer top-k)."""
    attn = MLAAttention.__new__(MLAAttention)
    nn.Module.__init__(attn)
    attn.num_heads, attn.kv_rank, attn.rope_dim = sh["heads"], sh["rank"], sh["rope"]
    attn.nope_dim, attn.v_dim = sh["nope"], sh["v"]
    attn.scale = (sh["nope"] + sh["rope"]) ** -0.5
    attn.window, attn.ring, attn.layer_idx = sh["windows"][kind], kind != "dsa", 0
    # kv_b as EXL3 decodes it (fp16 values), entries ~ 1/sqrt(nope) so q_abs is of order 1
    kv_b = (torch.randn(sh["heads"], sh["nope"] + sh["v"], sh["rank"], generator=g, device=device)
            * sh["nope"] ** -0.5).half().float()
    attn.w_uk, attn.w_uv = kv_b[:, :sh["nope"]].contiguous(), kv_b[:, sh["nope"]:].contiguous()
    attn._kernel_params = None
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


def queries(sh: dict, batch: int, position: int, g: torch.Generator, with_index: bool, device):
    """q_b_proj's fp16 output ``[n, H, nope + P]``, the RoPE tables at ``position`` and the indexer's queries."""
    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)
    q = randn(batch, sh["heads"], sh["nope"] + sh["rope"]).half()
    inv = 10000.0 ** (-torch.arange(0, sh["rope"], 2, device=device).float() / sh["rope"])
    angles = torch.cat([inv, inv]) * position
    cos = angles.cos().expand(batch, -1).contiguous()
    sin = fold_sin(angles.sin()).expand(batch, -1).contiguous()
    if not with_index:
        return q, cos, sin, None, None
    return q, cos, sin, randn(batch, sh["index_heads"], sh["index_dim"]), randn(batch, sh["index_heads"])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def one_case(res: Results | None, sh: dict, name: str, position: int, batch: int, max_seq_len: int, sweep: bool,
             device: str, timed: bool) -> dict:
    g = torch.Generator(device=device).manual_seed(position + batch)
    attn = attention_layer(sh, name, g, device)
    fb = decode_batch(sh, attn, position, batch, max_seq_len, torch.float16, g, device)
    q, cos, sin, q_idx, w_idx = queries(sh, batch, position, g, attn.indexer is not None, device)
    n, heads, v = batch, sh["heads"], sh["v"]
    new = SimpleNamespace(q_prologue=triton_mla.mla_q_prologue_triton, decode_out=triton_mla.mla_decode_out_triton,
                          index_scores=triton_mla.index_scores_triton)
    paged, table = fb.cache.paged[0], (fb.ring_page_table if attn.ring else fb.page_table)

    def reference(fresh_memo: bool):
        if fresh_memo:
            fb.memo.clear()
        q_abs, q_pe = attn._decode_queries(None, q, cos, sin)
        ctx = attn._decode_attention(fb, q_abs, q_pe, q_idx, w_idx)
        return torch.einsum("nhr,hvr->nhv", ctx, attn.w_uv).reshape(n, heads * v).half()

    def previous():
        q_abs, q_pe = attn._decode_queries(None, q, cos, sin)
        selected = None
        if attn.indexer is not None:
            scores = triton_mla.index_scores_triton(q_idx, w_idx, paged["kidx"], table, fb.positions)
            selected = torch.topk(scores, min(sh["top_k"], scores.shape[1]), dim=-1).indices  # (sorted, as before)
        ctx = triton_mla.mla_decode_triton(q_abs, q_pe, attn.sink_c, attn.sink_pe, paged["c"], paged["kpe"], table,
                                           fb.positions, scale=attn.scale, window=attn.window, selected=selected,
                                           **PREVIOUS)
        return torch.einsum("nhr,hvr->nhv", ctx, attn.w_uv).reshape(n, heads * v).half()

    def new_path():
        q_abs, q_pe = attn._decode_queries(new, q, cos, sin)
        return attn._decode_attention_fused(new, fb, q_abs, q_pe, q_idx, w_idx, torch.float16)

    # the fp32 result the others are checked against (before its fp16 rounding)
    fb.memo.clear()
    q_abs32, q_pe32 = attn._decode_queries(None, q, cos, sin)
    want = torch.einsum("nhr,hvr->nhv", attn._decode_attention(fb, q_abs32, q_pe32, q_idx, w_idx),
                        attn.w_uv).reshape(n, heads * v)
    rec = {"kind": name, "position": position, "batch": batch, "max_seq_len": max_seq_len,
           "o_rel_err_previous": _rel(previous(), want), "o_rel_err_new": _rel(new_path(), want),
           "o_max_abs_err_new": (new_path().float() - want).abs().max().item(),
           "o_rel_err_reference_fp16_out": _rel(want.half(), want)}  # the output rounding alone
    # fp16 roundings of q, keys, probabilities and the output (each 2^-11 relative): 4 x 2^-11 is the budget
    rec["ok"] = rec["o_rel_err_new"] < 4 * 2.0 ** -11
    q_abs16, q_pe16 = new.q_prologue(q, attn._half_params().w_uk, cos, sin)
    rec["q_abs_rel_err"], rec["q_pe_rel_err"] = _rel(q_abs16, q_abs32), _rel(q_pe16, q_pe32)
    selected = None
    if attn.indexer is not None:
        scores = triton_mla.index_scores_triton(q_idx, w_idx, paged["kidx"], table, fb.positions)
        keys = paged["kidx"].flatten(0, 1)[attn._decode_history_index(fb)[1]]
        later = torch.arange(keys.shape[1], device=device)[None] > fb.positions[:, None]
        ref = attn.indexer._best(q_idx, w_idx, keys, later)
        k = min(sh["top_k"], scores.shape[1])
        selected = torch.topk(scores, k, dim=-1).indices
        chosen = min(k, position + 1)  # topk sorts: the candidates first, then -inf fillers
        common = [len(set(a[:chosen].tolist()) & set(b[:chosen].tolist())) / chosen
                  for a, b in zip(selected, ref.indices)]
        rec["selection_agreement_min"] = min(common)

    def decode_out(i=0, **launch):
        half = attn._half_params()
        return triton_mla.mla_decode_out_triton(q_abs16, q_pe16, half.sink_c, half.sink_pe, paged["c"], paged["kpe"],
                                                table, fb.positions, half.w_uv, scale=attn.scale,
                                                window=attn.window, selected=selected, **launch)
    if not timed:
        for cfg in SWEEP if sweep else ():
            rec.setdefault("sweep_rel_err_max", 0.0)
            rec["sweep_rel_err_max"] = max(rec["sweep_rel_err_max"], _rel(decode_out(**cfg), want))
        return rec
    reference(True)
    rec["reference_us"] = time_graph(lambda i: reference(False), CALLS)["median_us"]
    rec["previous_us"] = time_graph(lambda i: previous(), CALLS)["median_us"]
    rec["new_us"] = time_graph(lambda i: new_path(), CALLS)["median_us"]
    rec["speedup_vs_previous"] = rec["previous_us"] / rec["new_us"]
    rec["speedup_vs_reference"] = rec["reference_us"] / rec["new_us"]
    rec["prologue_us"] = time_graph(lambda i: new.q_prologue(q, attn._half_params().w_uk, cos, sin), CALLS)["median_us"]
    rec["decode_out_us"] = time_graph(decode_out, CALLS)["median_us"]
    if attn.indexer is not None:  # where the DSA layer's time goes: index scores, top-k, attention
        rec["index_scores_us"] = time_graph(lambda i: triton_mla.index_scores_triton(
            q_idx, w_idx, paged["kidx"], table, fb.positions), CALLS)["median_us"]
        rec["topk_us"] = time_graph(lambda i: torch.topk(scores, k, dim=-1, sorted=False), CALLS)["median_us"]
        rec["topk_sorted_us"] = time_graph(lambda i: torch.topk(scores, k, dim=-1), CALLS)["median_us"]
    res.add("mla_decode", rec)
    for span in INDEX_SPANS if sweep and attn.indexer is not None else ():
        res.add("index_span", {"kind": name, "position": position, "batch": batch, "span": span,
                               "index_scores_us": time_graph(lambda i, span=span: triton_mla.index_scores_triton(
                                   q_idx, w_idx, paged["kidx"], table, fb.positions, span=span), CALLS)["median_us"]})
    for cfg in SWEEP if sweep else ():
        try:
            err = _rel(decode_out(**cfg), want)
            res.add("sweep", {"kind": name, "position": position, "batch": batch, **cfg, "o_rel_err": err,
                              "ok": err < 4 * 2.0 ** -11,
                              "decode_out_us": time_graph(lambda i, cfg=cfg: decode_out(**cfg), CALLS)["median_us"]})
        except Exception as e:  # a setting the GPU cannot compile (shared memory): record it, go on
            res.add("sweep", {"kind": name, "position": position, "batch": batch, **cfg,
                              "error": f"{type(e).__name__}: {str(e)[:200]}"})
    del fb
    torch.cuda.empty_cache()
    return rec


def _compiled(fn, consts: dict, pointers: dict, num_warps: int, num_stages: int, arch: int) -> dict:
    """``fn`` compiled for ``sm_<arch>`` with Triton's bundled ptxas (no GPU needed): registers, spill stack,
    shared memory -- or the error. Pointers and integers are specialized as a launch at Flash shapes
    specializes them: pointers 16-byte aligned, every integer (sizes, strides, window, top-k) a multiple of 16."""
    import triton  # (here: importing Triton before triton_ops.load() would keep a CPU run from interpreting)
    from kernel_resources import resources
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {a: "constexpr" if a in consts else pointers.get(a, "*fp32") if a.endswith("_ptr") else
                 "fp32" if a == "scale_log2" else "i32" for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if signature[a] not in ("constexpr", "fp32")}
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    got = resources(kernel)
    return {**{k: got[k] for k in ("regs", "stack", "local", "shared")}, "fits": got["shared"] <= 232448}


def compile_resources(res: Results | None, arch: int = 90, settings: list[dict] | None = None) -> list[dict]:
    """Each sweep setting's split kernel at Flash shapes (R=512, P=64, the DSA selection), the merge with
    the w_uv product per split count and the q prologue, compiled for ``sm_<arch>``."""
    half16 = {"q_ptr": "*fp16", "qpe_ptr": "*fp16", "c_ptr": "*fp16", "kpe_ptr": "*fp16", "table_ptr": "*i32",
              "pos_ptr": "*i64", "sel_ptr": "*i64", "sink_c_ptr": "*fp16", "sink_pe_ptr": "*fp16"}
    settings = settings or [PREVIOUS, *SWEEP]
    rows, done = [], set()
    for cfg in settings:
        rec = {"kernel": "split", **{k: cfg.get(k, 1) for k in ("block_h", "block_n", "precision", "num_warps",
                                                                   "num_stages", "r_parts")}}
        if tuple(rec.values()) in done:  # (the split rule and the merge's settings do not change its code)
            continue
        done.add(tuple(rec.values()))
        half = cfg["precision"] == "fp16"
        consts = dict(R=512, P=64, BLOCK_H=cfg["block_h"], BLOCK_N=cfg["block_n"], SPLITS=cfg["splits"],
                      MIN_SPLIT=cfg["min_split"], HAS_WINDOW=False, HAS_SEL=True,
                      PRECISION="ieee" if half else cfg["precision"], HALF=half, R_PARTS=cfg.get("r_parts", 1))
        # fp32 queries and sinks unless fp16
        pointers = half16 if half else {**half16, "q_ptr": "*fp32", "qpe_ptr": "*fp32", "sink_c_ptr": "*fp32",
                                        "sink_pe_ptr": "*fp32"}
        rows.append({**rec, **_compiled(triton_mla._mla_split_kernel, consts, pointers, cfg["num_warps"],
                                        cfg["num_stages"], arch)})
    for splits in sorted({cfg["splits"] for cfg in settings}):
        rows.append({"kernel": "merge_out", "splits": splits, "num_warps": triton_mla.MERGE_WARPS, **_compiled(
            triton_mla._mla_merge_out_kernel, dict(R=512, SPLITS=splits, BLOCK_V=triton_mla.OUT_BLOCK_V, V_PER=128),
            {"wuv_ptr": "*fp16", "out_ptr": "*fp16"}, triton_mla.MERGE_WARPS, 1, arch)})
    rows.append({"kernel": "q_prologue", "block_r": triton_mla.PROLOGUE_BLOCK_R, **_compiled(
        triton_mla._mla_q_prologue_kernel, dict(BLOCK_M=16, D=128, P=64, BLOCK_R=triton_mla.PROLOGUE_BLOCK_R),
        {"q_ptr": "*fp16", "wuk_ptr": "*fp16", "qabs_ptr": "*fp16", "qpe_ptr": "*fp16"}, 4, 1, arch)})
    for rec in rows:
        if res is not None:
            res.add("resources", rec)
        else:
            print(rec, flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", default="200,4096")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--max-seq-len", type=int, default=32768)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--tiny", action="store_true", help="check this script on a CPU: tiny shapes, no timing")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--resources", action="store_true", help="compile the sweep settings for sm_90, then stop")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.tiny:
        for name in args.kinds.split(","):
            for position in (3, 30, 60):
                print(one_case(None, TINY, name, position, 2, 64, args.sweep, "cpu", timed=False))
        return 0
    if args.resources and not torch.cuda.is_available():
        compile_resources(None)
        return 0
    if not torch.cuda.is_available():
        print("bench/mla_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else REPO / "bench" / "results"
    res = Results(out / "mla_decode.json", environment())
    compile_resources(res)
    if args.resources:
        return 0
    for name in args.kinds.split(","):
        for position in (int(x) for x in args.positions.split(",")):
            if position >= args.max_seq_len:
                raise SystemExit(f"--positions {position} must be below --max-seq-len {args.max_seq_len}")
            for batch in (int(x) for x in args.batch.split(",")):
                one_case(res, FLASH, name, position, batch, args.max_seq_len, args.sweep, "cuda", timed=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
