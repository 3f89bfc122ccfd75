"""Triton 128-point Hadamard rotation with the sign/scale vectors fused.

* ``hadamard_128_triton(x, pre, post)``: ``((x * pre) . H) * post`` in fp32.
* ``exl3_input_rotate(x, suh)``: the EXL3 input side with ExLlamaV3's rounding
  points, ``fp16(H(fp16(x * suh)))``.
* ``exl3_output_rotate(acc, svh, bias, dtype)``: the output side, ``H(acc) * svh + bias``.
* ``exl3_input_rotate_gathered(x, suh_stack, x_rows, suh_rows)``: the same for
  rows gathered from ``x`` and each scaled by its own row of ``suh_stack`` (MoE
  slots: token row, expert ``suh``).

A few rows use ``hadamard_rows`` (H128 = H8 (x) H16, tiny operands); blocks of
many rows one tensor-core product with H loaded from memory. Both fp32-accurate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher
from .triton_decode import HAD_SCALE, hadamard_rows


@triton.jit
def _hadamard_kernel(
    x_ptr, pre_ptr, post_ptr, bias_ptr, y_ptr, x_rows_ptr, pre_rows_ptr, h_ptr,
    R, C, stride_x, stride_y,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
    ROUND_FP16: tl.constexpr, BLOCK_R: tl.constexpr, FULL_DOT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    mask = rows < R
    if GATHER:  # source row and scale row of each output row
        x_rows = tl.load(x_rows_ptr + rows, mask=mask, other=0)
        pre_rows = tl.load(pre_rows_ptr + rows, mask=mask, other=0)
    else:
        x_rows = rows
        pre_rows = tl.zeros((BLOCK_R,), tl.int32)
    x = tl.load(x_ptr + x_rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask[:, None], other=0.0)
    x = x.to(tl.float32)
    if HAS_PRE:
        x = x * tl.load(pre_ptr + pre_rows[:, None].to(tl.int64) * C + cols[None, :]).to(tl.float32)
    if FULL_DOT:  # blocks of many rows: one tensor-core product with H (from memory)
        i = tl.arange(0, 128)
        if ROUND_FP16 or (x_ptr.dtype.element_ty == tl.float16 and not HAS_PRE):
            # fp16 operands (x * suh rounded as ExLlamaV3 does, or fp16 input): products with +-1
            # are exact and sums fp32, so the fp16 tensor-core product is as exact as fp32
            h = tl.load(h_ptr + i[:, None] * 128 + i[None, :]).to(tl.float16)
            y = tl.dot(x.to(tl.float16), h) * HAD_SCALE
        else:
            h = tl.load(h_ptr + i[:, None] * 128 + i[None, :])
            y = tl.dot(x, h, input_precision="tf32x3") * HAD_SCALE
    else:  # a few rows: the factored rotation keeps registers low
        if ROUND_FP16:
            x = x.to(tl.float16).to(tl.float32)
        y = hadamard_rows(x, BLOCK_R) * HAD_SCALE
    if HAS_POST:
        y = y * tl.load(post_ptr + cols).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask[:, None])


_rotate = FastLauncher(_hadamard_kernel)


def _launch(x2: torch.Tensor, rows: int, pre, post, out_dtype, round_fp16: bool, x_rows=None, pre_rows=None,
            bias=None):
    c = x2.shape[-1]
    if c % 128:
        raise ValueError(f"Hadamard rotation needs a last dimension divisible by 128, got {c}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((rows, c), dtype=out_dtype, device=x2.device)
    full_dot = rows > 16  # measured: the factored form is slow on large blocks (bench/kernels.py, large_batch_parts)
    block_r = (128 if rows >= 1024 else 64) if full_dot else 16
    gather = x_rows is not None
    _rotate(
        (-(-rows // block_r), c // 128),
        x2, pre if pre is not None else x2, post if post is not None else x2, bias if bias is not None else x2, y,
        x_rows if gather else y, pre_rows if gather else y, _sylvester(x2.device),
        rows, c, x2.stride(0), y.stride(0),
        HAS_PRE=pre is not None, HAS_POST=post is not None, HAS_BIAS=bias is not None, GATHER=gather,
        ROUND_FP16=round_fp16, BLOCK_R=block_r, FULL_DOT=full_dot,
        num_warps=4, num_stages=1,
    )
    return y


def _sylvester(device: torch.device) -> torch.Tensor:
    from .triton_gemm import device_buffers

    return device_buffers(device)[1]


def hadamard_128_triton(x: torch.Tensor, pre_scale=None, post_scale=None) -> torch.Tensor:
    """``((x * pre) . H128) * post`` along the last dim, fp32 result."""
    x2 = x.reshape(-1, x.shape[-1])
    return _launch(x2, x2.shape[0], pre_scale, post_scale, torch.float32, False).reshape(x.shape)


def exl3_input_rotate(x: torch.Tensor, suh: torch.Tensor) -> torch.Tensor:
    """``fp16(H(fp16(x * suh)))``: the rotated activations an EXL3 GEMM consumes."""
    if x.dim() == 2:
        return _launch(x, x.shape[0], suh, None, torch.float16, True)
    x2 = x.reshape(-1, x.shape[-1])
    return _launch(x2, x2.shape[0], suh, None, torch.float16, True).reshape(x.shape)


def exl3_output_rotate(acc: torch.Tensor, svh: torch.Tensor, bias: torch.Tensor | None,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """``H(acc) * svh + bias`` in ``out_dtype``: the output side of an EXL3 matmul, one pass."""
    return _launch(acc, acc.shape[0], None, svh, out_dtype, False, bias=bias)


def exl3_input_rotate_gathered(x: torch.Tensor, suh_stack: torch.Tensor, x_rows: torch.Tensor,
                               suh_rows: torch.Tensor) -> torch.Tensor:
    """Row r of the result is ``fp16(H(fp16(x[x_rows[r]] * suh_stack[suh_rows[r]])))``."""
    return _launch(x, x_rows.numel(), suh_stack, None, torch.float16, True,
                   x_rows.to(torch.int32).contiguous(), suh_rows.to(torch.int32).contiguous())
