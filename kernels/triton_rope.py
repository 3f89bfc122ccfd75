"""Rotary embedding fused with the paged-cache write, in Triton (one launch per attention layer).

One program per token: it computes the rotation angles from the token's
position in fp32, rotates every query head in place (NEOX layout: pairs i and
i + D/2), and writes the rotated key heads and the value heads into the cache
at the token's slot. Replaces about fifteen small element-wise kernels per
layer on the decode path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import FastLauncher


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, slot_ptr, kc_ptr, vc_ptr,
    scaling, stride_q, stride_k, stride_v,
    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, DV: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    i = tl.arange(0, HALF)
    ang = pos * tl.load(inv_freq_ptr + i).to(tl.float32)
    c = (tl.cos(ang) * scaling)[None, :]
    s = (tl.sin(ang) * scaling)[None, :]
    hq = tl.arange(0, BLOCK_HQ)[:, None]
    mq = hq < HQ
    q_row = q_ptr + t * stride_q + hq * (2 * HALF)
    x1 = tl.load(q_row + i[None, :], mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(q_row + HALF + i[None, :], mask=mq, other=0.0).to(tl.float32)
    tl.store(q_row + i[None, :], (x1 * c - x2 * s).to(q_ptr.dtype.element_ty), mask=mq)
    tl.store(q_row + HALF + i[None, :], (x2 * c + x1 * s).to(q_ptr.dtype.element_ty), mask=mq)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    hk = tl.arange(0, BLOCK_HKV)[:, None]
    mk = hk < HKV
    k_row = k_ptr + t * stride_k + hk * (2 * HALF)
    y1 = tl.load(k_row + i[None, :], mask=mk, other=0.0).to(tl.float32)
    y2 = tl.load(k_row + HALF + i[None, :], mask=mk, other=0.0).to(tl.float32)
    kc_row = kc_ptr + (slot * HKV + hk) * (2 * HALF)
    tl.store(kc_row + i[None, :], (y1 * c - y2 * s).to(kc_ptr.dtype.element_ty), mask=mk)
    tl.store(kc_row + HALF + i[None, :], (y2 * c + y1 * s).to(kc_ptr.dtype.element_ty), mask=mk)
    dv = tl.arange(0, DV)[None, :]
    v = tl.load(v_ptr + t * stride_v + hk * DV + dv, mask=mk, other=0.0)
    tl.store(vc_ptr + (slot * HKV + hk) * DV + dv, v.to(vc_ptr.dtype.element_ty), mask=mk)


_rope = FastLauncher(_rope_store_kernel)


def rope_store_kv_triton(q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache, scaling: float = 1.0):
    """q ``[T, Hq, D]``, k ``[T, Hkv, D]``, v ``[T, Hkv, Dv]`` (rows may be strided, heads contiguous).

    Rotates q in place and returns it; rotated k and v go into the caches.
    """
    t, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    if d % 2 or d & (d - 1) or dv & (dv - 1):
        raise ValueError(f"head dims must be powers of two here, got {d}, {dv}")
    if q.stride(2) != 1 or q.stride(1) != d or k.stride(2) != 1 or k.stride(1) != d or v.stride(1) != dv:
        raise ValueError("q, k and v need contiguous heads")
    _rope((t,), q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache,
          float(scaling), q.stride(0), k.stride(0), v.stride(0),
          HQ=hq, HKV=hkv, HALF=d // 2, DV=dv, BLOCK_HQ=triton.next_power_of_2(hq),
          BLOCK_HKV=triton.next_power_of_2(hkv), num_warps=4, num_stages=1)
    return q
