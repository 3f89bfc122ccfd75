"""Reference MoE projections over a stack of EXL3 experts (loops over experts)."""

from __future__ import annotations

import torch

from ..weights import Exl3ExpertStack
from .linear import exl3_matmul_ref


def exl3_moe_ref(
    x: torch.Tensor,
    experts: Exl3ExpertStack,
    expert_ids: torch.Tensor,
    routing_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply each token's selected experts.

    x: ``[T, k]`` (one input per token, e.g. gate/up) or ``[T, top_k, k]`` (one
    input per selected expert, e.g. down). expert_ids: ``[T, top_k]`` (negative =
    skip). Without ``routing_weights`` returns ``[T, top_k, n]``; with them
    (``[T, top_k]``) returns the weighted sum ``[T, n]``.
    """
    t, top_k = expert_ids.shape
    per_slot = x.dim() == 3
    out = torch.zeros(t, top_k, experts.out_features, dtype=torch.float32, device=x.device)
    for e in torch.unique(expert_ids).tolist():
        if e < 0:
            continue
        tok, slot = torch.nonzero(expert_ids == e, as_tuple=True)
        inp = x[tok, slot] if per_slot else x[tok]
        out[tok, slot] = exl3_matmul_ref(inp.float(), experts.expert(e))
    if routing_weights is None:
        return out.to(x.dtype)
    return (out * routing_weights.float()[..., None]).sum(1).to(x.dtype)
