"""Triton reconstruction of a whole EXL3 weight: trellis -> ``W = diag(suh) . H . W_hat . H . diag(svh)`` fp16.

Large batches (``tuning.RECONSTRUCT_MIN_ROWS`` rows and up) multiply by this W with
one ``torch.matmul``/``torch.addmm`` instead of rotating the activations on both
sides of a ``W_hat`` product. Why that pays at large batches: the activations'
two rotations each read and write ``rows x features`` values, while the
rotations folded in here happen in registers on the freshly decoded block, so
the pass moves the bytes that dequantizing ``W_hat`` alone moves (read the
trellis, write fp16), plus two 128 x 128 x 128 tensor-core products per block.
Measured (docs/performance.md) it takes ~113 us at 8192 x 8192 against 63 us for
W_hat alone: the products do not fully overlap with the memory traffic (two
programs of 4 warps per SM, limited by registers), so it pays only from ~2048 rows.

One program owns a run of 128 x 128 blocks (persistent: a grid of at most
``programs_per_sm`` per SM). For each block it

1. decodes ``W_hat`` and computes ``L = H . W_hat`` in fp32 on the tensor cores,
   in ``row_split`` parts of rows; H has entries +-1 and W_hat is fp16, so
   these products and their fp32 sums are exact;
2. rounds ``L / 16`` to fp16 (the only rounding before the output's own) and
   multiplies by H on the tensor cores: ``R = fp16(L / 16) . H``, fp32 sums;
3. scales ``R / 8`` by ``suh`` per row and ``svh`` per column (the orthonormal
   H128 is ``H / sqrt(128)`` and ``16 * 8 = 128``) and stores fp16.

Concatenated linears (``Exl3Weight.out_splits``) give every 128-column block its
member's ``suh`` (a row offset per column block), so one product serves them all.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import FastLauncher
from .triton_decode import decode_tiles, lane_layout, sylvester_signs
from .triton_gemm import device_buffers, sm_count
from .weights import Exl3Weight


@triton.jit
def _signs(i, j):
    """Sylvester entries at index tensors ``i``, ``j`` in fp16 (exact: +-1)."""
    return sylvester_signs(i, j).to(tl.float16)


@triton.jit
def _reconstruct_kernel(
    t32_ptr, suh_ptr, suh_offset_ptr, svh_ptr, h_ptr, out_ptr,
    TN, n_blocks, n_col_blocks, stride_out,
    W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
    CB: tl.constexpr, USE_PTX: tl.constexpr, GROUPED: tl.constexpr,
    ROW_SPLIT: tl.constexpr, H_FROM_MEMORY: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """``PERSISTENT``: each program loops over blocks ``program_id, + num_programs, ...`` (H made once per program);
    else one block per program, written without a loop so that nothing per element stays live across blocks."""
    i = tl.arange(0, 128)
    if H_FROM_MEMORY:
        h = tl.zeros((1, 1), tl.float16)  # unused: each block loads H where it needs it
    else:
        h = _signs(i[:, None], i[None, :])  # made once per program from the index bits
    if PERSISTENT:
        for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            _reconstruct_block(block, h, t32_ptr, suh_ptr, suh_offset_ptr, svh_ptr, h_ptr, out_ptr, TN, n_col_blocks,
                               stride_out, W32, KA, HALF, NLOAD, CB, USE_PTX, GROUPED, ROW_SPLIT, H_FROM_MEMORY)
    else:
        _reconstruct_block(tl.program_id(0), h, t32_ptr, suh_ptr, suh_offset_ptr, svh_ptr, h_ptr, out_ptr, TN,
                           n_col_blocks, stride_out, W32, KA, HALF, NLOAD, CB, USE_PTX, GROUPED, ROW_SPLIT,
                           H_FROM_MEMORY)


@triton.jit
def _reconstruct_block(
    block, h, t32_ptr, suh_ptr, suh_offset_ptr, svh_ptr, h_ptr, out_ptr, TN, n_col_blocks, stride_out,
    W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
    CB: tl.constexpr, USE_PTX: tl.constexpr, GROUPED: tl.constexpr,
    ROW_SPLIT: tl.constexpr, H_FROM_MEMORY: tl.constexpr,
):
    """One 128 x 128 block of W: decode W_hat, then the block's output rows in ``ROW_SPLIT`` parts, each
    ``H[rows, :] . W_hat`` (a smaller accumulator than all 128 rows at once: fewer registers)."""
    ROWS: tl.constexpr = 128 // ROW_SPLIT  # output rows per part
    i = tl.arange(0, 128)
    bi = block // n_col_blocks
    bj = block % n_col_blocks
    if H_FROM_MEMORY:  # the fp16 Sylvester matrix, 32 KB that stays in L1/L2, loaded where used
        h = tl.load(h_ptr + i[:, None] * 128 + i[None, :])
    svh = tl.load(svh_ptr + bj * 128 + i).to(tl.float32) * 0.125
    if GROUPED:
        suh_row = suh_ptr + tl.load(suh_offset_ptr + bj)
    else:
        suh_row = suh_ptr
    w_hat = decode_tiles(t32_ptr, bi * 8, bj * 8, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, 8, 8)  # [128, 128] fp16
    for r in tl.static_range(ROW_SPLIT):
        part = r * ROWS + tl.arange(0, ROWS)
        if ROW_SPLIT == 1:
            h_rows = h
        elif H_FROM_MEMORY:
            h_rows = tl.load(h_ptr + part[:, None] * 128 + i[None, :])
        else:
            h_rows = _signs(part[:, None], i[None, :])
        _finish_rows(tl.dot(h_rows, w_hat), h, suh_row, svh, out_ptr, bi * 128, part, bj * 128, stride_out)


@triton.jit
def _finish_rows(left, h, suh_row, svh, out_ptr, row0, part, col0, stride_out):
    """Rows ``row0 + part`` of ``L = H . W_hat`` (fp32) -> ``diag(suh) . fp16(L / 16) . H . diag(svh / 8)``,
    stored fp16 at columns ``col0 + [0, 128)``."""
    right = tl.dot((left * 0.0625).to(tl.float16), h)
    suh = tl.load(suh_row + row0 + part).to(tl.float32)
    w = (right * suh[:, None] * svh[None, :]).to(tl.float16)
    # one 64-bit base per block and 32-bit offsets in it: 64-bit addresses per element would cost registers
    base = out_ptr + row0.to(tl.int64) * stride_out + col0
    tl.store(base + part[:, None] * stride_out + tl.arange(0, 128)[None, :], w)


_reconstruct = FastLauncher(_reconstruct_kernel)


# The schedule, swept by bench/reconstruct.py on the H100 (8192 x 8192, 4 bits, CUDA graphs; docs/performance.md,
# bench/results/reconstruct-2026-11-23-H100-*.json): 4 warps, 4 programs per SM (persistent), rows in 2 parts, H made
# in registers: 112-114 us (W_hat alone: 63 us; the fp16 write floor 58 us). One block per program with H loaded:
# 113-123 us (4 warps), 114-116 (8 warps); 8 warps persistent 158-192; W_hat decoded in 2-8 slices of rows,
# 130-270; the next block's words loaded ahead, 118-152; a register cap of 128 or 168, 254-347.
# ``programs_per_sm`` 0: one block per program (no loop).
SCHEDULE = dict(num_warps=4, programs_per_sm=4, row_split=2, h_from_memory=False, maxnreg=None)


@functools.lru_cache(maxsize=None)
def _sylvester_fp16(device: torch.device) -> torch.Tensor:
    return device_buffers(device)[1].half()  # the fp32 Sylvester matrix the rotations keep per device


def _suh_offsets(w: Exl3Weight) -> torch.Tensor:
    """For concatenated linears: per 128-column block, the offset of its member's ``suh`` row (kept on the weight)."""
    offsets = w.derived.get("reconstruct_suh_offsets")
    if offsets is None:
        if any(s % 128 for s in w.out_splits):
            raise ValueError(f"{w.key or 'EXL3 linear'}: member widths {w.out_splits} must be multiples of 128")
        members = [j for j, width in enumerate(w.out_splits) for _ in range(width // 128)]
        offsets = torch.tensor([j * w.in_features for j in members], dtype=torch.int32, device=w.device)
        w.derived["reconstruct_suh_offsets"] = offsets
    return offsets


def reconstruct_weight_triton(w: Exl3Weight, out: torch.Tensor | None = None, schedule: dict | None = None,
                              use_ptx: bool | None = None) -> torch.Tensor:
    """The full weight ``W`` fp16 ``[in, out]`` (bias not included); both dims must be multiples of 128.

    ``out``: an fp16 ``[in, out]`` tensor with unit column stride to write into.
    ``schedule``: overrides of ``SCHEDULE`` (the bench's sweep)."""
    k, n = w.in_features, w.out_features
    if k % 128 or n % 128:
        raise ValueError(f"{w.key or 'EXL3 linear'}: reconstructing W needs dims divisible by 128, got [{k}, {n}]")
    if out is None:
        out = torch.empty(k, n, dtype=torch.float16, device=w.device)
    elif out.shape != (k, n) or out.dtype != torch.float16 or out.stride(1) != 1:
        raise ValueError(f"{w.key or 'EXL3 linear'}: out must be fp16 [{k}, {n}] with unit column stride, "
                         f"got {out.dtype} {list(out.shape)} strides {out.stride()}")
    sched = {**SCHEDULE, **schedule} if schedule else SCHEDULE
    if sched["row_split"] not in (1, 2, 4, 8):
        raise ValueError(f"row_split must be 1, 2, 4 or 8, got {sched['row_split']}")
    layout = lane_layout(w.bits)
    n_blocks = (k // 128) * (n // 128)
    persistent = sched["programs_per_sm"] > 0
    grid = (min(n_blocks, sm_count(w.device) * sched["programs_per_sm"]) if persistent else n_blocks,)
    grouped = w.out_splits is not None
    suh_offsets = _suh_offsets(w) if grouped else w.svh
    _reconstruct(grid, w.trellis.view(torch.int32), w.suh, suh_offsets, w.svh, _sylvester_fp16(w.device), out,
                 n // 16, n_blocks, n // 128, out.stride(0),
                 W32=layout.w32, KA=layout.ka, HALF=layout.half, NLOAD=layout.nload, CB=int(w.codebook),
                 USE_PTX=w.trellis.is_cuda if use_ptx is None else use_ptx, GROUPED=grouped,
                 ROW_SPLIT=sched["row_split"], H_FROM_MEMORY=sched["h_from_memory"],
                 PERSISTENT=persistent, num_warps=sched["num_warps"], num_stages=1, maxnreg=sched["maxnreg"])
    return out
