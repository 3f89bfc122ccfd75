"""Paged attention for decode steps (one query token per sequence), in Triton.

One program per (sequence, KV head): it takes the query heads that share that
KV head (grouped-query attention; padded to the 16 rows a tensor-core product
needs), walks the sequence's pages ``BLOCK_N`` keys at a time with an online
softmax, and writes the normalised result. Sequence lengths come from device
memory, so a decode step that uses it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, page_table_ptr, kv_lens_ptr,
    scale, window, stride_pt,
    HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    gmask = g < GROUP
    heads = hkv * GROUP + tl.where(gmask, g, 0)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    q = tl.load(q_ptr + (b * HQ + heads)[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
    kv_len = tl.load(kv_lens_ptr + b)
    start = 0
    if window > 0:
        start = tl.maximum(kv_len - window, 0)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, DV), tl.float32)
    n = tl.arange(0, BLOCK_N)
    for j0 in range((start // BLOCK_N) * BLOCK_N, kv_len, BLOCK_N):
        j = j0 + n
        valid = (j >= start) & (j < kv_len)
        page = tl.load(page_table_ptr + b * stride_pt + j // PAGE, mask=valid, other=0)
        row = (page.to(tl.int64) * PAGE + j % PAGE) * HKV + hkv
        k = tl.load(k_ptr + row[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision="ieee") * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + row[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + (b * HQ + heads)[:, None] * DV + dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None])


_decode = FastLauncher(_paged_decode_kernel)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                           page_table: torch.Tensor, kv_lens: torch.Tensor, scale: float,
                           window: int | None = None) -> torch.Tensor:
    """q ``[B, Hq, D]`` (one token per sequence); caches ``[pages, page_size, Hkv, D]`` -> ``[B, Hq, Dv]``."""
    b, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    dv = v_cache.shape[-1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    group = hq // hkv
    out = torch.empty(b, hq, dv, dtype=q.dtype, device=q.device)
    # keys per loop step: 64 for heads up to 128 wide, fewer for Gemma 4's 256/512-wide heads so that
    # the double-buffered key and value tiles stay within shared memory
    block_n = max(16, min(64, page, 8192 // max(d, dv)))
    _decode((b, hkv), q.contiguous(), k_cache, v_cache, out, page_table, kv_lens,
            float(scale), int(window or 0), page_table.stride(0),
            HQ=hq, HKV=hkv, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=d, DV=dv,
            PAGE=page, BLOCK_N=block_n, num_warps=4, num_stages=2)
    return out
