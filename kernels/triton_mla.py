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
  partial sums by log-sum-exp.
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

# launch defaults (bench/mla_decode.py sweeps them on a GPU)
# Shared memory per program at Flash shapes (R=512, P=64), compiled for sm_90 on a CPU: block_n 16,
# tf32x3, 1 stage: 141 KB; 2 stages: 178 KB; block_n 32: 209 KB / 283 KB (over the H100's 227 KB);
# block_n 32 with plain tf32: 111 KB / 185 KB. The default is the most accurate setting that fits.
BLOCK_H = 16  # heads per program: the smallest tl.dot M
BLOCK_N = 16  # keys per block
SPLITS = 32  # most programs per (row, head block) along the keys
# fewest keys a split takes. Measured (bench/mla_decode.py --sweep, H100, Flash shapes, batch 1): 32 keys gave
# 51-60 us per sliding layer and 242 us per DSA layer (with its index scores and top-k at a 32k capacity)
# against 166-182 / 299 us with 128: a program walks its keys slowly, so more, shorter splits win.
MIN_SPLIT = 32
PRECISION = "tf32x3"  # fp32 products at nearly fp32 accuracy on tensor cores (the reference is fp32)
NUM_STAGES = 1
INDEX_BLOCK_N = 64
INDEX_SPAN = 1024  # positions per index-score program


@triton.jit
def _mla_split_kernel(q_ptr, qpe_ptr, sink_c_ptr, sink_pe_ptr, c_ptr, kpe_ptr, table_ptr, pos_ptr, sel_ptr,
                      acc_ptr, ml_ptr, heads, rank, rope_dim, n_sinks, window, sel_k, page_size, scale_log2,
                      stride_qn, stride_qh, stride_pn, stride_ph, stride_c, stride_kpe, stride_table, stride_sel,
                      R: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                      SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      HAS_SEL: tl.constexpr, PRECISION: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < heads
    r = tl.arange(0, R)
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

    q = tl.load(q_ptr + row * stride_qn + h[:, None] * stride_qh + r[None, :],
                mask=h_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    qpe = tl.load(qpe_ptr + row * stride_pn + h[:, None] * stride_ph + d[None, :],
                  mask=h_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R], tl.float32)
    for k0 in range(start, end, BLOCK_N):
        j = k0 + tl.arange(0, BLOCK_N)
        live = j < end
        sink = live & (j < n_sinks)
        t = j - n_sinks
        hist = live & (t >= 0)
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
        kc = tl.where(sink[:, None],
                      tl.load(sink_c_ptr + j[:, None] * rank + r[None, :], mask=sink[:, None] & r_ok[None, :],
                              other=0.0),
                      tl.load(c_ptr + where[:, None] * stride_c + r[None, :], mask=hist[:, None] & r_ok[None, :],
                              other=0.0).to(tl.float32))
        kp = tl.where(sink[:, None],
                      tl.load(sink_pe_ptr + j[:, None] * rope_dim + d[None, :], mask=sink[:, None] & d_ok[None, :],
                              other=0.0),
                      tl.load(kpe_ptr + where[:, None] * stride_kpe + d[None, :], mask=hist[:, None] & d_ok[None, :],
                              other=0.0).to(tl.float32))
        s = tl.dot(q, tl.trans(kc), input_precision=PRECISION)
        s += tl.dot(qpe, tl.trans(kp), input_precision=PRECISION)
        s = tl.where((sink | hist)[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep everything at 0
        alpha = tl.exp2(m - base)
        probs = tl.exp2(s - base[:, None])
        denom = denom * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + tl.dot(probs, kc, input_precision=PRECISION)
        m = m_new

    part = (row * SPLITS + split) * heads + h
    tl.store(ml_ptr + part * 2, m, mask=h_ok)
    tl.store(ml_ptr + part * 2 + 1, denom, mask=h_ok)
    # an empty split writes only m = -inf: the merge skips it without reading its sums
    written = h_ok[:, None] & (r[None, :] < tl.where(start < end, R, 0))
    tl.store(acc_ptr + part[:, None] * R + r[None, :], acc, mask=written)


@triton.jit
def _mla_merge_kernel(acc_ptr, ml_ptr, out_ptr, heads, rank, stride_on, stride_oh,
                      R: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1)
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
    ctx = tl.sum(weight[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * stride_on + h * stride_oh + r, ctx, mask=r < rank)


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
_index = FastLauncher(_index_scores_kernel)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """The cache tensor ``[pages, page_size, E]`` as flat rows ``[pages * page_size, E]``."""
    if t.dim() != 3 or t.stride(-1) != 1 or t.stride(0) != t.shape[1] * t.stride(1):
        raise ValueError(f"MLA decode: cache tensor {name!r} must be [pages, page_size, E] with contiguous entries")
    return t.flatten(0, 1)


def mla_decode_triton(q_abs: torch.Tensor, q_pe: torch.Tensor, sink_c: torch.Tensor, sink_pe: torch.Tensor,
                      c: torch.Tensor, kpe: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, *,
                      scale: float, window: int | None = None, selected: torch.Tensor | None = None,
                      block_h: int = BLOCK_H, block_n: int = BLOCK_N, splits: int = SPLITS,
                      min_split: int = MIN_SPLIT, precision: str = PRECISION, num_warps: int = 4,
                      num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Absorbed MLA attention of one query per row -> the latent context ``ctx [n, H, R]`` fp32.

    ``q_abs [n, H, R]``, ``q_pe [n, H, P]``; ``sink_c [L, R]`` / ``sink_pe [L, P]`` fp32 (always
    visible, ``L`` may be 0); the cache ``c [pages, page_size, R]``, ``kpe [pages, page_size, P]``
    (each row's own entry already written); ``table [n, max_pages]`` (int32, -1 = unused) maps
    the row's logical page ``position // page_size`` to a cache page; ``positions [n]``.
    ``selected [n, k]``: the DSA selection, cache positions picked by the indexer (``torch.topk``
    of ``index_scores_triton``); used only by rows with more than ``k`` candidates (the others
    see all of theirs)."""
    n, heads, rank = q_abs.shape
    rope_dim = q_pe.shape[-1]
    c_rows, kpe_rows = _rows(c, "c"), _rows(kpe, "kpe")
    if q_abs.stride(-1) != 1 or q_pe.stride(-1) != 1 or q_pe.shape[:2] != (n, heads):
        raise ValueError("MLA decode: q_abs [n, H, R] and q_pe [n, H, P] need contiguous last dimensions")
    if c.shape[-1] != rank or kpe.shape[-1] != rope_dim or sink_c.shape != (sink_pe.shape[0], rank) \
            or sink_pe.shape[-1] != rope_dim:
        raise ValueError(f"MLA decode: cache/sink widths {tuple(c.shape)}, {tuple(kpe.shape)}, "
                         f"{tuple(sink_c.shape)}, {tuple(sink_pe.shape)} do not match q (R={rank}, P={rope_dim})")
    if sink_c.dtype != torch.float32 or sink_pe.dtype != torch.float32 or not sink_c.is_contiguous() \
            or not sink_pe.is_contiguous():
        raise ValueError("MLA decode: sink_c and sink_pe must be contiguous fp32")
    if table.shape[0] != n or positions.shape != (n,):
        raise ValueError(f"MLA decode: page table {tuple(table.shape)} / positions {tuple(positions.shape)} "
                         f"need one row per query ({n})")
    if splits & (splits - 1) or min_split % block_n:
        raise ValueError("MLA decode: splits must be a power of two and min_split a multiple of block_n")
    if selected is not None and (selected.shape[0] != n or selected.stride(-1) != 1):
        raise ValueError(f"MLA decode: selected {tuple(selected.shape)} must be [n={n}, k], contiguous")
    R, P = triton.next_power_of_2(rank), max(16, triton.next_power_of_2(rope_dim))
    out = torch.empty(n, heads, rank, device=q_abs.device, dtype=torch.float32)
    acc = torch.empty(n, splits, heads, R, device=q_abs.device, dtype=torch.float32)
    ml = torch.empty(n, splits, heads, 2, device=q_abs.device, dtype=torch.float32)
    if n == 0:
        return out
    sel = selected if selected is not None else positions
    sel_k = selected.shape[1] if selected is not None else 0
    grid = (n, splits, triton.cdiv(heads, block_h))
    _split(grid, q_abs, q_pe, sink_c, sink_pe, c_rows, kpe_rows, table, positions, sel, acc, ml, heads, rank,
           rope_dim, sink_c.shape[0], window or 0, sel_k, c.shape[1], scale * 1.4426950408889634,
           q_abs.stride(0), q_abs.stride(1), q_pe.stride(0), q_pe.stride(1), c_rows.stride(0), kpe_rows.stride(0),
           table.stride(0), sel.stride(0), R=R, P=P, BLOCK_H=block_h, BLOCK_N=block_n, SPLITS=splits,
           MIN_SPLIT=min_split, HAS_WINDOW=window is not None, HAS_SEL=selected is not None,
           PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    _merge((n, heads), acc, ml, out, heads, rank, out.stride(0), out.stride(1), R=R, SPLITS=splits,
           num_warps=4, num_stages=1)
    return out


def index_scores_triton(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, table: torch.Tensor,
                        positions: torch.Tensor, *, window: int | None = None, block_n: int = INDEX_BLOCK_N,
                        span: int = INDEX_SPAN, precision: str = PRECISION, num_warps: int = 4) -> torch.Tensor:
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
