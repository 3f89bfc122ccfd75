"""Residual add fused with the RMSNorms around it, one row per program, in Triton.

Gemma-style layers (sandwich norms) do, per token and hidden row:

    r = (x + rms(y) * w_y) * scale          the branch output normed and added to the fp32 residual
    h = rms(r) * w_out -> out dtype          the next block's normed input

On the decode path each of these was five to six small kernels (casts, the norm, the add, the
scale, the norm, the cast); here one program reads ``x`` and ``y`` once, keeps the row in
registers, and writes ``r`` (fp32) and ``h``. Any part may be left out: no ``y`` (only the norm of
``x``), no ``scale``, no ``h``. The sums are fp32, as ``F.rms_norm`` computes them; the results
differ from the unfused PyTorch ops only by the order of the additions in the mean of squares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher


@triton.jit
def _residual_norm_kernel(
    x_ptr, y_ptr, y_weight_ptr, scale_ptr, out_weight_ptr, r_ptr, h_ptr,
    n, eps, stride_x, stride_y, stride_r, stride_h,
    HAS_X: tl.constexpr, HAS_Y: tl.constexpr, HAS_Y_WEIGHT: tl.constexpr, HAS_SCALE: tl.constexpr,
    WRITE_R: tl.constexpr, HAS_H: tl.constexpr, HAS_OUT_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    inside = c < n
    r = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_X:
        r = tl.load(x_ptr + row * stride_x + c, mask=inside, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + row * stride_y + c, mask=inside, other=0.0).to(tl.float32)
        y = y * tl.rsqrt(tl.sum(y * y, axis=0) / n + eps)
        if HAS_Y_WEIGHT:
            y = y * tl.load(y_weight_ptr + c, mask=inside, other=0.0)
        r = r + y
    if HAS_SCALE:
        r = r * tl.load(scale_ptr)
    if WRITE_R:
        tl.store(r_ptr + row * stride_r + c, r, mask=inside)
    if HAS_H:
        h = r * tl.rsqrt(tl.sum(r * r, axis=0) / n + eps)
        if HAS_OUT_WEIGHT:
            h = h * tl.load(out_weight_ptr + c, mask=inside, other=0.0)
        tl.store(h_ptr + row * stride_h + c, h.to(h_ptr.dtype.element_ty), mask=inside)


_launch = FastLauncher(_residual_norm_kernel)


def _rows(t: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if t.shape[-1] != n or t.stride(-1) != 1:
        raise ValueError(f"residual_norm: {name} needs {n} contiguous values per row, got shape {list(t.shape)}")
    return t.reshape(-1, n)


def residual_norm_triton(x: torch.Tensor | None, y: torch.Tensor | None, y_weight: torch.Tensor | None,
                         scale: torch.Tensor | None, out_weight: torch.Tensor | None, eps: float,
                         out_dtype: torch.dtype | None, norm_out: bool = True):
    """See ``arch.blocks.residual_norm.residual_norm``: ``(r, h)``; ``r`` fp32 (``x`` itself when
    nothing is added or scaled), ``h`` in ``out_dtype`` or None without ``norm_out``.

    ``x`` fp32 ``[..., n]`` or None (then ``r`` is the normed ``y``), ``y`` any float dtype; the
    weights fp32 ``[n]``, ``scale`` a one-element fp32 tensor (read on the device: no host sync)."""
    src = x if x is not None else y
    if src is None:
        raise ValueError("residual_norm needs x or y")
    n, lead = src.shape[-1], src.shape[:-1]
    xs = _rows(x, n, "x") if x is not None else None
    ys = _rows(y, n, "y") if y is not None else None
    rows = (xs if xs is not None else ys).shape[0]
    for name, w in (("y_weight", y_weight), ("out_weight", out_weight)):
        if w is not None and (w.dtype != torch.float32 or w.numel() != n or not w.is_contiguous()):
            raise ValueError(f"residual_norm: {name} must be a contiguous fp32 [{n}] tensor")
    if scale is not None and (scale.dtype != torch.float32 or scale.numel() != 1):
        raise ValueError("residual_norm: scale must be a one-element fp32 tensor")
    write_r = y is not None or scale is not None
    r = torch.empty(rows, n, device=src.device, dtype=torch.float32) if write_r else xs
    h = torch.empty(rows, n, device=src.device, dtype=out_dtype or torch.float32) if norm_out else None
    block = triton.next_power_of_2(n)
    if rows:
        # absent operands get a stand-in pointer (never read: their flags are off), as the launcher's
        # cache keys want tensors
        def ptr(t):
            return t if t is not None else r
        _launch((rows,), ptr(xs), ptr(ys), ptr(y_weight), ptr(scale), ptr(out_weight), r, ptr(h), n, float(eps),
                xs.stride(0) if xs is not None else 0, ys.stride(0) if ys is not None else 0,
                r.stride(0), h.stride(0) if h is not None else 0,
                HAS_X=xs is not None, HAS_Y=ys is not None, HAS_Y_WEIGHT=y_weight is not None,
                HAS_SCALE=scale is not None, WRITE_R=write_r, HAS_H=norm_out,
                HAS_OUT_WEIGHT=out_weight is not None, BLOCK=block,
                num_warps=8 if block >= 4096 else 4, num_stages=1)
    r = r.view(*lead, n) if write_r else x
    return r, (h.view(*lead, n) if h is not None else None)


def rms_norm_cast_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """``rms(x) * weight`` of ``x`` as stored (any float dtype, contiguous rows), the sums in fp32,
    written in ``out_dtype``: what ``RMSNorm`` computes, without the cast kernels that surround
    ``F.rms_norm`` (it wants fp32 in and gives fp32 out). ``residual_norm_triton`` with only ``x``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return residual_norm_triton(x, None, None, None, weight, eps, out_dtype)[1]
