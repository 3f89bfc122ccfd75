"""MoME short convolution of one decode row per program, read straight from its input ring.

The PyTorch path (``arch/blocks/short_conv.py`` ``mome_decode_reference``) gathers each
row's window from the ring, multiplies by the weights, sums, applies the start-of-sequence
rule and adds the identity: five kernels per convolution, three convolutions per MLA layer.
Here one program per (row, channel block) reads the ``K`` ring entries of positions
``pos-K+1 .. pos`` (the row's own input already stored there), and writes
``x + (pos >= K-1 ? sum_k w[k] * win[k] : 0)`` rounded to the output dtype; the sum is
accumulated in fp32 in the same order as the reference (oldest entry first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher


@triton.jit
def _mome_decode_kernel(ring_ptr, weight_ptr, slot_ptr, pos_ptr, out_ptr, channels, stride_slot, stride_row,
                        stride_out, K: tl.constexpr, RING: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = c < channels
    slot = tl.load(slot_ptr + r).to(tl.int64)
    pos = tl.load(pos_ptr + r).to(tl.int64)
    base = ring_ptr + slot * stride_slot
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    x = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        row = (pos + (RING - (K - 1) + k)) % RING  # non-negative before the modulo
        x = tl.load(base + row * stride_row + c, mask=inside, other=0.0).to(tl.float32)
        acc += x * tl.load(weight_ptr + k * channels + c, mask=inside, other=0.0)
    term = tl.where(pos >= K - 1, acc, 0.0)
    tl.store(out_ptr + r * stride_out + c, (x + term).to(out_ptr.dtype.element_ty), mask=inside)


_launch = FastLauncher(_mome_decode_kernel)


def mome_decode_triton(ring: torch.Tensor, weight: torch.Tensor, seq_slots: torch.Tensor, positions: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """``ring [slots, R, C]`` (each row's input at ``pos % R`` already written), ``weight [K, C]``
    fp32, ``seq_slots``/``positions [n]`` -> ``x + conv(x)`` ``[n, C]`` in ``dtype``."""
    k, channels = weight.shape
    if ring.stride(-1) != 1 or not weight.is_contiguous() or weight.dtype != torch.float32:
        raise ValueError("the MoME ring needs contiguous channels and an fp32 [K, C] weight")
    n = positions.shape[0]
    out = torch.empty(n, channels, device=ring.device, dtype=dtype)
    block = min(1024, triton.next_power_of_2(channels))
    if n:
        _launch((n, triton.cdiv(channels, block)), ring, weight, seq_slots, positions, out, channels,
                ring.stride(0), ring.stride(1), out.stride(0), K=k, RING=ring.shape[1], BLOCK=block,
                num_warps=4, num_stages=1)
    return out
