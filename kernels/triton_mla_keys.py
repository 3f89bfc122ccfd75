"""MLA decode, key side: a row's cached latent, its rotated ``k_pe`` and (DSA layers) its indexer
key, computed and stored in the paged cache by one program per row.

PyTorch (``arch/blocks/mla.py`` ``store_keys_reference``, the CPU path) runs per layer: the
latent's MoME convolution (ring store, window, sum), its RMSNorm between two casts, ``k_pe``'s
NEOX rotation (cast, two products, roll, sum) and two cache stores; on DSA layers the indexer
key's RMSNorm (casts), the rotation of its leading dims, a concatenation, a cast and a store:
twelve to twenty-three kernels. Here one program per row reads the ``kv_a_proj`` output row and
the indexer's key projection once and writes the cache rows at ``dest`` (-1: not stored).

The values are rounded where the PyTorch path rounds them: the convolution's output to the
projection's dtype before the norm, the indexer key's norm to its input dtype before the
rotation; the RoPE tables are the step's own (``cos`` and ``rope.fold_sin(sin)``, fp32), so the
rotation is the same products and sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher
from .triton_mome import mome_row, rms_normed


@triton.jit
def _store_keys_kernel(
    kv_ptr, stride_kv, ring_ptr, stride_slot, stride_row, conv_w_ptr, slot_ptr, pos_ptr, n,
    norm_w_ptr, eps, cos_ptr, sin_ptr, stride_cs, dest_ptr, c_cache_ptr, kpe_cache_ptr,
    ki_ptr, stride_ki, ki_w_ptr, ki_eps, kidx_cache_ptr,
    RANK: tl.constexpr, BLOCK_C: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
    K: tl.constexpr, RING: tl.constexpr, HAS_CONV: tl.constexpr, NORM_WEIGHT: tl.constexpr,
    HAS_INDEX: tl.constexpr, IDX_DIM: tl.constexpr, BLOCK_I: tl.constexpr, IDX_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0)
    pos = tl.load(pos_ptr + r).to(tl.int64)
    dest = tl.load(dest_ptr + r).to(tl.int64)

    # the latent: MoME convolution (storing the row's input in its ring), rounded as the PyTorch
    # path's conv output is, then the RMSNorm in fp32
    c = tl.arange(0, BLOCK_C)
    in_c = c < RANK
    if HAS_CONV:
        slot = tl.load(slot_ptr + r).to(tl.int64)
        lat = mome_row(ring_ptr + slot * stride_slot, kv_ptr, slot_ptr, pos_ptr, n, conv_w_ptr, r, slot, pos, c, in_c,
                       RANK, stride_row, stride_kv, K, RING, BLOCK_C, BLOCK_N)
        lat = lat.to(kv_ptr.dtype.element_ty).to(tl.float32)
    else:
        lat = tl.load(kv_ptr + r * stride_kv + c, mask=in_c, other=0.0).to(tl.float32)
    lat = rms_normed(lat, norm_w_ptr, c, in_c, RANK, eps, NORM_WEIGHT)
    store_c = in_c & (dest + tl.zeros([BLOCK_C], dtype=tl.int64) >= 0)
    # the PyTorch path rounds the norm to the projection's dtype, then the store to the cache's
    lat = lat.to(kv_ptr.dtype.element_ty)
    tl.store(c_cache_ptr + dest * RANK + c, lat.to(c_cache_ptr.dtype.element_ty), mask=store_c)

    # k_pe: the ROPE columns after the latent, rotated in fp32 (NEOX pairs i, i + ROPE/2)
    i = tl.arange(0, BLOCK_R)
    in_r = i < ROPE
    partner = (i + ROPE // 2) % ROPE
    x = tl.load(kv_ptr + r * stride_kv + RANK + i, mask=in_r, other=0.0).to(tl.float32)
    x_partner = tl.load(kv_ptr + r * stride_kv + RANK + partner, mask=in_r, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + r * stride_cs + i, mask=in_r, other=0.0)
    sin = tl.load(sin_ptr + r * stride_cs + i, mask=in_r, other=0.0)
    store_r = in_r & (dest + tl.zeros([BLOCK_R], dtype=tl.int64) >= 0)
    tl.store(kpe_cache_ptr + dest * ROPE + i, (x * cos + x_partner * sin).to(kpe_cache_ptr.dtype.element_ty),
             mask=store_r)

    if HAS_INDEX:
        # the indexer key: RMSNorm (rounded to its input dtype), NEOX rotation of the leading ROPE dims;
        # the partner of each rotated value is loaded and normed again rather than moved between lanes
        d = tl.arange(0, BLOCK_I)
        in_d = d < IDX_DIM
        rotated = d < ROPE
        mate = tl.where(rotated, (d + ROPE // 2) % ROPE, d)
        row = ki_ptr + r * stride_ki
        v = tl.load(row + d, mask=in_d, other=0.0).to(tl.float32)
        v_mate = tl.load(row + mate, mask=in_d, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(v * v, axis=0) / IDX_DIM + ki_eps)
        v, v_mate = v * inv, v_mate * inv
        if IDX_WEIGHT:
            v = v * tl.load(ki_w_ptr + d, mask=in_d, other=0.0)
            v_mate = v_mate * tl.load(ki_w_ptr + mate, mask=in_d, other=0.0)
        v = v.to(ki_ptr.dtype.element_ty).to(tl.float32)
        v_mate = v_mate.to(ki_ptr.dtype.element_ty).to(tl.float32)
        cos_d = tl.load(cos_ptr + r * stride_cs + d, mask=rotated, other=0.0)
        sin_d = tl.load(sin_ptr + r * stride_cs + d, mask=rotated, other=0.0)
        key = tl.where(rotated, v * cos_d + v_mate * sin_d, v)
        store_d = in_d & (dest + tl.zeros([BLOCK_I], dtype=tl.int64) >= 0)
        tl.store(kidx_cache_ptr + dest * IDX_DIM + d, key.to(kidx_cache_ptr.dtype.element_ty), mask=store_d)


_launch = FastLauncher(_store_keys_kernel)


def _check_cache(t: torch.Tensor, width: int, name: str) -> None:
    if t.dim() != 2 or t.shape[1] != width or not t.is_contiguous():
        raise ValueError(f"MLA key store: the {name} cache must be a contiguous [rows, {width}] tensor, "
                         f"got {list(t.shape)}")


def mla_store_keys_triton(kv: torch.Tensor, rank: int, conv, norm, positions: torch.Tensor, cos: torch.Tensor,
                          sin_folded: torch.Tensor, dest: torch.Tensor, c_cache: torch.Tensor, kpe_cache: torch.Tensor,
                          index=None) -> None:
    """``kv [n, rank + rope]``: ``kv_a_proj``'s output (contiguous columns); ``conv``: the latent's
    MoME convolution ``(ring [slots, R, rank], weight [K, rank] fp32, seq_slots [n])`` or None;
    ``norm``: the latent's ``RMSNorm``; ``positions [n]``; ``cos``/``sin_folded [n, rope]`` fp32;
    ``dest [n]``: flat cache rows (-1: skip); ``c_cache [rows, rank]``, ``kpe_cache [rows, rope]``;
    ``index``: ``(k [n, D], indexer, kidx_cache [rows, D])`` on DSA layers (``indexer.k_norm``
    normalises ``k``), else None."""
    n, rope = kv.shape[0], kv.shape[1] - rank
    if kv.stride(-1) != 1 or rope < 2 or rope % 2:
        raise ValueError(f"MLA key store: kv must hold the latent ({rank}) and an even k_pe width in contiguous "
                         f"columns, got {list(kv.shape)}")
    if cos.shape != (n, rope) or sin_folded.shape != cos.shape or not cos.is_contiguous() \
            or not sin_folded.is_contiguous() or cos.dtype != torch.float32 or sin_folded.dtype != torch.float32:
        raise ValueError(f"MLA key store: cos and sin must be contiguous fp32 [{n}, {rope}] tables")
    _check_cache(c_cache, rank, "latent")
    _check_cache(kpe_cache, rope, "k_pe")
    if conv is not None:
        ring, conv_weight, seq_slots = conv
        k = conv_weight.shape[0]
        if ring.stride(-1) != 1 or conv_weight.shape != (k, rank) or conv_weight.dtype != torch.float32 \
                or not conv_weight.is_contiguous():
            raise ValueError("MLA key store: the MoME conv needs a ring with contiguous channels and an fp32 "
                             f"[K, {rank}] weight")
    else:
        ring, conv_weight, seq_slots, k = kv, cos, dest, 1  # stand-ins, never read
    if index is not None:
        k_idx, indexer, kidx_cache = index
        idx_dim = k_idx.shape[-1]
        if k_idx.shape[0] != n or k_idx.stride(-1) != 1 or idx_dim < rope:
            raise ValueError(f"MLA key store: the indexer key must be [{n}, >= {rope}] with contiguous columns")
        _check_cache(kidx_cache, idx_dim, "indexer key")
        ki_w = indexer.k_norm.weight
        ki_eps = indexer.k_norm.eps
    else:
        k_idx, kidx_cache, ki_w, ki_eps, idx_dim = kv, c_cache, None, 0.0, 1
    if not n:
        return
    norm_w = norm.weight

    def ptr(t):  # absent operands get a stand-in pointer (never read: their flags are off)
        return t if t is not None else cos
    _launch((n,), kv, kv.stride(0), ring, ring.stride(0) if conv is not None else 0,
            ring.stride(1) if conv is not None else 0, conv_weight, seq_slots, positions, n,
            ptr(norm_w), float(norm.eps), cos, sin_folded, cos.stride(0), dest, c_cache, kpe_cache,
            k_idx, k_idx.stride(0), ptr(ki_w), float(ki_eps), kidx_cache,
            RANK=rank, BLOCK_C=triton.next_power_of_2(rank), ROPE=rope, BLOCK_R=triton.next_power_of_2(rope),
            K=k, RING=ring.shape[1] if conv is not None else 1, HAS_CONV=conv is not None,
            NORM_WEIGHT=norm_w is not None, HAS_INDEX=index is not None, IDX_DIM=idx_dim,
            BLOCK_I=triton.next_power_of_2(idx_dim), IDX_WEIGHT=ki_w is not None, BLOCK_N=triton.next_power_of_2(n),
            num_warps=4 if rank >= 512 else 2, num_stages=1)
