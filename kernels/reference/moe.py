"""Reference MoE projections over a stack of EXL3 experts (loops over experts)."""

from __future__ import annotations

import torch

from ..weights import Exl3ExpertStack
from .linear import exl3_matmul_ref


def member_ids(expert_ids: torch.Tensor, experts: int, members: int) -> torch.Tensor:
    """``[T, k]`` ids into each of ``members`` equal parts of a stack of ``members * experts``
    (e.g. gate ``e`` and up ``E + e``) -> ``[T, members * k]``: member ``m``'s slots read ``id + m * experts``;
    negative ids stay negative (skipped)."""
    if members == 1:
        return expert_ids
    shifted = [torch.where(expert_ids >= 0, expert_ids + m * experts, expert_ids) for m in range(1, members)]
    return torch.cat([expert_ids, *shifted], dim=1)


def check_moe_options(experts: Exl3ExpertStack, members: int, per_slot: bool, routing_weights, base,
                      tokens: int) -> None:
    """The ``members`` / ``base`` rules of ``exl3_moe_ref``, shared with the Triton path."""
    if members > 1 and (per_slot or routing_weights is not None or experts.num_experts % members):
        raise ValueError(f"{experts.key}: members={members} needs one input row per token, no routing weights "
                         f"and a stack of {members} equal parts ({experts.num_experts} experts)")
    if base is not None and (routing_weights is None or base.shape != (tokens, experts.out_features)):
        raise ValueError(f"{experts.key}: MoE base {tuple(base.shape)} is added to the weighted sum: it needs "
                         f"routing weights and the shape [tokens={tokens}, {experts.out_features}]")


def exl3_moe_ref(
    x: torch.Tensor,
    experts: Exl3ExpertStack,
    expert_ids: torch.Tensor,
    routing_weights: torch.Tensor | None = None,
    members: int = 1,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply each token's selected experts.

    x: ``[T, k]`` (one input per token, e.g. gate/up) or ``[T, top_k, k]`` (one
    input per selected expert, e.g. down). expert_ids: ``[T, top_k]`` (negative =
    skip). Without ``routing_weights`` returns ``[T, top_k, n]``; with them
    (``[T, top_k]``) returns the weighted sum ``[T, n]``.

    ``members`` > 1: ``experts`` is that many stacks of equal size one after another (gate and up
    experts in one stack) and each token's ids select in every one of them (``member_ids``): the
    result is ``[T, members * top_k, n]``, member by member (x one row per token, no weights).

    ``base [T, n]`` (with routing weights): added to the weighted sum before the one rounding to x's dtype
    (e.g. the shared expert's output).
    """
    check_moe_options(experts, members, x.dim() == 3, routing_weights, base, expert_ids.shape[0])
    if members > 1:
        expert_ids = member_ids(expert_ids, experts.num_experts // members, members)
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
    total = (out * routing_weights.float()[..., None]).sum(1)
    return (total if base is None else total + base.float()).to(x.dtype)
