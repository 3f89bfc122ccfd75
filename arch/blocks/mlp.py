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


def gated_activation(act, gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """``act(gate) * up``; with ``limit`` (DeepSeek-V4 ``swiglu_limit``) the gate is clamped from
    above and the up projection to ``[-limit, limit]`` first (architectures.md §0.7)."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return act(gate) * up


class GatedMLP(nn.Module):
    def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear, activation: str,
                 limit: float | None = None):
        super().__init__()
        self.gate_up = LinearGroup([gate_proj, up_proj])  # one matmul where the weights allow
        self.down_proj = down_proj
        self.act = ACTIVATIONS[activation]
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(gated_activation(self.act, gate, up, self.limit))
