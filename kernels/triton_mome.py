"""MoME short convolution of one decode row per program, storing the row's input in its ring.

The PyTorch path (``arch/blocks/short_conv.py`` ``mome_decode_reference``) stores each row's
input in its sequence's ring at ``pos % R``, gathers the row's window back from the ring,
multiplies by the weights, sums, applies the start-of-sequence rule and adds the identity: six
kernels per convolution, three convolutions per MLA layer. Here one program per (row, channel
block) stores the row's input in the ring, takes the ``K`` inputs of positions ``pos-K+1 .. pos``
and writes ``x + (pos >= K-1 ? sum_k w[k] * win[k] : 0)`` rounded to the output dtype; the sum is
accumulated in fp32 in the same order as the reference (oldest entry first).

Several rows of one step may be consecutive positions of one sequence (drafted tokens verified
as decode rows). A row cannot read such an earlier row's input from the ring (that row's program
may not have stored it yet), so each program first looks for the window's earlier positions of
its sequence among the step's rows (one vector load of the step's slots and positions) and reads
those from the rows' inputs, the rest (earlier steps') from the ring.
Every value is rounded to the ring's dtype first, as the reference reads it back from the ring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher


@triton.jit
def mome_row(ring_base, x_ptr, slot_ptr, pos_ptr, n, weight_ptr, r, slot, pos, c, inside, channels, stride_row,
             stride_x, K: tl.constexpr, RING: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """One row's channels ``c``: stores its input ``x_ptr[r]`` at ``pos % RING`` of its sequence's ring
    (``ring_base``) and returns ``x + term`` in fp32, not yet rounded (kernels/triton_mla_keys.py
    norms it before it is stored). ``slot_ptr``/``pos_ptr``: the step's ``n`` rows."""
    own = tl.load(x_ptr + r * stride_x + c, mask=inside, other=0.0).to(ring_base.dtype.element_ty)
    tl.store(ring_base + (pos % RING) * stride_row + c, own, mask=inside)
    rows = tl.arange(0, BLOCK_N)
    in_step = rows < n
    same_seq = in_step & (tl.load(slot_ptr + rows, mask=in_step, other=0).to(tl.int64) == slot)
    row_pos = tl.load(pos_ptr + rows, mask=in_step, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K - 1):
        # the step's row holding this position of the sequence (a position is in one row at most), or -1
        src = tl.max(tl.where(same_seq & (row_pos == pos - (K - 1) + k), rows, -1), axis=0)
        src = src + tl.zeros([BLOCK], dtype=tl.int32)  # as a block: mask-shaped
        row = (pos + (RING - (K - 1) + k)) % RING  # non-negative before the modulo
        fresh = tl.load(x_ptr + tl.maximum(src, 0).to(tl.int64) * stride_x + c, mask=inside & (src >= 0), other=0.0)
        stored = tl.load(ring_base + row * stride_row + c, mask=inside & (src < 0), other=0.0)
        v = tl.where(src >= 0, fresh.to(ring_base.dtype.element_ty), stored).to(tl.float32)
        acc += v * tl.load(weight_ptr + k * channels + c, mask=inside, other=0.0)
    x = own.to(tl.float32)
    acc += x * tl.load(weight_ptr + (K - 1) * channels + c, mask=inside, other=0.0)
    return x + tl.where(pos >= K - 1, acc, 0.0)


@triton.jit
def rms_normed(y, w_ptr, c, inside, channels, eps, WEIGHT: tl.constexpr):
    """``y / rms(y) * w`` of a whole row held by one program (zeros outside ``inside``), in fp32."""
    y = y * tl.rsqrt(tl.sum(y * y, axis=0) / channels + eps)
    if WEIGHT:
        y = y * tl.load(w_ptr + c, mask=inside, other=0.0)
    return y


@triton.jit
def _mome_decode_kernel(ring_ptr, x_ptr, weight_ptr, slot_ptr, pos_ptr, out_ptr, norm_w_ptr, eps, n, channels,
                        stride_slot, stride_row, stride_x, stride_out, K: tl.constexpr, RING: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr):
    r = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = c < channels
    slot = tl.load(slot_ptr + r).to(tl.int64)
    pos = tl.load(pos_ptr + r).to(tl.int64)
    y = mome_row(ring_ptr + slot * stride_slot, x_ptr, slot_ptr, pos_ptr, n, weight_ptr, r, slot, pos, c, inside,
                 channels, stride_row, stride_x, K, RING, BLOCK, BLOCK_N)
    if NORM:  # the conv's output rounded as the PyTorch path returns it, then its RMSNorm (one program per row)
        y = rms_normed(y.to(out_ptr.dtype.element_ty).to(tl.float32), norm_w_ptr, c, inside, channels, eps,
                       NORM_WEIGHT)
    tl.store(out_ptr + r * stride_out + c, y.to(out_ptr.dtype.element_ty), mask=inside)


_launch = FastLauncher(_mome_decode_kernel)


def mome_decode_triton(ring: torch.Tensor, weight: torch.Tensor, seq_slots: torch.Tensor, positions: torch.Tensor,
                       x: torch.Tensor, dtype: torch.dtype, norm=None) -> torch.Tensor:
    """``ring [slots, R, C]``, ``weight [K, C]`` fp32, ``seq_slots``/``positions [n]``, the rows'
    inputs ``x [n, C]`` (stored into the ring at ``pos % R`` here) -> ``x + conv(x)`` ``[n, C]``
    in ``dtype``; with ``norm`` (an ``RMSNorm``: its fp32 ``weight`` or None, and ``eps``) that
    rounded result normed, as ``norm(x + conv(x))`` (MLA's q latent)."""
    k, channels = weight.shape
    if ring.stride(-1) != 1 or not weight.is_contiguous() or weight.dtype != torch.float32:
        raise ValueError("the MoME ring needs contiguous channels and an fp32 [K, C] weight")
    n = positions.shape[0]
    if x.shape != (n, channels) or x.stride(-1) != 1:
        raise ValueError(f"the MoME decode input must be [{n}, {channels}] with contiguous channels, "
                         f"got {list(x.shape)}")
    out = torch.empty(n, channels, device=ring.device, dtype=dtype)
    # a norm needs the whole row in one program
    block = triton.next_power_of_2(channels) if norm is not None else min(1024, triton.next_power_of_2(channels))
    norm_w = None if norm is None else norm.weight
    if norm_w is not None and (norm_w.dtype != torch.float32 or norm_w.shape != (channels,)):
        raise ValueError(f"the MoME decode's norm needs an fp32 [{channels}] weight")
    if n:
        _launch((n, triton.cdiv(channels, block)), ring, x, weight, seq_slots, positions, out,
                norm_w if norm_w is not None else weight, float(norm.eps) if norm is not None else 0.0, n, channels,
                ring.stride(0), ring.stride(1), x.stride(0), out.stride(0), K=k, RING=ring.shape[1], BLOCK=block,
                BLOCK_N=triton.next_power_of_2(n), NORM=norm is not None, NORM_WEIGHT=norm_w is not None,
                num_warps=8 if block >= 2048 else 4, num_stages=1)
    return out
