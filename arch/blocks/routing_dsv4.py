"""DeepSeek-V4 MoE: sqrt-softplus scores, bias-steered or hash (token-id) expert choice, shared expert.

architectures.md §0.7 (transformers ``DeepseekV4TopKRouter`` / ``DeepseekV4HashRouter``,
ExLlamaV3 ``routing_sqrtsp`` / ``routing_sqrtsp_hash``):

* ``s = sqrt(softplus(x Wgᵀ))`` in fp32;
* which experts: the top-k of ``s + bias`` (the bias only steers the choice), or on the
  first ``num_hash_layers`` layers a fixed table ``tid2eid[token id]``;
* weights: ``s[idx] / (sum s[idx] + 1e-20) * routed_scaling_factor``;
* output: routed mix plus the shared expert, both with the SwiGLU clamp.
"""

from __future__ import annotations

import torch
from torch import nn

from .mlp import GatedMLP
from .moe import RoutedExperts


class SqrtSoftplusRouter(nn.Module):
    """``weight [E, H]``; ``bias [E]`` (score-steering) or ``tid2eid [vocab, k]`` (hash layers)."""

    def __init__(self, weight: torch.Tensor, top_k: int, scaling: float, *, bias: torch.Tensor | None = None,
                 tid2eid: torch.Tensor | None = None):
        super().__init__()
        if bias is not None and tid2eid is not None:
            raise ValueError("a hash router has no selection bias")
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.register_buffer("tid2eid", None if tid2eid is None else tid2eid.long())
        self.top_k, self.scaling = top_k, scaling

    @property
    def is_hash(self) -> bool:
        return self.tid2eid is not None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` (normed block input), ``input_ids [T]`` -> expert ids ``[T, k]``, weights ``[T, k]`` fp32."""
        scores = torch.sqrt(nn.functional.softplus(x.float() @ self.weight.T))
        if self.is_hash:
            if input_ids is None:
                raise ValueError("a hash-routed MoE layer needs the token ids of its rows")
            ids = self.tid2eid[input_ids.reshape(-1).to(self.tid2eid.device)]
        else:
            steer = scores if self.bias is None else scores + self.bias
            ids = torch.topk(steer, self.top_k, dim=-1).indices
        w = scores.gather(1, ids)
        return ids, w / (w.sum(-1, keepdim=True) + 1e-20) * self.scaling


class SharedExpertMoE(nn.Module):
    """Routed experts plus an always-on shared expert: ``sum_k w_k E_k(x) + S(x)``."""

    def __init__(self, router: SqrtSoftplusRouter, experts: RoutedExperts, shared: GatedMLP | None):
        super().__init__()
        self.router, self.experts, self.shared = router, experts, shared

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids, weights = self.router(x, input_ids)
        # the shared expert first: the routed down projection adds it to its weighted sum (one launch fewer)
        return self.experts(x, ids, weights, base=None if self.shared is None else self.shared(x))
