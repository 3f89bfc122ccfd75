"""RMSNorm, computed in fp32."""

from __future__ import annotations

import torch
from torch import nn

from ...kernels.reference.norm import rms_norm_ref


class RMSNorm(nn.Module):
    """``y = x / rms(x) * (weight + offset)``.

    ``offset`` is 0 for Llama/DeepSeek and 1 for Gemma-style norms that store
    ``weight - 1``. ``weight=None`` gives a norm without a learned scale.
    """

    def __init__(self, weight: torch.Tensor | None, eps: float, offset: float = 0.0):
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.float() + offset)
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The norm of ``x`` in fp32, returned in ``out_dtype`` (default: ``x``'s dtype).

        Where that needs a cast on either side, CUDA runs one Triton kernel that reads ``x`` as
        stored and writes ``out_dtype`` (a decode step's cost is its kernel count); elsewhere, and
        for fp32 in and out (``F.rms_norm`` is already one kernel), the ops below, whose results
        the CPU tests pin."""
        out_dtype = x.dtype if out_dtype is None else out_dtype
        if x.dtype != torch.float32 or out_dtype != torch.float32:
            fused = _fused_rms_norm_cast_for(x)
            if fused is not None:
                return fused(x, self.weight, self.eps, out_dtype)
        return rms_norm_cast_reference(x, self.weight, self.eps, out_dtype)


def rms_norm_cast_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                            out_dtype: torch.dtype) -> torch.Tensor:
    """``RMSNorm``'s PyTorch path (kernels/triton_norm.py ``rms_norm_cast_triton``'s reference)."""
    return rms_norm(x.float(), weight, eps).to(out_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim of an fp32 ``x``; one fused kernel on CUDA."""
    fused = _fused_rms_norm_for(x)
    if fused is not None:  # one kernel instead of five
        return fused(x, (x.shape[-1],), weight, eps)
    return rms_norm_ref(x, weight, eps)


_fused_rms_norm = getattr(torch.nn.functional, "rms_norm", None)


def _fused_rms_norm_cast_for(x: torch.Tensor):
    """The Triton norm with its casts folded in (kernels/triton_norm.py) for ``x``'s device, or None
    where it cannot run (bench/count_ops.py patches this)."""
    from ...kernels import triton_ops

    return triton_ops.cuda_kernel(x, "norm", "rms_norm_cast_triton")


def _fused_rms_norm_for(x: torch.Tensor):
    """``F.rms_norm`` where it is one fused kernel (CUDA), else None (bench/count_ops.py patches this)."""
    return _fused_rms_norm if x.is_cuda else None
