"""EXL3 mixture-of-experts projections, one launch each (Triton).

Same math as ``kernels.reference.moe.exl3_moe_ref``, two schedules built on the
dense kernel's helpers (``triton_gemm``):

* **decode** (few tokens): one program per (128 output columns, selected
  expert slot, K slice). A slot is one row: the program rotates its slice of the
  input with that expert's ``suh`` into scratch, then runs a one-row FMA decode loop
  over the expert's trellis (``MoeDecodeConfig``: the dense kernel's previous loop
  or its ring loop, ``triton_gemv``). With routing weights, the programs of a token meet
  at a counter and the last adds the experts' outputs in slot order
  (deterministic): the projection, reduction included, is one launch.
* **grouped** (prefill): slots are sorted by expert and cut into blocks of
  ``BLOCK_M`` rows of one expert (``align_slots``); one program per (128
  columns, block) rotates its rows and runs the tensor-core decode loop. Results
  are written per slot (times the routing weight); the caller sums a token's slots.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import InvalidArgumentError
from .launch import FastLauncher
from . import tuning
from .tuning import moe_decode_config
from .triton_decode import lane_layout
from .triton_gemv import lanes_arrangement, ring_gemv, ring_prologue
from .triton_gemm import (
    LOCK_SLOTS,
    choose_split_k,
    decode_matmul,
    device_buffers,
    rotate_output,
    next_power_of_2,
    rotate_row_slice_into_scratch,
    sm_count,
)
from .reference.moe import check_moe_options, member_ids
from .weights import Exl3ExpertStack


@triton.jit
def _slots_output(ws_ptr, slots, valid, experts, scales, SPLIT_K: tl.constexpr, GROUP: tl.constexpr, N, cols,
                  svh_ptr, h32_ptr, S: tl.constexpr):
    """``S`` slots' results ``[S, 128]`` fp32: their K-slice partials summed, rotated, times
    their expert's ``svh`` and ``scales``. The loads are issued for all slots and ``GROUP``
    splits at once: summing a token's slots one after another put an L2 round trip per slot
    and split on the critical path (the down projection of a token took 71 us instead of 45,
    docs/performance.md)."""
    g = tl.arange(0, GROUP)[None, :, None]
    part = tl.zeros((S, 128), tl.float32)
    for s0 in range(0, SPLIT_K, GROUP):
        rows = slots[:, None, None] * SPLIT_K + s0 + g
        part += tl.sum(tl.load(ws_ptr + rows * N + cols[None, None, :], mask=valid[:, None, None] & (s0 + g < SPLIT_K),
                               other=0.0, cache_modifier=".cg"), axis=1)
    svh = tl.load(svh_ptr + experts[:, None] * N + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    return rotate_output(part, h32_ptr, S) * svh * scales[:, None]


@triton.jit
def _finish_column_block(acc, pid_n, cols, slot, token, e_safe, pid_s, ids_ptr, rw_ptr, svh_ptr, y_ptr, ws_ptr,
                         lock_ptr, h32_ptr, N, nb, stride_ym, base_ptr, stride_bm, TOPK: tl.constexpr,
                         REDUCE: tl.constexpr, SPLIT_K: tl.constexpr, TOPK_P2: tl.constexpr,
                         SPLIT_GROUP: tl.constexpr, HAS_BASE: tl.constexpr):
    """One program's ``[1, 128]`` partial of column block ``pid_n``: stored as the slot's output (no split, no
    routing weights), or put in the workspace, where the last of the programs that share the output block
    (a slot's K slices; with routing weights all of the token's slots) adds them in a fixed order. ``cols``: the
    block's column indices, computed by the caller before its main loop (computed here instead, the previous
    loop's kernel needed 99 registers instead of 79 when compiled for sm_90)."""
    if (not REDUCE) and SPLIT_K == 1:
        y = rotate_output(acc, h32_ptr, 1) * tl.load(svh_ptr + e_safe * N + cols).to(tl.float32)[None, :]
        tl.store(y_ptr + slot * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty))
    else:
        tl.store(ws_ptr + (slot * SPLIT_K + pid_s) * N + cols[None, :], acc)
        tl.debug_barrier()
        if REDUCE:
            lock = lock_ptr + token * nb + pid_n
            expected = TOPK * SPLIT_K
        else:
            lock = lock_ptr + slot * nb + pid_n
            expected = SPLIT_K
        arrived = tl.atomic_add(lock, 1, sem="acq_rel")
        if arrived == expected - 1:
            if REDUCE:  # the token's slots in slot order, summed in one fixed order (deterministic)
                j = tl.arange(0, TOPK_P2)
                slots_j = token * TOPK + j
                e_j = tl.load(ids_ptr + slots_j, mask=j < TOPK, other=-1)
                used = e_j >= 0
                rw_j = tl.load(rw_ptr + slots_j, mask=used, other=0.0).to(tl.float32)
                y = _slots_output(ws_ptr, slots_j, used, tl.maximum(e_j, 0), rw_j, SPLIT_K, SPLIT_GROUP, N, cols,
                                  svh_ptr, h32_ptr, TOPK_P2)
                total = tl.sum(y, axis=0)[None, :]
                if HAS_BASE:  # e.g. the shared expert's output: one rounding to the output dtype for both
                    total += tl.load(base_ptr + token * stride_bm + cols[None, :]).to(tl.float32)
                tl.store(y_ptr + token * stride_ym + cols[None, :], total.to(y_ptr.dtype.element_ty))
            else:
                one = tl.arange(0, 1)
                y = _slots_output(ws_ptr, slot + one, one == 0, e_safe + one, tl.full((1,), 1.0, tl.float32),
                                  SPLIT_K, SPLIT_GROUP, N, cols, svh_ptr, h32_ptr, 1)
                tl.store(y_ptr + slot * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty))
            tl.atomic_xchg(lock, 0)


@triton.jit
def _exl3_moe_decode_kernel(
    x_ptr, scratch_ptr, ids_ptr, rw_ptr, t32_ptr, suh_ptr, svh_ptr, y_ptr, ws_ptr, lock_ptr, h32_ptr,
    N, K, TN, k_tiles_per_split, expert_w32, stride_xm, stride_ym, member_experts, base_ptr, stride_bm,
    W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
    CB: tl.constexpr, USE_PTX: tl.constexpr,
    TOPK: tl.constexpr, X_PER_SLOT: tl.constexpr, REDUCE: tl.constexpr, SPLIT_K: tl.constexpr,
    BTK: tl.constexpr, NCH: tl.constexpr, TOPK_P2: tl.constexpr, SPLIT_GROUP: tl.constexpr,
    # MoeDecodeConfig: the one-row loop (PREFETCH > 0: triton_gemv's ring with LANES / EARLY_LOAD as the dense
    # kernel), column blocks per program (one rotation of the slice serves them all), rotation in the kernel
    # (else x_ptr holds each slot's rotated row, from a separate launch)
    PREFETCH: tl.constexpr = 0, LANES: tl.constexpr = 0, EARLY_LOAD: tl.constexpr = False,
    COL_BLOCKS: tl.constexpr = 1, ROTATE_IN_KERNEL: tl.constexpr = True,
    # MEMBERS > 1: the stack is that many equal parts (gate and up experts) and ids_ptr holds TOPK // MEMBERS ids
    # per token; slot j of a token reads part j // (TOPK // MEMBERS) (exl3_moe_ref's ``members``)
    MEMBERS: tl.constexpr = 1,
    # with REDUCE: base_ptr [T, N] (x's dtype) is added to each token's weighted sum
    HAS_BASE: tl.constexpr = False,
):
    pid_c = tl.program_id(0)
    slot = tl.program_id(1)
    pid_s = tl.program_id(2)
    nb = N // 128
    token = slot // TOPK
    kt_begin = pid_s * k_tiles_per_split
    if MEMBERS > 1:
        PER: tl.constexpr = TOPK // MEMBERS
        j = slot % TOPK
        e = tl.load(ids_ptr + token * PER + j % PER)
        e = tl.where(e >= 0, e + (j // PER) * member_experts, e)
    else:
        e = tl.load(ids_ptr + slot)
    e_safe = tl.maximum(e, 0)
    RING: tl.constexpr = PREFETCH > 0

    for c in tl.static_range(COL_BLOCKS):
        pid_n = pid_c * COL_BLOCKS + c
        cols = pid_n * 128 + tl.arange(0, 128)
        acc = tl.zeros((1, 128), tl.float32)
        if e >= 0:
            # computed here, not before the loop: held across the rotation they cost the previous loop ~20
            # registers (compiled for sm_90)
            t32_e = t32_ptr + e_safe.to(tl.int64) * expert_w32
            if ROTATE_IN_KERNEL:  # this program's private copy of its slot's rotated K-slice
                src_row = slot * (nb // COL_BLOCKS) + pid_c
                src_ptr = scratch_ptr
                stride_src = K
            else:
                src_row = slot
                src_ptr = x_ptr
                stride_src = stride_xm
            if RING and (EARLY_LOAD or c > 0):  # the first trellis loads fly while the prologue rotates x
                (wa0, wa1, wa2, wb0, wb1, wb2, wc0, wc1, wc2, wd0, wd1, wd2) = ring_prologue(
                    t32_e, kt_begin, k_tiles_per_split // BTK, pid_n * 8, TN, W32, KA, HALF, NLOAD, BTK, PREFETCH + 1,
                    LANES)
            if ROTATE_IN_KERNEL and c == 0:
                x_row = slot if X_PER_SLOT else token
                rotate_row_slice_into_scratch(x_ptr + x_row * stride_xm, 0, suh_ptr + e_safe * K,
                                              scratch_ptr + src_row.to(tl.int64) * K,
                                              kt_begin * 16, k_tiles_per_split * 16, NCH)
            if RING:
                if not (EARLY_LOAD or c > 0):
                    (wa0, wa1, wa2, wb0, wb1, wb2, wc0, wc1, wc2, wd0, wd1, wd2) = ring_prologue(
                        t32_e, kt_begin, k_tiles_per_split // BTK, pid_n * 8, TN, W32, KA, HALF, NLOAD, BTK,
                        PREFETCH + 1, LANES)
                acc = ring_gemv(src_ptr.to(tl.pointer_type(tl.int32), bitcast=True),
                                (src_row.to(tl.int64) * stride_src) // 2, t32_e, kt_begin, k_tiles_per_split,
                                pid_n * 8, TN, wa0, wa1, wa2, wb0, wb1, wb2, wc0, wc1, wc2, wd0, wd1, wd2,
                                W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, PREFETCH + 1, LANES)
            else:
                acc = decode_matmul(src_ptr, src_row, True, stride_src, t32_e, kt_begin, k_tiles_per_split, pid_n * 8,
                                    TN, W32, KA, HALF, NLOAD, CB, USE_PTX, 1, BTK)
        _finish_column_block(acc, pid_n, cols, slot, token, e_safe, pid_s, ids_ptr, rw_ptr, svh_ptr, y_ptr, ws_ptr,
                             lock_ptr, h32_ptr, N, nb, stride_ym, base_ptr, stride_bm, TOPK, REDUCE, SPLIT_K, TOPK_P2,
                             SPLIT_GROUP, HAS_BASE)


@triton.jit
def _exl3_moe_grouped_kernel(
    xh_ptr, slots_ptr, block_expert_ptr, rw_ptr, t32_ptr, svh_ptr, y_ptr, h32_ptr,
    N, TN, k_tiles, expert_w32, stride_xm, stride_ym,
    W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
    CB: tl.constexpr, USE_PTX: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr, BTK: tl.constexpr, LANES: tl.constexpr = 0,
):
    # xh: one rotated input row per slot (rotated with its expert's suh)
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_b)
    if e < 0:  # a spare block (align_slots allocates for the worst case)
        return
    slots = tl.load(slots_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slots >= 0
    src_rows = tl.where(valid, slots, 0)
    cols = pid_n * 128 + tl.arange(0, 128)
    acc = decode_matmul(xh_ptr, src_rows, valid, stride_xm, t32_ptr + e.to(tl.int64) * expert_w32, 0, k_tiles,
                        pid_n * 8, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BLOCK_M, BTK, LANES)
    y = rotate_output(acc, h32_ptr, BLOCK_M) * tl.load(svh_ptr + e * N + cols).to(tl.float32)[None, :]
    if HAS_WEIGHTS:
        y = y * tl.load(rw_ptr + src_rows, mask=valid, other=0.0)[:, None]
    tl.store(y_ptr + src_rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=valid[:, None])


_decode = FastLauncher(_exl3_moe_decode_kernel)
_grouped = FastLauncher(_exl3_moe_grouped_kernel)


def reduction_group(split: int, top_k: int) -> int:
    """Split-K partials per slot that the reducing program loads at once: all of a token's slots
    times up to 32 // top_k splits (registers), a power of two."""
    return min(next_power_of_2(split), max(1, 32 // next_power_of_2(top_k)))


# ------------------------------------------------------------------ launch

def align_slots(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort slots by expert and pad each expert's run to ``block_m`` rows, without a host sync.

    Returns ``slots`` int32 ``[max_blocks * block_m]`` (slot index or -1) and
    ``block_expert`` int32 ``[max_blocks]`` (-1 for unused blocks), where
    ``max_blocks = slots // block_m + num_experts`` bounds the blocks any routing
    can need. Negative expert ids are dropped.
    """
    flat = expert_ids.reshape(-1).long()
    dev, n_slots = flat.device, flat.numel()
    max_blocks = n_slots // block_m + num_experts
    ids = torch.where(flat >= 0, flat, num_experts)  # dropped slots sort last, into a dummy expert
    order = torch.argsort(ids, stable=True)
    # scatter_add, not bincount: bincount reads the maximum back to the host, which a CUDA graph forbids
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add_(
        0, ids, torch.ones_like(ids))[:num_experts]
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    start = torch.cumsum(counts, 0) - counts
    sorted_ids = ids[order]
    valid = sorted_ids < num_experts
    e = sorted_ids.clamp(max=num_experts - 1)
    pos = (block_end[e] - blocks[e]) * block_m + torch.arange(n_slots, device=dev) - start[e]
    pos = torch.where(valid, pos, max_blocks * block_m)  # dropped slots land in a spare entry
    slots = torch.full((max_blocks * block_m + 1,), -1, dtype=torch.int32, device=dev)
    slots.scatter_(0, pos, order.to(torch.int32))
    b = torch.arange(max_blocks, device=dev)
    owner = torch.searchsorted(block_end, b, right=True)
    block_expert = torch.where(owner < num_experts, owner, -1).to(torch.int32)
    return slots[:-1], block_expert


@dataclass(frozen=True)
class MoeDecodeConfig:
    """How the decode schedule runs (``kernels/tuning.py`` picks it; ``bench/kernels.py --sections moe_variants``
    compares them).

    btk, num_warps: tile rows per step and warps per program. prefetch_steps: None keeps
    ``decode_matmul``'s one-row loop (one step ahead); 1-3 the dense kernel's ring loop
    (``triton_gemv.ring_gemv``) with that many steps of trellis words in flight. lane_major: one tile's
    words per warp-level load (ring only). early_load: the ring's first loads issued before the in-kernel
    rotation. split_k: target K slices per slot (None: ``choose_split_k``'s programs-per-SM rule).
    col_blocks: 128-column blocks per program, one after another on one rotated K-slice (the largest
    divisor of the column blocks up to this): fewer programs re-rotating the same slice. rotate_in_kernel:
    False rotates each slot's row in a separate launch and the kernel reads it (no rotation, scratch
    store or barrier per program).
    """

    btk: int = 2
    num_warps: int = 8
    prefetch_steps: int | None = None
    lane_major: bool = False
    early_load: bool = False
    split_k: int | None = None
    col_blocks: int = 1
    rotate_in_kernel: bool = True

    def __post_init__(self):
        if self.btk not in (1, 2, 4, 8):
            raise InvalidArgumentError(f"MoeDecodeConfig.btk must be 1, 2, 4 or 8 (K slices are 8 tile rows), "
                                       f"got {self.btk}")
        if self.prefetch_steps is not None and self.prefetch_steps not in (1, 2, 3):
            raise InvalidArgumentError(f"MoeDecodeConfig.prefetch_steps must be 1, 2 or 3, got {self.prefetch_steps}")
        if self.prefetch_steps is None and (self.lane_major or self.early_load):
            raise InvalidArgumentError("MoeDecodeConfig.lane_major and early_load select variants of the ring loop: "
                                       "set prefetch_steps (1-3) too")
        if self.early_load and not self.rotate_in_kernel:
            raise InvalidArgumentError("MoeDecodeConfig.early_load overlaps the in-kernel rotation: it needs "
                                       "rotate_in_kernel=True")
        if self.col_blocks < 1:
            raise InvalidArgumentError(f"MoeDecodeConfig.col_blocks must be >= 1, got {self.col_blocks}")

    def describe(self) -> str:
        return (f"btk{self.btk} w{self.num_warps}{f' ring{self.prefetch_steps}' if self.prefetch_steps else ''}"
                f"{' lanes' if self.lane_major else ''}{' early' if self.early_load else ''}"
                f"{f' sk{self.split_k}' if self.split_k else ''}"
                f"{f' cols{self.col_blocks}' if self.col_blocks > 1 else ''}"
                f"{'' if self.rotate_in_kernel else ' rot-launch'}")


@functools.lru_cache(maxsize=None)
def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _check(x: torch.Tensor, experts: Exl3ExpertStack, expert_ids: torch.Tensor):
    k, n = experts.in_features, experts.out_features
    if k % 128 or n % 128:
        raise ValueError(f"{experts.key}: MoE kernels need dims divisible by 128, got [{k}, {n}]")
    if x.shape[-1] != k:
        raise ValueError(f"{experts.key}: input has {x.shape[-1]} features, experts expect {k}")
    if expert_ids.dim() != 2:
        raise ValueError(f"expert_ids must be [tokens, top_k], got {list(expert_ids.shape)}")


def _format(experts: Exl3ExpertStack, x: torch.Tensor, use_ptx: bool | None) -> dict:
    layout = lane_layout(experts.bits)
    return dict(W32=layout.w32, KA=layout.ka, HALF=layout.half, NLOAD=layout.nload, CB=int(experts.codebook),
                USE_PTX=x.is_cuda if use_ptx is None else use_ptx)


def exl3_moe_triton(
    x: torch.Tensor,
    experts: Exl3ExpertStack,
    expert_ids: torch.Tensor,
    routing_weights: torch.Tensor | None = None,
    *,
    schedule: str | None = None,
    split_k: int | None = None,
    block_m: int | None = None,
    btk: int = 2,
    num_warps: int = 8,
    use_ptx: bool | None = None,
    out: torch.Tensor | None = None,
    lane_major: bool = True,
    decode: MoeDecodeConfig | None = None,
    members: int = 1,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``exl3_moe_ref``; ``schedule`` is "decode", "grouped" or None (by size).

    ``members`` (a stack of equal parts, e.g. gate + up): the decode kernel derives each slot's expert from
    the token's ids itself, so a decode step launches nothing to build the stacked ids; the other paths
    build them (``member_ids``). Expert ids may be int32 or int64 (read as they are), routing weights any
    float dtype. ``base [T, n]`` (with routing weights): added to each token's sum (``exl3_moe_ref``).

    ``out`` (decode schedule): a contiguous tensor of the result's shape to write into.
    ``decode``: the decode schedule's ``MoeDecodeConfig`` (None: ``kernels/tuning.py``'s); ``split_k``, when
    given, overrides its ``split_k``. ``btk``, ``num_warps``, ``lane_major``, ``block_m``: the grouped
    schedule's (``lane_major``: one tile per warp-level word load, as the dense GEMMs of several
    rows; kernels/tuning.py, measured there 1.2-1.4x on the tensor-core loop).
    """
    _check(x, experts, expert_ids)
    t, top_k = expert_ids.shape
    top_k *= members  # slots per token
    k, n = experts.in_features, experts.out_features
    per_slot = x.dim() == 3
    check_moe_options(experts, members, per_slot, routing_weights, base, t)
    if base is not None and base.stride(-1) != 1:
        raise ValueError(f"{experts.key}: the MoE kernels read base's rows contiguously")
    xs = x.reshape(t * top_k if per_slot else t, k)
    if xs.stride(-1) != 1:
        xs = xs.contiguous()
    slots = t * top_k
    if schedule is None:
        schedule = "decode" if slots <= tuning.MOE_DECODE_MAX_SLOTS else "grouped"
    if decode is None and schedule == "decode":
        decode = moe_decode_config(k, n, slots)
    if members > 1 and (schedule != "decode" or not decode.rotate_in_kernel):  # these read one id per slot
        expert_ids = member_ids(expert_ids, experts.num_experts // members, members)
        members = 1
    fmt = _format(experts, x, use_ptx)
    locks, h32 = device_buffers(x.device)
    ids = expert_ids.contiguous()
    t32 = experts.trellis.view(torch.int32)
    expert_w32 = t32[0].numel()
    nb, k_tiles, dev = n // 128, k // 16, x.device
    rw = routing_weights.contiguous() if routing_weights is not None else h32

    if schedule == "decode":
        reduce = routing_weights is not None
        col_blocks = _largest_divisor(nb, decode.col_blocks)
        split = choose_split_k(k_tiles // 8, nb // col_blocks * slots, sm_count(dev),
                               split_k if split_k is not None else decode.split_k)
        if (t if reduce else slots) * nb > LOCK_SLOTS:
            raise ValueError("too many output blocks for the MoE counters")
        y = (torch.empty((t if reduce else slots, n), dtype=x.dtype, device=dev) if out is None
             else out.view(t if reduce else slots, n))
        ws = torch.empty((slots * split, n), dtype=torch.float32, device=dev) if (reduce or split > 1) else h32
        if decode.rotate_in_kernel:
            src, scratch = xs, torch.empty((slots * (nb // col_blocks), k), dtype=torch.float16, device=dev)
        else:  # one launch rotates every slot's row with its expert's suh; the kernel reads those rows
            from .triton_hadamard import exl3_input_rotate_gathered

            x_rows = torch.arange(slots, device=dev)
            src = exl3_input_rotate_gathered(xs, experts.suh, x_rows if per_slot else x_rows // top_k,
                                             ids.reshape(-1).clamp(min=0))
            scratch = h32
        _decode(
            (nb // col_blocks, slots, split),
            src, scratch, ids, rw, t32, experts.suh, experts.svh, y, ws, locks, h32,
            n, k, n // 16, k_tiles // split, expert_w32, src.stride(0), y.stride(0), experts.num_experts // members,
            base if base is not None else y, base.stride(0) if base is not None else 0,
            TOPK=top_k, X_PER_SLOT=per_slot, REDUCE=reduce, SPLIT_K=split, BTK=decode.btk,
            TOPK_P2=next_power_of_2(top_k), SPLIT_GROUP=reduction_group(split, top_k) if reduce else 1,
            NCH=next_power_of_2(k_tiles // split // 8), PREFETCH=decode.prefetch_steps or 0,
            LANES=lanes_arrangement() if decode.lane_major else 0, EARLY_LOAD=decode.early_load,
            COL_BLOCKS=col_blocks, ROTATE_IN_KERNEL=decode.rotate_in_kernel, MEMBERS=members, HAS_BASE=base is not None,
            num_warps=decode.num_warps, num_stages=1, **fmt,
        )
        return y if reduce else y.reshape(t, top_k, n)

    # grouped: rotate each slot's row once with its expert's suh, then one decode-GEMM launch
    from .triton_hadamard import exl3_input_rotate_gathered

    if block_m is None:  # measured: bigger blocks pay once experts see many tokens each
        block_m = 16 if slots <= 16 * experts.num_experts else 64
    slot_ids, block_expert = align_slots(expert_ids, experts.num_experts, block_m)
    flat_ids = expert_ids.reshape(-1)
    x_rows = torch.arange(slots, device=dev) if per_slot else torch.arange(slots, device=dev) // top_k
    xh = exl3_input_rotate_gathered(xs, experts.suh, x_rows, flat_ids.clamp(min=0))
    y = torch.zeros((slots, n), dtype=torch.float32 if routing_weights is not None else x.dtype, device=dev)
    blocks = block_expert.numel()
    if slots:
        rw_flat = routing_weights.float().reshape(-1).contiguous() if routing_weights is not None else h32
        _grouped(
            (nb, blocks),
            xh, slot_ids, block_expert, rw_flat, t32, experts.svh, y, h32,
            n, n // 16, k_tiles, expert_w32, xh.stride(0), y.stride(0),
            HAS_WEIGHTS=routing_weights is not None, BLOCK_M=block_m, BTK=btk,
            LANES=lanes_arrangement() if lane_major else 0,  # one tile per warp-level word load (as dense GEMMs)
            num_warps=num_warps, num_stages=1, **fmt,
        )
    if routing_weights is None:
        return y.reshape(t, top_k, n)
    total = y.reshape(t, top_k, n).sum(1)
    return (total if base is None else total + base.float()).to(x.dtype)
