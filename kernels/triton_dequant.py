"""Triton dequantization: trellis -> W_hat fp16, bit-exact (whole matrix or a column block).

Batches of 33 to ``tuning.RECONSTRUCT_MIN_ROWS - 1`` rows rotate x, multiply by
W_hat with ``torch.matmul`` and rotate the result; the converter uses it too.
From ``RECONSTRUCT_MIN_ROWS`` rows the full weight W is reconstructed instead
(``triton_reconstruct.py``), which skips the activation rotations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher
from .triton_decode import decode_tiles, lane_layout
from .weights import Exl3Weight


@triton.jit
def _dequant_kernel(
    t32_ptr, out_ptr,
    TN, nt_start, stride_out,
    W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
    CB: tl.constexpr, USE_PTX: tl.constexpr, BTK: tl.constexpr, BTN: tl.constexpr,
):
    kt = tl.program_id(0) * BTK
    nt = nt_start + tl.program_id(1) * BTN
    w = decode_tiles(t32_ptr, kt, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, BTN)
    rows = kt * 16 + tl.arange(0, 16 * BTK)
    cols = (nt - nt_start) * 16 + tl.arange(0, 16 * BTN)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], w)


_dequant = FastLauncher(_dequant_kernel)


def _launch_params(w: Exl3Weight, use_ptx: bool | None):
    layout = lane_layout(w.bits)
    if use_ptx is None:
        use_ptx = w.trellis.is_cuda
    return dict(W32=layout.w32, KA=layout.ka, HALF=layout.half, NLOAD=layout.nload,
                CB=int(w.codebook), USE_PTX=use_ptx)


def dequant_inner_triton(w: Exl3Weight, col_start: int = 0, col_end: int | None = None,
                         out: torch.Tensor | None = None, use_ptx: bool | None = None) -> torch.Tensor:
    """``W_hat[:, col_start:col_end]`` fp16 ``[in, cols]``; columns must be multiples of 16."""
    tk, tn, _ = w.trellis.shape
    col_end = 16 * tn if col_end is None else col_end
    if col_start % 16 or col_end % 16 or not 0 <= col_start < col_end <= 16 * tn:
        raise ValueError(f"column range [{col_start}, {col_end}) must be 16-aligned within [0, {16 * tn})")
    ncols = col_end - col_start
    if out is None:
        out = torch.empty(16 * tk, ncols, dtype=torch.float16, device=w.trellis.device)
    btn = 8 if ncols % 128 == 0 else 1
    btk = 4 if tk % 4 == 0 else 1
    grid = (tk // btk, ncols // (16 * btn))
    _dequant(grid, w.trellis.view(torch.int32), out, tn, col_start // 16, out.stride(0),
             BTK=btk, BTN=btn, num_warps=4, num_stages=2, **_launch_params(w, use_ptx))
    return out
