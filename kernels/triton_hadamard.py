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
from .triton_decode import HAD_SCALE, hadamard_rows, sign_matrix


@triton.jit
def _hadamard_kernel(
    x_ptr, pre_ptr, post_ptr, bias_ptr, y_ptr, x_rows_ptr, pre_rows_ptr, h_ptr,
    R, C, stride_x, stride_y,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
    ROUND_FP16: tl.constexpr, BLOCK_R: tl.constexpr, FULL_DOT: tl.constexpr,
    ROW_BLOCKS: tl.constexpr = 1, H_IN_REGISTERS: tl.constexpr = False, H16: tl.constexpr = False,
):
    """``ROW_BLOCKS`` blocks of ``BLOCK_R`` rows per program (the tensor-core form): H is made
    once per program, from memory or (``H_IN_REGISTERS``) from the index bits."""
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    if FULL_DOT:
        i = tl.arange(0, 128)
        if H_IN_REGISTERS:
            h = sign_matrix(128)
        else:
            h = tl.load(h_ptr + i[:, None] * 128 + i[None, :])
        if H16:
            h = h.to(tl.float16)
    else:
        h = tl.zeros((1, 1), tl.float32)  # unused: the factored form builds its own
    for rb in range(ROW_BLOCKS):
        _hadamard_block(x_ptr, pre_ptr, post_ptr, bias_ptr, y_ptr, x_rows_ptr, pre_rows_ptr, h,
                        (tl.program_id(0) * ROW_BLOCKS + rb) * BLOCK_R + tl.arange(0, BLOCK_R), cols, R, C,
                        stride_x, stride_y, HAS_PRE, HAS_POST, HAS_BIAS, GATHER, ROUND_FP16, BLOCK_R, FULL_DOT, H16)


@triton.jit
def _hadamard_block(x_ptr, pre_ptr, post_ptr, bias_ptr, y_ptr, x_rows_ptr, pre_rows_ptr, h, rows, cols, R, C,
                    stride_x, stride_y, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr,
                    GATHER: tl.constexpr, ROUND_FP16: tl.constexpr, BLOCK_R: tl.constexpr, FULL_DOT: tl.constexpr,
                    H16: tl.constexpr):
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
    if FULL_DOT:  # blocks of many rows: one tensor-core product with H
        if H16:
            y = tl.dot(x.to(tl.float16), h) * HAD_SCALE
        else:
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


# Tensor-core form (more than 16 rows): rows per block, blocks per program, H made in registers
# or loaded from memory, warps. Measured in CUDA graphs on the H100 (bench/kernels.py --sections
# rotations, bench/results/kernels-2026-11-22-H100-rotations.json), input / output side, us:
# 2048 x 8192: 128-row blocks with H loaded 39.6 / 38.3, 64-row blocks x 4 per program with H in
# registers 30.6 / 29.9 (2.2 TB/s); 8192 x 4096: 72.1 / 71.4 -> 54.4 / 54.8; but 512 x 4096:
# 7.3 / 7.1 with one 64-row block per program, 7.9-10.7 with fewer, longer programs.
ROTATION_SCHEDULE = dict(block_r=None, row_blocks=1, h_in_registers=False, num_warps=4)
MANY_ROWS = 2048
MANY_ROWS_SCHEDULE = dict(block_r=64, row_blocks=4, h_in_registers=True, num_warps=4)


FEW_ROWS_SCHEDULE = dict(row_blocks=1, h_in_registers=False, num_warps=4)  # up to 16 rows: the factored form


def _launch(x2: torch.Tensor, rows: int, pre, post, out_dtype, round_fp16: bool, x_rows=None, pre_rows=None,
            bias=None, schedule: dict | None = None):
    c = x2.shape[-1]
    if c % 128:
        raise ValueError(f"Hadamard rotation needs a last dimension divisible by 128, got {c}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((rows, c), dtype=out_dtype, device=x2.device)
    full_dot = rows > 16  # measured: the factored form is slow on large blocks (bench/kernels.py, large_batch_parts)
    if not full_dot:
        sched = FEW_ROWS_SCHEDULE
    else:  # merged only when a caller (the bench) overrides part of it: this runs on every eager call
        default = MANY_ROWS_SCHEDULE if rows >= MANY_ROWS else ROTATION_SCHEDULE
        sched = {**default, **schedule} if schedule else default
    block_r = (sched["block_r"] or (128 if rows >= 1024 else 64)) if full_dot else 16
    row_blocks = max(1, min(sched["row_blocks"], -(-rows // block_r)))
    gather = x_rows is not None
    _rotate(
        (-(-rows // (block_r * row_blocks)), c // 128),
        x2, pre if pre is not None else x2, post if post is not None else x2, bias if bias is not None else x2, y,
        x_rows if gather else y, pre_rows if gather else y, _sylvester(x2.device),
        rows, c, x2.stride(0), y.stride(0),
        HAS_PRE=pre is not None, HAS_POST=post is not None, HAS_BIAS=bias is not None, GATHER=gather,
        ROUND_FP16=round_fp16, BLOCK_R=block_r, FULL_DOT=full_dot,
        ROW_BLOCKS=row_blocks, H_IN_REGISTERS=sched["h_in_registers"],
        # fp16 operands (x * suh rounded as ExLlamaV3 does, or fp16 input): products with +-1
        # are exact and sums fp32, so the fp16 tensor-core product is as exact as fp32
        H16=full_dot and (round_fp16 or (x2.dtype == torch.float16 and pre is None)),
        num_warps=sched["num_warps"], num_stages=1,
    )
    return y


def _sylvester(device: torch.device) -> torch.Tensor:
    from .triton_gemm import device_buffers

    return device_buffers(device)[1]


def hadamard_128_triton(x: torch.Tensor, pre_scale=None, post_scale=None) -> torch.Tensor:
    """``((x * pre) . H128) * post`` along the last dim, fp32 result."""
    x2 = x.reshape(-1, x.shape[-1])
    return _launch(x2, x2.shape[0], pre_scale, post_scale, torch.float32, False).reshape(x.shape)


def exl3_input_rotate(x: torch.Tensor, suh: torch.Tensor, schedule: dict | None = None) -> torch.Tensor:
    """``fp16(H(fp16(x * suh)))``: the rotated activations an EXL3 GEMM consumes."""
    if x.dim() == 2:
        return _launch(x, x.shape[0], suh, None, torch.float16, True, schedule=schedule)
    x2 = x.reshape(-1, x.shape[-1])
    return _launch(x2, x2.shape[0], suh, None, torch.float16, True, schedule=schedule).reshape(x.shape)


def exl3_output_rotate(acc: torch.Tensor, svh: torch.Tensor, bias: torch.Tensor | None,
                       out_dtype: torch.dtype, schedule: dict | None = None) -> torch.Tensor:
    """``H(acc) * svh + bias`` in ``out_dtype``: the output side of an EXL3 matmul, one pass."""
    return _launch(acc, acc.shape[0], None, svh, out_dtype, False, bias=bias, schedule=schedule)


def exl3_input_rotate_gathered(x: torch.Tensor, suh_stack: torch.Tensor, x_rows: torch.Tensor,
                               suh_rows: torch.Tensor) -> torch.Tensor:
    """Row r of the result is ``fp16(H(fp16(x[x_rows[r]] * suh_stack[suh_rows[r]])))``."""
    return _launch(x, x_rows.numel(), suh_stack, None, torch.float16, True,
                   x_rows.to(torch.int32).contiguous(), suh_rows.to(torch.int32).contiguous())
