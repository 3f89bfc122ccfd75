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


def _fused_selection(logits: torch.Tensor):
    """The Triton selection kernel (kernels/triton_router.py) for ``logits``' device, or None where
    it cannot run (then the PyTorch ops below, its reference)."""
    from ...kernels import triton_ops

    return triton_ops.cuda_kernel(logits, "router", "sigmoid_topk_triton")


def select_reference(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, scaling: float,
                     normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[T, E]`` (fp32) -> expert ids ``[T, k]`` (long), weights ``[T, k]`` (fp32)."""
    scores = torch.sigmoid(logits)
    choice = scores if bias is None else scores + bias
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    if normalise:
        # the reference clamps the sum (HW-CALIB clamp_min(1e-12))
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    return ids, weights * scaling


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
        logits = nn.functional.linear(x.float(), self.gate)
        # one kernel on CUDA for the selection (decode steps run it once per MoE layer)
        select = _fused_selection(logits) or select_reference
        return select(logits, self.bias, self.top_k, self.scaling, self.normalise)
