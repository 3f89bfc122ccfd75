"""The residual add of a sandwich-norm layer fused with the norms around it (Gemma 4).

``residual_norm(x, y, ...)`` returns ``r = (x + rms(y) * w_y) * scale`` (fp32) and
``h = rms(r) * w_out`` in the compute dtype: what a Gemma layer does between its blocks, one
Triton kernel on CUDA (``kernels/triton_norm.py``) instead of five or six element-wise ones.
Elsewhere the same PyTorch ops as the unfused layer run, in the same order, so CPU results are
bitwise unchanged (bench/count_ops.py counts this path as the one kernel it is on CUDA).
"""

from __future__ import annotations

import torch

from .norm import rms_norm


def _fused_residual_norm(x: torch.Tensor):
    """The Triton kernel for ``x``'s device, or None where it cannot run (then the reference)."""
    from ...kernels import triton_ops

    return triton_ops.cuda_kernel(x, "norm", "residual_norm_triton")


def residual_norm(x: torch.Tensor | None, y: torch.Tensor | None, y_weight: torch.Tensor | None, *, eps: float,
                  scale: torch.Tensor | None = None, out_weight: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, norm_out: bool = True):
    """``(r, h)``: ``r = (x + rms(y) * y_weight) * scale`` in fp32 and, with ``norm_out``,
    ``h = rms(r) * out_weight`` rounded to ``out_dtype``.

    ``x``: the fp32 residual ``[..., n]`` (None: ``r`` is the normed ``y`` alone); ``y``: a block's
    output in any float dtype (None: ``r`` is ``x``, only normed); weights fp32 ``[n]`` or None
    (no learned scale); ``scale``: a one-element fp32 tensor (Gemma's ``layer_scalar``) or None.
    """
    kernel = _fused_residual_norm(x if x is not None else y) or residual_norm_reference
    return kernel(x, y, y_weight, scale, out_weight, eps, out_dtype, norm_out)


def residual_norm_reference(x, y, y_weight, scale, out_weight, eps: float, out_dtype, norm_out: bool = True):
    """The unfused PyTorch ops (each RMSNorm one ``F.rms_norm`` kernel on CUDA); the arguments
    in the order of ``kernels.triton_norm.residual_norm_triton``."""
    r = x
    if y is not None:
        normed = rms_norm(y.float(), y_weight, eps)
        r = normed if x is None else x + normed
    if scale is not None:
        r = r * scale
    if not norm_out:
        return r, None
    h = rms_norm(r, out_weight, eps)
    return r, h if out_dtype is None else h.to(out_dtype)
