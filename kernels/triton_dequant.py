"""Triton dequantization: trellis -> W_hat fp16, bit-exact, or -> the full weight W.

* ``dequant_inner_triton(w, col_start, col_end)``: ``W_hat[:, cols]`` fp16,
  bit-exact (large batches rotate x, multiply, rotate y; the converter).
* ``reconstruct_triton(w)``: ``W = diag(suh) . H . W_hat . H . diag(svh)`` fp16
  ``[in, out]``, so very large batches run one plain fp16 matmul with no
  activation rotations. Per 128x128 block: two fp16 tensor-core products with
  H (+-1, exact products, fp32 sums), the intermediate rounded to fp16 like
  ExLlamaV3's fused reconstruct (relative error ~1e-3 against fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher
from .triton_decode import HAD_SCALE, decode_tiles, lane_layout
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


@triton.jit
def _reconstruct_kernel(
    t32_ptr, suh_ptr, svh_ptr, h_ptr, out_ptr,
    TN, stride_out,
    W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
    CB: tl.constexpr, USE_PTX: tl.constexpr,
):
    kt = tl.program_id(0) * 8
    nt = tl.program_id(1) * 8
    i = tl.arange(0, 128)
    h = tl.load(h_ptr + i[:, None] * 128 + i[None, :]).to(tl.float16)
    w_hat = decode_tiles(t32_ptr, kt, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, 8, 8)
    left = (tl.dot(h, w_hat) * HAD_SCALE).to(tl.float16)  # H . W_hat, rounded to fp16
    full = tl.dot(left, h) * HAD_SCALE  # . H
    rows = kt * 16 + i
    cols = nt * 16 + i
    full = full * tl.load(suh_ptr + rows).to(tl.float32)[:, None] * tl.load(svh_ptr + cols).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], full.to(tl.float16))


_dequant = FastLauncher(_dequant_kernel)
_reconstruct = FastLauncher(_reconstruct_kernel)


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


def reconstruct_triton(w: Exl3Weight, out: torch.Tensor | None = None, use_ptx: bool | None = None) -> torch.Tensor:
    """The full weight ``W`` fp16 ``[in, out]`` (without bias)."""
    from .triton_gemm import device_buffers

    k, n = w.in_features, w.out_features
    if k % 128 or n % 128:
        raise ValueError(f"reconstruct needs dims divisible by 128, got [{k}, {n}]")
    if out is None:
        out = torch.empty(k, n, dtype=torch.float16, device=w.trellis.device)
    _reconstruct((k // 128, n // 128), w.trellis.view(torch.int32), w.suh, w.svh, device_buffers(w.device)[1], out,
                 n // 16, out.stride(0), num_warps=8, num_stages=1, **_launch_params(w, use_ptx))
    return out
