"""Rotary embedding fused with the paged-cache write, in Triton (one launch per attention layer).

One program per token: it computes the rotation angles from the token's
position in fp32, rotates every query head in place (NEOX layout: pairs i and
i + D/2), and writes the rotated key heads and the value heads into the cache
at the token's slot. Replaces about fifteen small element-wise kernels per
layer on the decode path.

``norm_rope_store_kv_triton`` also applies the per-head RMSNorms of q, k and v
(Gemma 4, Qwen3-style q/k norms) before the rotation: one program per (token,
head), so that a batch-1 step spreads over as many programs as there are heads.
That is one kernel for what was ten (three casts and a norm per head kind, and
the rotation).
"""

from __future__ import annotations

import torch
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


@triton.jit
def _normed_halves(row, i, w_ptr, eps, HALF: tl.constexpr, NORM: tl.constexpr, WEIGHT: tl.constexpr):
    """The two halves of one head in fp32, RMS-normed over the whole head (and weighted) if asked."""
    x1 = tl.load(row + i).to(tl.float32)
    x2 = tl.load(row + HALF + i).to(tl.float32)
    if NORM:
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
        x1, x2 = x1 * inv, x2 * inv
        if WEIGHT:
            x1, x2 = x1 * tl.load(w_ptr + i), x2 * tl.load(w_ptr + HALF + i)
    return x1, x2


@triton.jit
def _store_rotated(out, x1, x2, c, s, i, HALF: tl.constexpr):
    tl.store(out + i, (x1 * c - x2 * s).to(out.dtype.element_ty))
    tl.store(out + HALF + i, (x2 * c + x1 * s).to(out.dtype.element_ty))


@triton.jit
def _norm_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, slot_ptr, kc_ptr, vc_ptr, q_out_ptr, qw_ptr, kw_ptr, vw_ptr,
    scaling, eps, stride_q, stride_k, stride_v,
    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, DV: tl.constexpr,
    NORM_Q: tl.constexpr, NORM_K: tl.constexpr, NORM_V: tl.constexpr,
    Q_WEIGHT: tl.constexpr, K_WEIGHT: tl.constexpr, V_WEIGHT: tl.constexpr,
):
    # one program per (token, head): query heads first, then one program per KV head for its key and value
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    i = tl.arange(0, HALF)
    ang = pos * tl.load(inv_freq_ptr + i).to(tl.float32)
    c = tl.cos(ang) * scaling
    s = tl.sin(ang) * scaling
    if h < HQ:
        x1, x2 = _normed_halves(q_ptr + t * stride_q + h * (2 * HALF), i, qw_ptr, eps, HALF, NORM_Q, Q_WEIGHT)
        _store_rotated(q_out_ptr + (t * HQ + h) * (2 * HALF), x1, x2, c, s, i, HALF)
    else:
        kh = h - HQ
        slot = tl.load(slot_ptr + t).to(tl.int64)
        y1, y2 = _normed_halves(k_ptr + t * stride_k + kh * (2 * HALF), i, kw_ptr, eps, HALF, NORM_K, K_WEIGHT)
        _store_rotated(kc_ptr + (slot * HKV + kh) * (2 * HALF), y1, y2, c, s, i, HALF)
        dv = tl.arange(0, DV)
        v = tl.load(v_ptr + t * stride_v + kh * DV + dv).to(tl.float32)
        if NORM_V:
            v = v * tl.rsqrt(tl.sum(v * v, axis=0) / DV + eps)
            if V_WEIGHT:
                v = v * tl.load(vw_ptr + dv)
        tl.store(vc_ptr + (slot * HKV + kh) * DV + dv, v.to(vc_ptr.dtype.element_ty))


_norm_rope = FastLauncher(_norm_rope_store_kernel)


def norm_rope_store_kv_triton(q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache, norms,
                              scaling: float = 1.0):
    """Per-head RMSNorms (``norms``, a ``kernels.reference.rope.HeadNorms``) on the raw projections,
    then what ``rope_store_kv_triton`` does; returns the normed, rotated q (a new tensor).

    ``v`` may be ``k`` itself (Gemma 4's ``attention_k_eq_v``: the values are the raw keys): both
    are only read. Normalising in fp32 right before the rotation skips the fp16 rounding between
    the two that the unfused path has."""
    t, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    if d % 2 or d & (d - 1) or dv & (dv - 1):
        raise ValueError(f"head dims must be powers of two here, got {d}, {dv}")
    if q.stride(2) != 1 or q.stride(1) != d or k.stride(2) != 1 or k.stride(1) != d or v.stride(2) != 1 \
            or v.stride(1) != dv:
        raise ValueError("q, k and v need contiguous heads")
    q_out = torch.empty(t, hq, d, device=q.device, dtype=q.dtype)
    if t:
        def weight(w):  # absent weights get a stand-in pointer, never read (flag off)
            return w if w is not None else inv_freq
        _norm_rope((t, hq + hkv), q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache, q_out,
                   weight(norms.q_weight), weight(norms.k_weight), weight(norms.v_weight), float(scaling),
                   float(norms.eps), q.stride(0), k.stride(0), v.stride(0),
                   HQ=hq, HKV=hkv, HALF=d // 2, DV=dv, NORM_Q=norms.q, NORM_K=norms.k, NORM_V=norms.v,
                   Q_WEIGHT=norms.q_weight is not None, K_WEIGHT=norms.k_weight is not None,
                   V_WEIGHT=norms.v_weight is not None, num_warps=4 if max(d, dv) >= 512 else 2, num_stages=1)
    return q_out
