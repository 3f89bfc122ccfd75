"""Gated MLP: ``down(act(gate(x)) * up(x))``, optionally with DeepSeek-V4's SwiGLU clamp."""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear, LinearGroup

ACTIVATIONS = {
    "silu": nn.functional.silu,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu": nn.functional.gelu,
}
# activations with a fused ``act(gate) * up`` kernel on CUDA (kernels/triton_act.py)
FUSED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def gated_activation(act, gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """``act(gate) * up``; with ``limit`` (DeepSeek-V4 ``swiglu_limit``) the gate is clamped from
    above and the up projection to ``[-limit, limit]`` first (architectures.md §0.7)."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return act(gate) * up


def gated_activation_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """What the fused kernel computes, as PyTorch ops (the arguments in the kernel's order)."""
    return gated_activation(ACTIVATIONS[activation], gate, up)


def _fused_gated_activation(x: torch.Tensor):
    """The Triton ``act(gate) * up`` kernel for ``x``'s device, or None where it cannot run
    (then the two PyTorch ops; bench/count_ops.py stands in for it on a CPU)."""
    from ...kernels import triton_ops

    return triton_ops.cuda_kernel(x, "act", "gated_activation_triton")


class GatedMLP(nn.Module):
    def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear, activation: str,
                 limit: float | None = None):
        super().__init__()
        self.gate_up = LinearGroup([gate_proj, up_proj])  # one matmul where the weights allow
        self.down_proj = down_proj
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        fused = _fused_gated_activation(gate) if self.limit is None and self.activation in FUSED_ACTIVATIONS \
            else None
        if fused is not None:  # one kernel instead of two
            return self.down_proj(fused(gate, up, self.activation))
        return self.down_proj(gated_activation(self.act, gate, up, self.limit))
