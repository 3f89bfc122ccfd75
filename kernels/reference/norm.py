"""Reference RMSNorm (fp32), the formula ``F.rms_norm`` fuses on CUDA."""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim of an fp32 ``x`` (``weight`` None: no scale)."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight
