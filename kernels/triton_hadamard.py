"""Triton 128-point Hadamard rotation with the sign/scale vectors fused.

Two kernels:

* ``hadamard_128_triton(x, pre, post)``: ``((x * pre) . H) * post`` in fp32
  (the dot runs as tf32x3, i.e. fp32-accurate on tensor cores).
* ``exl3_input_rotate(x, suh)``: the EXL3 input side with ExLlamaV3's rounding
  points, ``fp16(H(fp16(x * suh)))``; the fp16 x fp16(+-1) dot is exact apart
  from fp32 accumulation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_decode import HAD_SCALE, hadamard_matrix


@triton.jit
def _hadamard_kernel(
    x_ptr, pre_ptr, post_ptr, y_ptr,
    R, stride_x, stride_y,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, BLOCK_R: tl.constexpr, ROUND_FP16: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    mask = rows[:, None] < R
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:
        x = x * tl.load(pre_ptr + cols).to(tl.float32)[None, :]
    if ROUND_FP16:
        y = tl.dot(x.to(tl.float16), hadamard_matrix(tl.float16))
    else:
        y = tl.dot(x, hadamard_matrix(tl.float32), input_precision="tf32x3")
    y = y * HAD_SCALE
    if HAS_POST:
        y = y * tl.load(post_ptr + cols).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, pre, post, out_dtype: torch.dtype, round_fp16: bool) -> torch.Tensor:
    if x.shape[-1] % 128:
        raise ValueError(f"Hadamard rotation needs a last dimension divisible by 128, got {x.shape[-1]}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r, c = x2.shape
    y = torch.empty((r, c), dtype=out_dtype, device=x.device)
    block_r = 16 if r <= 16 else 64
    grid = (triton.cdiv(r, block_r), c // 128)
    _hadamard_kernel[grid](
        x2, pre if pre is not None else x2, post if post is not None else x2, y,
        r, x2.stride(0), y.stride(0),
        HAS_PRE=pre is not None, HAS_POST=post is not None, BLOCK_R=block_r, ROUND_FP16=round_fp16,
        num_warps=4,
    )
    return y.reshape(*x.shape[:-1], c)


def hadamard_128_triton(x: torch.Tensor, pre_scale=None, post_scale=None) -> torch.Tensor:
    """``((x * pre) . H128) * post`` along the last dim, fp32 result."""
    return _launch(x, pre_scale, post_scale, torch.float32, round_fp16=False)


def exl3_input_rotate(x: torch.Tensor, suh: torch.Tensor) -> torch.Tensor:
    """``fp16(H(fp16(x * suh)))``: the rotated activations an EXL3 GEMM consumes."""
    return _launch(x, suh, None, torch.float16, round_fp16=True)
