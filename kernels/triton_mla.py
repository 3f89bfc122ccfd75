"""MLA decode attention and the DSA indexer's scores, bounded by each row's own position.

The PyTorch decode path (``arch/blocks/mla.py``) is sized by the cache: on a global layer
every row gathers all ``pages * page_size`` latents the page table can address, casts them to
fp32 and runs three einsums and a softmax over them, and the lightning indexer scores them
all. Here each row reads its position on the device and visits only the keys it can see:

* ``mla_decode_triton``: FlashDecoding. Program ``(row, split, head block)`` walks its share of
  the row's keys -- the ``L`` sink entries first (always visible), then positions
  ``lo .. pos`` (``lo = pos - window + 1`` on window layers, else 0) or, on DSA layers once the
  row has more candidates than the indexer keeps, the selected positions -- and keeps an
  online softmax over ``[heads, keys]`` scores. All heads of a row share the keys (one latent
  per token), so a key block is loaded once and both products are ``tl.dot``s. The share of
  each split is ``cdiv(keys, SPLITS)`` rounded up to whole blocks (at least ``MIN_SPLIT``
  keys): a long row fills the GPU, a short one runs few programs, and the grid never depends
  on a host value (the step is captured in a CUDA graph). A second kernel merges the splits'
  partial sums by log-sum-exp. The sinks and the history are walked in two loops, so that every
  key block is read through one base pointer (vectorised, pipelined loads).
* ``mla_decode_out_triton``: the same attention whose merge (a program per row and head, the
  context in registers) multiplies by ``w_uv[h]^T`` and stores o_proj's fp16 input: merge, value
  product and cast in one launch.
* ``mla_q_prologue_triton``: from ``q_b_proj``'s fp16 output, ``q_abs = q_nope @ w_uk[h]`` and the
  NEOX-rotated ``q_pe`` in one launch (instead of a cast, a split, an einsum and the RoPE ops).
* ``index_scores_triton``: ``I[pos] = sum_g w_g relu(q_g . k_pos)`` for the row's candidates
  (``lo .. pos``), ``-inf`` everywhere else in a ``[n, capacity]`` row indexed by position --
  the layout the PyTorch path hands ``torch.topk``, so the top-k (ties included) is picked
  from the same arrangement. Blocks outside ``lo .. pos`` are only filled with ``-inf``.

``kernels/reference/mla.py`` holds the PyTorch definitions these are tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher

# launch defaults (bench/mla_decode.py --sweep measures them on a GPU)
# The decode path runs PRECISION "fp16": q_abs, q_pe and the keys enter tl.dot as fp16 (the cache holds fp16
# latents already; the sinks are rounded to fp16 like any cached latent) with fp32 accumulation, and the
# probabilities enter the second product as fp16 (0..1 after the running maximum, relative rounding 2^-11, as
# FlashAttention does; the denominator sums them in fp32). Why fp16 and not bf16 for q_abs: q_nope is
# q_b_proj's fp16 output and w_uk holds kv_b's fp16 values, so |q_abs| <= 128 max|q_nope| max|w_uk|, which
# overflows fp16 only past max|q_nope| max|w_uk| = 512 -- q_b_proj maps an RMS-normed latent (entries O(1-10))
# and kv_b's entries are O(0.1) -- and fp16 keeps 3 more mantissa bits than bf16 (no per-row scale needed).
# Compiled for sm_90 on a CPU at Flash shapes (R=512, P=64, DSA selection; bench/mla_decode.py --resources),
# registers / spill stack / shared memory per program: 16 heads, 32-key blocks, 8 warps, 2 stages
# 198 / 0 / 57 KB (3 stages: 176 / 0 / 93 KB); 32 heads: 225 / 0 / 76 KB; 64-key blocks: 255 / 184 B spilled;
# 4 warps: 255 / 128 B (with 4 warps every warp holds the whole [16, 512] q operand). The old default, fp32
# operands with tf32x3, 16-key blocks, 1 stage: 168 registers, 2.3 KB spilled, 141 KB, one program per SM.
BLOCK_H = 16  # heads per program (tl.dot's M); Flash's 48 heads: 3 programs per (row, split)
BLOCK_N = 32  # keys per block
SPLITS = 32  # most programs per (row, head block) along the keys
# fewest keys a split takes: a short row runs few programs (cdiv(keys, MIN_SPLIT)), a long one SPLITS. Measured
# with the old tf32x3 kernel (H100, Flash shapes, batch 1): 32 keys gave 51-60 us per sliding layer against
# 166-182 us with 128.
MIN_SPLIT = 32
PRECISION = "fp16"
# measured (bench/mla_decode.py --sweep, H100, Flash shapes, each variant's time less ~13 us of graph launch):
# 1 stage beat 2 and 3 at every layer kind, position and batch (the walks are a few blocks long)
NUM_STAGES = 1
NUM_WARPS = 8
R_PARTS = 1  # programs per (row, split, head block) along the latent's columns (each accumulates its share)
OUT_BLOCK_V = 16  # output columns per step of the merge's w_uv product
# the merges hold every split's partial context [SPLITS, R] fp32 at once: with 4 warps that is 168 registers at
# SPLITS 32 and spills at 64 (sm_90 compile); 8 warps: 56 / 110
MERGE_WARPS = 8
PROLOGUE_BLOCK_R = 128  # q_abs columns per prologue program
INDEX_PRECISION = "tf32x3"  # the indexer's scores decide the selection: kept at the reference's accuracy
INDEX_BLOCK_N = 64
# positions per index-score program: at 1024 a row at position 4096 kept 4 programs busy walking 16 blocks each
# (index scores ~42 us a DSA layer on the H100); 128: 33 programs of 2 blocks
INDEX_SPAN = 128


@triton.jit
def _attend_block(q, qpe, kc, kp, kv, visible, m, denom, acc, scale_log2, HALF: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One key block of the online softmax: scores ``q . kc + qpe . kp`` (log2 units) of the ``visible`` keys,
    the running maximum ``m``, denominator and ``acc += probs @ kv``, rescaled to the new maximum."""
    if HALF:  # fp16 operands, fp32 accumulation; the probabilities (0..1) rounded to fp16 for the second product
        s = tl.dot(q, tl.trans(kc))
        s = tl.dot(qpe, tl.trans(kp), s)
    else:
        s = tl.dot(q, tl.trans(kc), input_precision=PRECISION)
        s += tl.dot(qpe, tl.trans(kp), input_precision=PRECISION)
    s = tl.where(visible[None, :], s * scale_log2, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep everything at 0
    alpha = tl.exp2(m - base)
    probs = tl.exp2(s - base[:, None])
    denom = denom * alpha + tl.sum(probs, 1)
    if HALF:
        acc = tl.dot(probs.to(kv.dtype), kv, acc * alpha[:, None])
    else:
        acc = acc * alpha[:, None] + tl.dot(probs, kv, input_precision=PRECISION)
    return m_new, denom, acc


@triton.jit
def _key_block(c_rows, pe_rows, ok, r, d, rv, rank, rope_dim, OP: tl.constexpr, R_PARTS: tl.constexpr):
    """A key block from per-key row pointers, as ``OP``: latents ``[BLOCK_N, R]``, rotary keys
    ``[BLOCK_N, P]`` and the latent columns ``rv`` this program accumulates (the latents themselves
    unless ``R_PARTS`` > 1). Rows not ``ok`` read as 0."""
    kc = tl.load(c_rows[:, None] + r[None, :], mask=ok[:, None] & (r < rank)[None, :], other=0.0).to(OP)
    kp = tl.load(pe_rows[:, None] + d[None, :], mask=ok[:, None] & (d < rope_dim)[None, :], other=0.0).to(OP)
    kv = kc
    if R_PARTS > 1:
        kv = tl.load(c_rows[:, None] + rv[None, :], mask=ok[:, None] & (rv < rank)[None, :], other=0.0).to(OP)
    return kc, kp, kv


@triton.jit
def _mla_split_kernel(q_ptr, qpe_ptr, sink_c_ptr, sink_pe_ptr, c_ptr, kpe_ptr, table_ptr, pos_ptr, sel_ptr,
                      acc_ptr, ml_ptr, heads, rank, rope_dim, n_sinks, window, sel_k, page_size, scale_log2,
                      stride_qn, stride_qh, stride_pn, stride_ph, stride_c, stride_kpe, stride_table, stride_sel,
                      R: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                      SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      HAS_SEL: tl.constexpr, PRECISION: tl.constexpr, HALF: tl.constexpr,
                      R_PARTS: tl.constexpr):
    """Program ``(row, split, head block * R_PARTS + r part)``: every program scores its keys over the whole
    latent; with ``R_PARTS`` > 1 each accumulates ``probs @ c`` for its ``R / R_PARTS`` columns only (its
    accumulator in registers shrinks as much; the key block is read again from L1 for those columns)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    h = (tl.program_id(2) // R_PARTS) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < heads
    r = tl.arange(0, R)
    RV: tl.constexpr = R // R_PARTS
    rv = (tl.program_id(2) % R_PARTS) * RV + tl.arange(0, RV)
    d = tl.arange(0, P)
    r_ok = r < rank
    d_ok = d < rope_dim

    pos = tl.load(pos_ptr + row).to(tl.int64)
    lo = tl.maximum(pos - window + 1, 0) if HAS_WINDOW else pos * 0
    candidates = pos - lo + 1
    selecting = candidates > sel_k if HAS_SEL else candidates < 0  # fewer candidates than kept: all of them
    count = tl.where(selecting, sel_k, candidates)
    total = n_sinks + count
    per = tl.maximum(tl.cdiv(tl.cdiv(total, SPLITS), BLOCK_N) * BLOCK_N, MIN_SPLIT)
    start = split * per
    end = tl.minimum(start + per, total)

    # HALF: fp16 operands (fp32 accumulation); else fp32 operands at PRECISION
    OP: tl.constexpr = tl.float16 if HALF else tl.float32
    q = tl.load(q_ptr + row * stride_qn + h[:, None] * stride_qh + r[None, :],
                mask=h_ok[:, None] & r_ok[None, :], other=0.0).to(OP)
    qpe = tl.load(qpe_ptr + row * stride_pn + h[:, None] * stride_ph + d[None, :],
                  mask=h_ok[:, None] & d_ok[None, :], other=0.0).to(OP)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, RV], tl.float32)
    # the split's keys: first its share of the sink entries (always visible), then its history positions --
    # two loops, so that each key block is read through one base pointer (a per-key choice between two
    # tensors would cost Triton the vectorised, pipelined loads)
    sink_end = tl.minimum(end, n_sinks)
    for k0 in range(start, sink_end, BLOCK_N):
        j = k0 + tl.arange(0, BLOCK_N)
        live = j < sink_end
        kc, kp, kv = _key_block(sink_c_ptr + j * rank, sink_pe_ptr + j * rope_dim, live, r, d, rv, rank, rope_dim,
                                OP, R_PARTS)
        m, denom, acc = _attend_block(q, qpe, kc, kp, kv, live, m, denom, acc, scale_log2, HALF, PRECISION)
    for k0 in range(tl.maximum(start, n_sinks), end, BLOCK_N):
        t = k0 - n_sinks + tl.arange(0, BLOCK_N)  # the history entry's index among the row's visible ones
        hist = t < end - n_sinks
        if HAS_SEL:
            # (a scalar condition folded into an index bound: the interpreter takes only block masks)
            picked = tl.load(sel_ptr + row * stride_sel + t, mask=hist & (t < tl.where(selecting, sel_k, 0)),
                             other=-1).to(tl.int64)
            p = tl.where(selecting, picked, lo + t)
        else:
            p = lo + t
        hist = hist & (p >= lo) & (p <= pos)
        page = tl.load(table_ptr + row * stride_table + p // page_size, mask=hist, other=-1).to(tl.int64)
        hist = hist & (page >= 0)  # an unused page-table entry is never read
        where = page * page_size + p % page_size
        kc, kp, kv = _key_block(c_ptr + where * stride_c, kpe_ptr + where * stride_kpe, hist, r, d, rv, rank,
                                rope_dim, OP, R_PARTS)
        m, denom, acc = _attend_block(q, qpe, kc, kp, kv, hist, m, denom, acc, scale_log2, HALF, PRECISION)

    part = (row * SPLITS + split) * heads + h
    # the r parts' scores, maxima and sums are the same: the first writes them (a block mask: the interpreter
    # takes no scalar in one)
    first = h_ok & (h * 0 + tl.program_id(2) % R_PARTS == 0)
    tl.store(ml_ptr + part * 2, m, mask=first)
    tl.store(ml_ptr + part * 2 + 1, denom, mask=first)
    # an empty split writes only m = -inf: the merge skips it without reading its sums
    written = h_ok[:, None] & (rv[None, :] < tl.where(start < end, R, 0))
    tl.store(acc_ptr + part[:, None] * R + rv[None, :], acc, mask=written)


@triton.jit
def _merged_context(acc_ptr, ml_ptr, row, h, heads, R: tl.constexpr, SPLITS: tl.constexpr):
    """Row ``row``'s latent context ``[R]`` fp32 for head ``h``: the splits' partial sums weighted by log-sum-exp."""
    s = tl.arange(0, SPLITS)
    r = tl.arange(0, R)
    part = (row * SPLITS + s) * heads + h
    m = tl.load(ml_ptr + part * 2)
    denom = tl.load(ml_ptr + part * 2 + 1)
    used = m > float("-inf")
    top = tl.max(m, 0)
    weight = tl.where(used, tl.exp2(m - tl.where(top == float("-inf"), 0.0, top)), 0.0)
    acc = tl.load(acc_ptr + part[:, None] * R + r[None, :], mask=used[:, None], other=0.0)
    total = tl.sum(weight * denom, 0)
    return tl.sum(weight[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)


@triton.jit
def _mla_merge_kernel(acc_ptr, ml_ptr, out_ptr, heads, rank, stride_on, stride_oh,
                      R: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, R)
    ctx = _merged_context(acc_ptr, ml_ptr, row, h, heads, R, SPLITS)
    tl.store(out_ptr + row * stride_on + h * stride_oh + r, ctx, mask=r < rank)


@triton.jit
def _mla_merge_out_kernel(acc_ptr, ml_ptr, wuv_ptr, out_ptr, heads, rank, v_dim, stride_wh, stride_wv, stride_on,
                          R: tl.constexpr, SPLITS: tl.constexpr, BLOCK_V: tl.constexpr, V_PER: tl.constexpr):
    """Program ``(row, head, v part)``: the merged context (held in registers) times ``w_uv[h]^T`` for
    ``V_PER`` output columns, stored fp16 at ``out[row, h * v_dim + v]`` (o_proj's input layout)."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, R)
    ctx = _merged_context(acc_ptr, ml_ptr, row, h, heads, R, SPLITS)
    for v0 in range(tl.program_id(2) * V_PER, tl.program_id(2) * V_PER + V_PER, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        v_ok = v < v_dim
        w = tl.load(wuv_ptr + h * stride_wh + v[:, None] * stride_wv + r[None, :],
                    mask=v_ok[:, None] & (r[None, :] < rank), other=0.0).to(tl.float32)
        o = tl.sum(w * ctx[None, :], 1)
        tl.store(out_ptr + row * stride_on + h * v_dim + v, o.to(out_ptr.dtype.element_ty), mask=v_ok)


@triton.jit
def _mla_q_prologue_kernel(q_ptr, wuk_ptr, cos_ptr, sin_ptr, qabs_ptr, qpe_ptr, n, nope, rope_dim, rank,
                           stride_qn, stride_qh, stride_wh, stride_wd, stride_cos, stride_sin, stride_an, stride_ah,
                           stride_pn, stride_ph, BLOCK_M: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    """Program ``(row block, head, rank block)``: ``q_abs[m, h, r] = q_nope[m, h] . w_uk[h, :, r]`` (fp16
    operands, fp32 accumulation, fp16 out) and, in the first rank block, the NEOX-rotated ``q_pe``
    ``x * cos + roll(x, P/2) * sin_folded`` (arch/blocks/rope.py ``rotate_neox_folded``)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, D)
    m_ok = m < n
    x = tl.load(q_ptr + m[:, None] * stride_qn + h * stride_qh + d[None, :],
                mask=m_ok[:, None] & (d[None, :] < nope), other=0.0).to(tl.float16)
    w = tl.load(wuk_ptr + h * stride_wh + d[:, None] * stride_wd + rr[None, :],
                mask=(d[:, None] < nope) & (rr[None, :] < rank), other=0.0).to(tl.float16)
    q_abs = tl.dot(x, w)
    tl.store(qabs_ptr + m[:, None] * stride_an + h * stride_ah + rr[None, :], q_abs.to(qabs_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (rr[None, :] < rank))
    if tl.program_id(2) == 0:
        e = tl.arange(0, P)
        e_ok = e < rope_dim
        ok = m_ok[:, None] & e_ok[None, :]
        rolled = (e + rope_dim // 2) % rope_dim
        base = q_ptr + m[:, None] * stride_qn + h * stride_qh + nope
        xe = tl.load(base + e[None, :], mask=ok, other=0.0).to(tl.float32)
        xr = tl.load(base + rolled[None, :], mask=ok, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + m[:, None] * stride_cos + e[None, :], mask=ok, other=0.0)
        sin = tl.load(sin_ptr + m[:, None] * stride_sin + e[None, :], mask=ok, other=0.0)
        tl.store(qpe_ptr + m[:, None] * stride_pn + h * stride_ph + e[None, :],
                 (xe * cos + xr * sin).to(qpe_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _index_scores_kernel(q_ptr, w_ptr, k_ptr, table_ptr, pos_ptr, out_ptr, groups, head_dim, capacity, window,
                         page_size, stride_qn, stride_qg, stride_wn, stride_k, stride_table, stride_out,
                         D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SPAN: tl.constexpr,
                         HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    row = tl.program_id(0)
    begin = tl.program_id(1) * SPAN
    pos = tl.load(pos_ptr + row).to(tl.int64)
    lo = tl.maximum(pos - window + 1, 0) if HAS_WINDOW else pos * 0
    g = tl.arange(0, BLOCK_G)
    e = tl.arange(0, D)
    g_ok = g < groups
    e_ok = e < head_dim
    q = tl.load(q_ptr + row * stride_qn + g[:, None] * stride_qg + e[None, :],
                mask=g_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + row * stride_wn + g, mask=g_ok, other=0.0).to(tl.float32)
    for k0 in range(begin, begin + SPAN, BLOCK_N):
        p = k0 + tl.arange(0, BLOCK_N)
        score = tl.full([BLOCK_N], float("-inf"), tl.float32)
        if (k0 <= pos) & (k0 + BLOCK_N > lo):  # only blocks holding candidates read keys
            cand = (p >= lo) & (p <= pos)
            page = tl.load(table_ptr + row * stride_table + p // page_size, mask=cand, other=-1).to(tl.int64)
            cand = cand & (page >= 0)
            keys = tl.load(k_ptr + (page * page_size + p % page_size)[:, None] * stride_k + e[None, :],
                           mask=cand[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
            dots = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
            score = tl.where(cand, tl.sum(w[:, None] * tl.maximum(dots, 0.0), 0), float("-inf"))
        tl.store(out_ptr + row * stride_out + p, score, mask=p < capacity)


_split = FastLauncher(_mla_split_kernel)
_merge = FastLauncher(_mla_merge_kernel)
_merge_out = FastLauncher(_mla_merge_out_kernel)
_prologue = FastLauncher(_mla_q_prologue_kernel)
_index = FastLauncher(_index_scores_kernel)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """The cache tensor ``[pages, page_size, E]`` as flat rows ``[pages * page_size, E]``."""
    if t.dim() != 3 or t.stride(-1) != 1 or t.stride(0) != t.shape[1] * t.stride(1):
        raise ValueError(f"MLA decode: cache tensor {name!r} must be [pages, page_size, E] with contiguous entries")
    return t.flatten(0, 1)


def _split_partials(q_abs, q_pe, sink_c, sink_pe, c, kpe, table, positions, scale, window, selected, block_h,
                    block_n, splits, min_split, precision, num_warps, num_stages, r_parts):
    """Checks the inputs and runs the split kernel: each split's partial sums ``acc [n, splits, H, R]`` and
    running max / denominator ``ml [n, splits, H, 2]`` (None when ``n`` is 0), and ``R``."""
    n, heads, rank = q_abs.shape
    rope_dim = q_pe.shape[-1]
    c_rows, kpe_rows = _rows(c, "c"), _rows(kpe, "kpe")
    if q_abs.stride(-1) != 1 or q_pe.stride(-1) != 1 or q_pe.shape[:2] != (n, heads):
        raise ValueError("MLA decode: q_abs [n, H, R] and q_pe [n, H, P] need contiguous last dimensions")
    if c.shape[-1] != rank or kpe.shape[-1] != rope_dim or sink_c.shape != (sink_pe.shape[0], rank) \
            or sink_pe.shape[-1] != rope_dim:
        raise ValueError(f"MLA decode: cache/sink widths {tuple(c.shape)}, {tuple(kpe.shape)}, "
                         f"{tuple(sink_c.shape)}, {tuple(sink_pe.shape)} do not match q (R={rank}, P={rope_dim})")
    half = precision == "fp16"
    if not sink_c.dtype.is_floating_point or sink_pe.dtype != sink_c.dtype or not sink_c.is_contiguous() \
            or not sink_pe.is_contiguous():
        raise ValueError(f"MLA decode: sink_c and sink_pe must be contiguous, of one floating dtype; got "
                         f"{sink_c.dtype} / {sink_pe.dtype}")
    if table.shape[0] != n or positions.shape != (n,):
        raise ValueError(f"MLA decode: page table {tuple(table.shape)} / positions {tuple(positions.shape)} "
                         f"need one row per query ({n})")
    if splits & (splits - 1) or min_split % block_n:
        raise ValueError("MLA decode: splits must be a power of two and min_split a multiple of block_n")
    if precision not in ("fp16", "tf32", "tf32x3", "ieee"):
        raise ValueError(f"MLA decode: precision {precision!r} is not one of fp16, tf32, tf32x3, ieee")
    R = triton.next_power_of_2(rank)
    if r_parts & (r_parts - 1) or R // r_parts < 16 or (r_parts > 1 and precision != "fp16"):
        raise ValueError(f"MLA decode: r_parts {r_parts} must be a power of two leaving 16+ columns, "
                         f"and 1 unless precision is fp16")
    if selected is not None and (selected.shape[0] != n or selected.stride(-1) != 1):
        raise ValueError(f"MLA decode: selected {tuple(selected.shape)} must be [n={n}, k], contiguous")
    P = max(16, triton.next_power_of_2(rope_dim))
    if n == 0:
        return None, None, R
    acc = torch.empty(n, splits, heads, R, device=q_abs.device, dtype=torch.float32)
    ml = torch.empty(n, splits, heads, 2, device=q_abs.device, dtype=torch.float32)
    sel = selected if selected is not None else positions
    sel_k = selected.shape[1] if selected is not None else 0
    grid = (n, splits, triton.cdiv(heads, block_h) * r_parts)
    _split(grid, q_abs, q_pe, sink_c, sink_pe, c_rows, kpe_rows, table, positions, sel, acc, ml, heads, rank,
           rope_dim, sink_c.shape[0], window or 0, sel_k, c.shape[1], scale * 1.4426950408889634,
           q_abs.stride(0), q_abs.stride(1), q_pe.stride(0), q_pe.stride(1), c_rows.stride(0), kpe_rows.stride(0),
           table.stride(0), sel.stride(0), R=R, P=P, BLOCK_H=block_h, BLOCK_N=block_n, SPLITS=splits,
           MIN_SPLIT=min_split, HAS_WINDOW=window is not None, HAS_SEL=selected is not None,
           PRECISION="ieee" if half else precision, HALF=half, R_PARTS=r_parts, num_warps=num_warps,
           num_stages=num_stages)
    return acc, ml, R


def mla_decode_triton(q_abs: torch.Tensor, q_pe: torch.Tensor, sink_c: torch.Tensor, sink_pe: torch.Tensor,
                      c: torch.Tensor, kpe: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, *,
                      scale: float, window: int | None = None, selected: torch.Tensor | None = None,
                      block_h: int = BLOCK_H, block_n: int = BLOCK_N, splits: int = SPLITS,
                      min_split: int = MIN_SPLIT, precision: str = PRECISION, num_warps: int = NUM_WARPS,
                      num_stages: int = NUM_STAGES, r_parts: int = 1) -> torch.Tensor:
    """Absorbed MLA attention of one query per row -> the latent context ``ctx [n, H, R]`` fp32.

    ``q_abs [n, H, R]``, ``q_pe [n, H, P]``; ``sink_c [L, R]`` / ``sink_pe [L, P]`` (always visible,
    ``L`` may be 0; rounded to the operands' dtype); the cache ``c [pages, page_size, R]``,
    ``kpe [pages, page_size, P]``
    (each row's own entry already written); ``table [n, max_pages]`` (int32, -1 = unused) maps
    the row's logical page ``position // page_size`` to a cache page; ``positions [n]``.
    ``selected [n, k]``: the DSA selection, cache positions picked by the indexer (``torch.topk``
    of ``index_scores_triton``); used only by rows with more than ``k`` candidates (the others
    see all of theirs). ``precision``: "fp16" rounds q, the keys and the sinks to fp16 for the
    products (fp32 accumulation); "tf32x3" / "tf32" / "ieee" keep fp32 operands."""
    n, heads, rank = q_abs.shape
    acc, ml, R = _split_partials(q_abs, q_pe, sink_c, sink_pe, c, kpe, table, positions, scale, window, selected,
                                 block_h, block_n, splits, min_split, precision, num_warps, num_stages, r_parts)
    out = torch.empty(n, heads, rank, device=q_abs.device, dtype=torch.float32)
    if n:
        _merge((n, heads), acc, ml, out, heads, rank, out.stride(0), out.stride(1), R=R, SPLITS=splits,
               num_warps=MERGE_WARPS, num_stages=1)
    return out


def mla_decode_out_triton(q_abs: torch.Tensor, q_pe: torch.Tensor, sink_c: torch.Tensor, sink_pe: torch.Tensor,
                          c: torch.Tensor, kpe: torch.Tensor, table: torch.Tensor, positions: torch.Tensor,
                          w_uv: torch.Tensor, *, scale: float, window: int | None = None,
                          selected: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                          block_h: int = BLOCK_H, block_n: int = BLOCK_N, splits: int = SPLITS,
                          min_split: int = MIN_SPLIT, precision: str = PRECISION, num_warps: int = NUM_WARPS,
                          num_stages: int = NUM_STAGES, r_parts: int = R_PARTS, out_block_v: int = OUT_BLOCK_V,
                          v_parts: int | None = None) -> torch.Tensor:
    """``mla_decode_triton`` followed by the value up-projection, in the merge: ``o [n, H * V]`` with
    ``o[:, h*V:(h+1)*V] = ctx[:, h] @ w_uv[h]^T`` (``w_uv [H, V, R]``, fp32 products of the fp32 context
    and the weights, rounded to ``out_dtype`` once). ``v_parts``: programs per (row, head) along V (each
    merges the splits again); by default ``4 // n`` (at least 1): more programs for one or two rows."""
    n, heads, rank = q_abs.shape
    if w_uv.dim() != 3 or w_uv.shape[0] != heads or w_uv.shape[2] != rank or w_uv.stride(-1) != 1:
        raise ValueError(f"MLA decode: w_uv {tuple(w_uv.shape)} must be [H={heads}, V, R={rank}] with contiguous R")
    v_dim = w_uv.shape[1]
    acc, ml, R = _split_partials(q_abs, q_pe, sink_c, sink_pe, c, kpe, table, positions, scale, window, selected,
                                 block_h, block_n, splits, min_split, precision, num_warps, num_stages, r_parts)
    out = torch.empty(n, heads * v_dim, device=q_abs.device, dtype=out_dtype)
    if n:
        # measured (H100, Flash shapes): at one row 2-4 parts saved 2-5 us a layer, at 8 rows they cost 1-4 us
        v_parts = v_parts or max(1, 4 // n)
        v_per = triton.cdiv(triton.cdiv(v_dim, v_parts), out_block_v) * out_block_v
        _merge_out((n, heads, triton.cdiv(v_dim, v_per)), acc, ml, w_uv, out, heads, rank, v_dim, w_uv.stride(0),
                   w_uv.stride(1), out.stride(0), R=R, SPLITS=splits, BLOCK_V=out_block_v, V_PER=v_per,
                   num_warps=MERGE_WARPS, num_stages=1)
    return out


def mla_q_prologue_triton(q: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor, *,
                          block_r: int = PROLOGUE_BLOCK_R, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``q_b_proj``'s output ``q [n, H, nope + P]`` (fp16): ``q_abs [n, H, R] = q_nope @ w_uk[h]``
    (``w_uk [H, nope, R]``, fp16 operands, fp32 accumulation) and the NEOX-rotated ``q_pe [n, H, P]``
    (``cos`` / ``sin_folded [n, P]`` fp32, as ``MLAAttention._rope_tables`` gives them), both fp16,
    in one launch."""
    n, heads, width = q.shape
    if w_uk.dim() != 3 or w_uk.shape[0] != heads or w_uk.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError(f"MLA q prologue: q {tuple(q.shape)} / w_uk {tuple(w_uk.shape)} must be [n, H, nope + P] "
                         f"and [H={heads}, nope, R], contiguous last dimensions")
    nope, rank = w_uk.shape[1], w_uk.shape[2]
    rope_dim = width - nope
    cos, sin_folded = cos.float(), sin_folded.float()
    if cos.shape != (n, rope_dim) or sin_folded.shape != (n, rope_dim) or rope_dim % 2 \
            or cos.stride(-1) != 1 or sin_folded.stride(-1) != 1:
        raise ValueError(f"MLA q prologue: cos {tuple(cos.shape)} / sin {tuple(sin_folded.shape)} must be "
                         f"[n={n}, P={rope_dim}] (P even) with contiguous rows")
    q_abs = torch.empty(n, heads, rank, device=q.device, dtype=torch.float16)
    q_pe = torch.empty(n, heads, rope_dim, device=q.device, dtype=torch.float16)
    if n:
        block_m = 16  # tl.dot's smallest M: decode batches are a few rows
        _prologue((triton.cdiv(n, block_m), heads, triton.cdiv(rank, block_r)), q, w_uk, cos,
                  sin_folded, q_abs, q_pe, n, nope, rope_dim, rank, q.stride(0), q.stride(1),
                  w_uk.stride(0), w_uk.stride(1), cos.stride(0), sin_folded.stride(0), q_abs.stride(0),
                  q_abs.stride(1), q_pe.stride(0), q_pe.stride(1), BLOCK_M=block_m,
                  D=max(16, triton.next_power_of_2(nope)), P=max(16, triton.next_power_of_2(rope_dim)),
                  BLOCK_R=block_r, num_warps=num_warps, num_stages=1)
    return q_abs, q_pe


def index_scores_triton(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, table: torch.Tensor,
                        positions: torch.Tensor, *, window: int | None = None, block_n: int = INDEX_BLOCK_N,
                        span: int = INDEX_SPAN, precision: str = INDEX_PRECISION, num_warps: int = 4) -> torch.Tensor:
    """The lightning indexer's scores ``[n, capacity]`` fp32 (``capacity = table.shape[1] * page_size``):
    column ``s`` holds ``sum_g w[g] * relu(q[g] . k_s)`` where position ``s`` is one of the row's
    candidates (``lo .. pos``), else ``-inf``. ``q [n, G, D]``, ``w [n, G]`` fp32; ``keys``: the
    indexer-key cache ``[pages, page_size, D]``."""
    n, groups, head_dim = q.shape
    rows = _rows(keys, "kidx")
    if keys.shape[-1] != head_dim or w.shape != (n, groups) or q.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError(f"index scores: q {tuple(q.shape)}, w {tuple(w.shape)}, keys {tuple(keys.shape)} disagree")
    if table.shape[0] != n or positions.shape != (n,):
        raise ValueError(f"index scores: page table {tuple(table.shape)} / positions {tuple(positions.shape)} "
                         f"need one row per query ({n})")
    page_size = keys.shape[1]
    capacity = table.shape[1] * page_size
    span = max(block_n, min(span, triton.next_power_of_2(capacity)))
    out = torch.empty(n, capacity, device=q.device, dtype=torch.float32)
    if n and capacity:
        _index((n, triton.cdiv(capacity, span)), q, w, rows, table, positions, out, groups, head_dim, capacity,
               window or 0, page_size, q.stride(0), q.stride(1), w.stride(0), rows.stride(0), table.stride(0),
               out.stride(0), D=max(16, triton.next_power_of_2(head_dim)),
               BLOCK_G=max(16, triton.next_power_of_2(groups)), BLOCK_N=block_n, SPAN=span,
               HAS_WINDOW=window is not None, PRECISION=precision, num_warps=num_warps, num_stages=2)
    return out
