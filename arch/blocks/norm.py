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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.float(), self.weight, self.eps).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim of an fp32 ``x``; one fused kernel on CUDA."""
    fused = _fused_rms_norm_for(x)
    if fused is not None:  # one kernel instead of five
        return fused(x, (x.shape[-1],), weight, eps)
    return rms_norm_ref(x, weight, eps)


_fused_rms_norm = getattr(torch.nn.functional, "rms_norm", None)


def _fused_rms_norm_for(x: torch.Tensor):
    """``F.rms_norm`` where it is one fused kernel (CUDA), else None (bench/count_ops.py patches this)."""
    return _fused_rms_norm if x.is_cuda else None
