"""MoE routers that hand ``RoutedExperts`` expert ids and weights.

``SigmoidBiasRouter``: DeepSeek-V3 style, used by OpenPanguV2 (architectures.md §0.7).
Scores ``s = sigmoid(x Wg^T)`` in fp32; the top-k of ``s + bias`` picks the experts
(the bias only steers selection); the weights are the unbiased scores of the picked
experts, normalised to sum 1 (when ``normalise``), times ``scaling``. With
``n_group = topk_group = 1`` the group-limited step of DeepSeek-V3 is a no-op.
"""

from __future__ import annotations

import torch
from torch import nn


class SigmoidBiasRouter(nn.Module):
    def __init__(self, gate: torch.Tensor, bias: torch.Tensor | None, top_k: int, *, scaling: float = 1.0,
                 normalise: bool = True):
        super().__init__()
        if not 0 < top_k <= gate.shape[0]:
            raise ValueError(f"top_k {top_k} must be in [1, {gate.shape[0]}]")
        self.register_buffer("gate", gate.float())
        self.register_buffer("bias", None if bias is None else bias.float().reshape(-1))
        self.top_k, self.scaling, self.normalise = top_k, scaling, normalise

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` -> expert ids ``[T, k]`` (long), weights ``[T, k]`` (fp32)."""
        scores = torch.sigmoid(nn.functional.linear(x.float(), self.gate))
        choice = scores if self.bias is None else scores + self.bias
        ids = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        if self.normalise:
            # the reference clamps the sum (HW-CALIB clamp_min(1e-12))
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        return ids, weights * self.scaling
