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
# Up to this many tokens (decode steps) the rotation runs one program per (token, head) instead of one per token.
PER_HEAD_MAX_TOKENS = 64


def rope_store_kv_triton(q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache, scaling: float = 1.0):
    """q ``[T, Hq, D]``, k ``[T, Hkv, D]``, v ``[T, Hkv, Dv]`` (rows may be strided, heads contiguous).

    Returns the rotated q (q itself, rotated in place, past ``PER_HEAD_MAX_TOKENS`` tokens; a new tensor up to it);
    rotated k and v go into the caches.
    """
    t, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    if d % 2 or d & (d - 1) or dv & (dv - 1):
        raise ValueError(f"head dims must be powers of two here, got {d}, {dv}")
    if q.stride(2) != 1 or q.stride(1) != d or k.stride(2) != 1 or k.stride(1) != d or v.stride(1) != dv:
        raise ValueError("q, k and v need contiguous heads")
    if t <= PER_HEAD_MAX_TOKENS:
        # one program per (token, head), the per-head kernel with its norms off: a decode step's single program
        # was a 4.4 us serial chain per layer on the H100 (Llama-3-8B, bench/profile_decode.py)
        q_out = torch.empty(t, hq, d, device=q.device, dtype=q.dtype)
        _norm_rope((t, hq + hkv), q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache, q_out,
                   inv_freq, inv_freq, inv_freq, float(scaling), 0.0, q.stride(0), k.stride(0), v.stride(0),
                   HQ=hq, HKV=hkv, HALF=d // 2, DV=dv, NORM_Q=False, NORM_K=False, NORM_V=False,
                   Q_WEIGHT=False, K_WEIGHT=False, V_WEIGHT=False, num_warps=4 if max(d, dv) >= 512 else 2,
                   num_stages=1)
        return q_out
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


@triton.jit
def _leading_rope_kernel(q_ptr, stride_q, cos_ptr, sin_ptr, stride_cs, out_ptr, w_ptr, stride_w, w_out_ptr,
                         HEADS: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, WIDTH_W: tl.constexpr, BLOCK_W: tl.constexpr):
    # one program per token: every head's leading ROPE dims NEOX-rotated (the partner of each rotated
    # value loaded again rather than moved between lanes), the rest copied, all written in fp32
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    inside = (h < HEADS) & (d < D)
    rotated = d < ROPE
    mate = tl.where(rotated, (d + ROPE // 2) % ROPE, d)
    row = q_ptr + t * stride_q + h * D
    x = tl.load(row + d, mask=inside, other=0.0).to(tl.float32)
    x_mate = tl.load(row + mate, mask=inside, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + t * stride_cs + d, mask=rotated, other=0.0)
    sin = tl.load(sin_ptr + t * stride_cs + d, mask=rotated, other=0.0)
    tl.store(out_ptr + (t * HEADS + h) * D + d, tl.where(rotated, x * cos + x_mate * sin, x), mask=inside)
    if WIDTH_W > 0:  # the head weights, cast to fp32 alongside
        j = tl.arange(0, BLOCK_W)
        w = tl.load(w_ptr + t * stride_w + j, mask=j < WIDTH_W, other=0.0)
        tl.store(w_out_ptr + t * WIDTH_W + j, w.to(tl.float32), mask=j < WIDTH_W)


_leading_rope = FastLauncher(_leading_rope_kernel)


def leading_rope_triton(q: torch.Tensor, head_weights: torch.Tensor | None, cos: torch.Tensor,
                        sin_folded: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q [n, heads * D]`` (any float dtype, contiguous columns) -> fp32 ``[n, heads, D]`` with the
    leading ``rope = cos.shape[-1]`` dims of each head NEOX-rotated (``cos``/``sin_folded [n, rope]``
    fp32, ``rope.fold_sin``), and ``head_weights [n, G]`` cast to fp32 in the same launch (None: none).
    What the lightning indexer's queries need in one kernel instead of seven."""
    n, rope = q.shape[0], cos.shape[-1]
    if q.dim() != 2 or q.shape[1] % heads or q.stride(-1) != 1:
        raise ValueError(f"leading RoPE: q must be [n, heads * D] with contiguous columns, got {list(q.shape)}")
    d = q.shape[1] // heads
    if rope % 2 or rope > d or cos.shape != (n, rope) or sin_folded.shape != cos.shape or not cos.is_contiguous() \
            or not sin_folded.is_contiguous() or cos.dtype != torch.float32 or sin_folded.dtype != torch.float32:
        raise ValueError(f"leading RoPE: cos and sin must be contiguous fp32 [{n}, even <= {d}] tables")
    if head_weights is not None and (head_weights.dim() != 2 or head_weights.shape[0] != n
                                     or head_weights.stride(-1) != 1):
        raise ValueError("leading RoPE: the head weights must be [n, G] with contiguous columns")
    out = torch.empty(n, heads, d, device=q.device, dtype=torch.float32)
    w_out = None if head_weights is None else torch.empty(head_weights.shape, device=q.device, dtype=torch.float32)
    width_w = 0 if head_weights is None else head_weights.shape[1]
    if n:
        w_in = head_weights if head_weights is not None else q  # a stand-in pointer, never read
        _leading_rope((n,), q, q.stride(0), cos, sin_folded, cos.stride(0), out, w_in, w_in.stride(0),
                      w_out if w_out is not None else out, HEADS=heads, D=d, ROPE=rope,
                      BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(d), WIDTH_W=width_w,
                      BLOCK_W=triton.next_power_of_2(max(width_w, 1)), num_warps=4, num_stages=1)
    return out, w_out
