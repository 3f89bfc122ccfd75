"""EXL3 mixture-of-experts projections in one launch each (Triton).

Two schedules, same math as ``kernels.reference.moe.exl3_moe_ref``:

* **decode** (few tokens): one program per (128 output columns, selected
  expert slot, k split). Each slot is a single row (padded to 16 for the tensor
  cores); its input rotation uses that expert's ``suh`` and is done in the
  kernel. With routing weights, the programs of one token meet at a counter and
  the last one adds the experts' outputs in slot order (deterministic), so the
  whole projection, reduction included, is one launch.
* **grouped** (prefill): slots are sorted by expert and cut into blocks of
  ``BLOCK_M`` rows of one expert (``align_slots``); one program per (128 output
  columns, block) runs a decode-GEMM over its rows. Results are written per
  slot (scaled by the routing weight); the caller sums a token's slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_decode import decode_tiles, lane_layout
from .triton_gemm import LOCK_SLOTS, device_buffers, rotate_input_chunk, rotate_output, sm_count
from .weights import Exl3ExpertStack


@triton.jit
def _slot_partial(x_ptr, x_row, stride_xm, suh_ptr, t32_ptr, kt_begin, k_tiles, nt, TN,
                  W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
                  CB: tl.constexpr, USE_PTX: tl.constexpr):
    """``H(x_row * suh) @ W_hat`` over tiles [kt_begin, +k_tiles) for 128 columns; row 0 of a [16, 128] block."""
    r16 = tl.arange(0, 16)
    acc = tl.zeros((16, 128), tl.float32)
    for c in range(0, k_tiles, 8):
        kk = (kt_begin + c) * 16 + tl.arange(0, 128)
        x = tl.load(x_ptr + x_row * stride_xm + r16[:, None] * 0 + kk[None, :], mask=(r16 == 0)[:, None], other=0.0)
        xh = rotate_input_chunk(x, tl.load(suh_ptr + kk), 16)
        w = decode_tiles(t32_ptr, kt_begin + c, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, 8, 8)
        acc = tl.dot(xh, w, acc)
    return acc


@triton.jit
def _exl3_moe_decode_kernel(
    x_ptr, ids_ptr, rw_ptr, t32_ptr, suh_ptr, svh_ptr, y_ptr, ws_ptr, lock_ptr, h16_ptr, h32_ptr,
    N, K, TN, k_tiles_per_split, expert_w32, stride_xm, stride_ym,
    W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
    CB: tl.constexpr, USE_PTX: tl.constexpr,
    TOPK: tl.constexpr, X_PER_SLOT: tl.constexpr, REDUCE: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    slot = tl.program_id(1)
    pid_s = tl.program_id(2)
    token = slot // TOPK
    nb = N // 128
    cols = pid_n * 128 + tl.arange(0, 128)
    r16 = tl.arange(0, 16)
    row0 = (r16 == 0)[:, None]
    e = tl.load(ids_ptr + slot)
    x_row = slot if X_PER_SLOT else token
    acc = tl.zeros((16, 128), tl.float32)
    if e >= 0:
        acc = _slot_partial(x_ptr, x_row, stride_xm, suh_ptr + e * K, t32_ptr + e * expert_w32,
                            pid_s * k_tiles_per_split, k_tiles_per_split, pid_n * 8, TN,
                            W32, KA, HALF, NLOAD, CB, USE_PTX)

    if (not REDUCE) and SPLIT_K == 1:
        y = rotate_output(acc, h32_ptr, 16) * tl.load(svh_ptr + tl.maximum(e, 0) * N + cols).to(tl.float32)[None, :]
        out = y_ptr + slot * stride_ym + r16[:, None] * 0 + cols[None, :]
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=row0)
    else:
        ws_row = slot * SPLIT_K + pid_s
        tl.store(ws_ptr + ws_row * N + r16[:, None] * 0 + cols[None, :], acc, mask=row0)
        tl.debug_barrier()
        if REDUCE:
            lock = lock_ptr + token * nb + pid_n
            expected = TOPK * SPLIT_K
        else:
            lock = lock_ptr + slot * nb + pid_n
            expected = SPLIT_K
        arrived = tl.atomic_add(lock, 1, sem="acq_rel")
        if arrived == expected - 1:
            if REDUCE:
                total = tl.zeros((16, 128), tl.float32)
                for j in range(TOPK):
                    s_j = token * TOPK + j
                    e_j = tl.load(ids_ptr + s_j)
                    part = tl.zeros((16, 128), tl.float32)
                    for sp in range(SPLIT_K):
                        ptr = ws_ptr + (s_j * SPLIT_K + sp) * N + r16[:, None] * 0 + cols[None, :]
                        part += tl.load(ptr, mask=row0, other=0.0, cache_modifier=".cg")
                    scale = tl.load(svh_ptr + tl.maximum(e_j, 0) * N + cols).to(tl.float32) * tl.load(rw_ptr + s_j)
                    contrib = rotate_output(part, h32_ptr, 16) * scale[None, :]
                    total += tl.where(e_j >= 0, contrib, 0.0)
                out = y_ptr + token * stride_ym + r16[:, None] * 0 + cols[None, :]
                tl.store(out, total.to(y_ptr.dtype.element_ty), mask=row0)
            else:
                part = tl.zeros((16, 128), tl.float32)
                for sp in range(SPLIT_K):
                    ptr = ws_ptr + (slot * SPLIT_K + sp) * N + r16[:, None] * 0 + cols[None, :]
                    part += tl.load(ptr, mask=row0, other=0.0, cache_modifier=".cg")
                y = rotate_output(part, h32_ptr, 16) * tl.load(svh_ptr + tl.maximum(e, 0) * N + cols).to(tl.float32)[None, :]
                out = y_ptr + slot * stride_ym + r16[:, None] * 0 + cols[None, :]
                tl.store(out, y.to(y_ptr.dtype.element_ty), mask=row0)
            tl.atomic_xchg(lock, 0)


@triton.jit
def _exl3_moe_grouped_kernel(
    x_ptr, slots_ptr, block_expert_ptr, rw_ptr, t32_ptr, suh_ptr, svh_ptr, y_ptr, h16_ptr, h32_ptr,
    N, K, TN, k_tiles, expert_w32, stride_xm, stride_ym,
    W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
    CB: tl.constexpr, USE_PTX: tl.constexpr,
    TOPK: tl.constexpr, X_PER_SLOT: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_b)
    slots = tl.load(slots_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slots >= 0
    x_rows = slots if X_PER_SLOT else slots // TOPK
    x_rows = tl.where(valid, x_rows, 0)
    cols = pid_n * 128 + tl.arange(0, 128)
    t32_e = t32_ptr + e * expert_w32
    acc = tl.zeros((BLOCK_M, 128), tl.float32)
    for c in range(0, k_tiles, 8):
        kk = c * 16 + tl.arange(0, 128)
        x = tl.load(x_ptr + x_rows[:, None] * stride_xm + kk[None, :], mask=valid[:, None], other=0.0)
        xh = rotate_input_chunk(x, tl.load(suh_ptr + e * K + kk), BLOCK_M)
        w = decode_tiles(t32_e, c, pid_n * 8, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, 8, 8)
        acc = tl.dot(xh, w, acc)
    y = rotate_output(acc, h32_ptr, BLOCK_M) * tl.load(svh_ptr + e * N + cols).to(tl.float32)[None, :]
    if HAS_WEIGHTS:
        y = y * tl.load(rw_ptr + tl.where(valid, slots, 0), mask=valid, other=0.0)[:, None]
    out = y_ptr + tl.where(valid, slots, 0)[:, None] * stride_ym + cols[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=valid[:, None])


# ------------------------------------------------------------------ launch

def align_slots(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort slots by expert and pad each expert's run to ``block_m`` rows.

    Returns ``slots`` int32 ``[blocks * block_m]`` (slot index or -1) and
    ``block_expert`` int32 ``[blocks]``. Negative expert ids are dropped.
    """
    flat = expert_ids.reshape(-1).long()
    keep = flat >= 0
    ids = torch.where(keep, flat, num_experts)  # dropped slots sort last, into a dummy expert
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts + 1)[:num_experts]
    blocks = (counts + block_m - 1) // block_m
    padded_start = torch.cumsum(blocks * block_m, 0) - blocks * block_m
    start = torch.cumsum(counts, 0) - counts
    sorted_ids = ids[order]
    n_keep = int(keep.sum())
    sorted_ids, order = sorted_ids[:n_keep], order[:n_keep]
    rank = torch.arange(n_keep, device=flat.device) - start[sorted_ids]
    total = int(blocks.sum()) * block_m
    slots = torch.full((total,), -1, dtype=torch.int32, device=flat.device)
    slots[padded_start[sorted_ids] + rank] = order.to(torch.int32)
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device, dtype=torch.int32), blocks)
    return slots, block_expert


def _check(x: torch.Tensor, experts: Exl3ExpertStack, expert_ids: torch.Tensor):
    k, n = experts.in_features, experts.out_features
    if k % 128 or n % 128:
        raise ValueError(f"{experts.key}: MoE kernels need dims divisible by 128, got [{k}, {n}]")
    if x.shape[-1] != k:
        raise ValueError(f"{experts.key}: input has {x.shape[-1]} features, experts expect {k}")
    if expert_ids.dim() != 2:
        raise ValueError(f"expert_ids must be [tokens, top_k], got {list(expert_ids.shape)}")


def exl3_moe_triton(
    x: torch.Tensor,
    experts: Exl3ExpertStack,
    expert_ids: torch.Tensor,
    routing_weights: torch.Tensor | None = None,
    *,
    schedule: str | None = None,
    split_k: int | None = None,
    block_m: int = 16,
    use_ptx: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``exl3_moe_ref``; ``schedule`` is "decode", "grouped" or None (by size).

    ``out`` (decode schedule): a contiguous tensor of the result's shape to write into.
    """
    _check(x, experts, expert_ids)
    t, top_k = expert_ids.shape
    k, n = experts.in_features, experts.out_features
    per_slot = x.dim() == 3
    xs = x.reshape(t * top_k if per_slot else t, k)
    if xs.stride(-1) != 1:
        xs = xs.contiguous()
    slots = t * top_k
    if schedule is None:
        schedule = "decode" if slots <= 64 else "grouped"
    layout = lane_layout(experts.bits)
    fmt = dict(W32=layout.w32, KA=layout.ka, HALF=layout.half, NLOAD=layout.nload, CB=int(experts.codebook),
               USE_PTX=x.is_cuda if use_ptx is None else use_ptx)
    locks, h16, h32 = device_buffers(x.device)
    ids32 = expert_ids.to(torch.int32).contiguous()
    t32 = experts.trellis.view(torch.int32)
    expert_w32 = t32[0].numel()
    nb, k_tiles = n // 128, k // 16
    rw = routing_weights.float().contiguous() if routing_weights is not None else xs

    if schedule == "decode":
        reduce = routing_weights is not None
        if split_k is None:
            split_k = 1
            units = k_tiles // 8
            while nb * slots * split_k < 2 * sm_count(x.device) and units % (split_k * 2) == 0:
                split_k *= 2
        if (k_tiles // 8) % split_k:
            raise ValueError(f"split_k {split_k} must divide the {k_tiles // 8} 128-feature chunks")
        if (t if reduce else slots) * nb > LOCK_SLOTS:
            raise ValueError("too many output blocks for the MoE counters")
        y = (torch.empty((t if reduce else slots, n), dtype=x.dtype, device=x.device) if out is None
             else out.view(t if reduce else slots, n))
        ws = torch.empty((slots * split_k, n), dtype=torch.float32, device=x.device) if (reduce or split_k > 1) else y
        _exl3_moe_decode_kernel[(nb, slots, split_k)](
            xs, ids32, rw, t32, experts.suh, experts.svh, y, ws, locks, h16, h32,
            n, k, n // 16, k_tiles // split_k, expert_w32, xs.stride(0), y.stride(0),
            TOPK=top_k, X_PER_SLOT=per_slot, REDUCE=reduce, SPLIT_K=split_k, num_warps=8, num_stages=2, **fmt,
        )
        return y if reduce else y.reshape(t, top_k, n)

    slot_ids, block_expert = align_slots(expert_ids, experts.num_experts, block_m)
    y = torch.zeros((slots, n), dtype=torch.float32 if routing_weights is not None else x.dtype, device=x.device)
    if block_expert.numel():
        rw_flat = routing_weights.float().reshape(-1).contiguous() if routing_weights is not None else xs
        _exl3_moe_grouped_kernel[(nb, block_expert.numel())](
            xs, slot_ids, block_expert, rw_flat, t32, experts.suh, experts.svh, y, h16, h32,
            n, k, n // 16, k_tiles, expert_w32, xs.stride(0), y.stride(0),
            TOPK=top_k, X_PER_SLOT=per_slot, HAS_WEIGHTS=routing_weights is not None, BLOCK_M=block_m,
            num_warps=8, num_stages=2, **fmt,
        )
    if routing_weights is None:
        return y.reshape(t, top_k, n)
    return y.reshape(t, top_k, n).sum(1).to(x.dtype)
