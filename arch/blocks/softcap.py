"""Logit softcap ``tanh(x / cap) * cap`` (Gemma), one Triton kernel on CUDA."""

from __future__ import annotations

import torch


def _fused_softcap(x: torch.Tensor):
    """The Triton kernel for ``x``'s device, or None (then the PyTorch ops; bench/count_ops.py
    stands in for it on a CPU)."""
    from ...kernels import triton_ops

    return triton_ops.cuda_kernel(x, "act", "softcap_triton")


def softcap_reference(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x.float() / cap) * cap


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``x`` in fp32, squashed into ``(-cap, cap)`` (``cap`` None: only the cast)."""
    if cap is None:
        return x.float()
    return (_fused_softcap(x) or softcap_reference)(x, cap)
