"""OpenPanguV2's lightning indexer: which past tokens a DSA layer's query attends to.

architectures.md §0.5 / §3.4 (Huawei's ``PanguTorchIndexer``):

* query heads ``q_I = wq_b(q_lora)`` ``[G, D]`` (``q_lora``: the attention's normed,
  post-MoME q latent), one key per token ``k_I = k_norm(wk(h))`` ``[D]``, head weights
  ``w = weights_proj(h)`` ``[G]``; NEOX RoPE on the **leading** ``rope_dim`` dims of both,
  with the attention's positions and frequencies;
* ``I[t, s] = sum_g w[t, g] * relu(q_I[t, g] . k_I[s])`` in fp32, no scale factors;
* each query keeps the top ``top_k`` of its causal candidates (all of them while it has
  fewer). The sink entries are not candidates.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear
from .norm import RMSNorm
from .rope import rotate_neox_folded


def rope_leading(x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor) -> torch.Tensor:
    """NEOX-rotate the first ``cos.shape[-1]`` dims of ``x [n, ..., D]`` (cos and
    ``rope.fold_sin(sin)``: ``[n, d]``)."""
    d = cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (d,)
    cos, sin_folded = cos.reshape(shape).to(x.dtype), sin_folded.reshape(shape).to(x.dtype)
    return torch.cat([rotate_neox_folded(x[..., :d], cos, sin_folded), x[..., d:]], dim=-1)


def queries_reference(q: torch.Tensor, head_weights: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor,
                      heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``LightningIndexer.queries`` after ``wq_b`` in PyTorch (the CPU path; the arguments of
    kernels/triton_rope.py ``leading_rope_triton``): query heads ``[n, G, D]`` with their leading dims
    rotated, and the head weights, both fp32."""
    q = q.float().view(q.shape[0], heads, -1)
    return rope_leading(q, cos, sin_folded), head_weights.float()


def _fused_leading_rope(x: torch.Tensor):
    """The Triton kernel for ``x``'s device, or None where it cannot run (then ``queries_reference``;
    bench/count_ops.py stands in for it on a CPU)."""
    from ...kernels import triton_ops

    return triton_ops.cuda_kernel(x, "rope", "leading_rope_triton")


class LightningIndexer(nn.Module):
    def __init__(self, wq_b: Linear, wk: Linear, k_norm: RMSNorm, weights_proj: Linear, *, num_heads: int,
                 head_dim: int, top_k: int):
        super().__init__()
        self.wq_b, self.wk, self.k_norm, self.weights_proj = wq_b, wk, k_norm, weights_proj
        self.num_heads, self.head_dim, self.top_k = num_heads, head_dim, top_k

    def input_projections(self) -> list[Linear]:
        """``[wk, weights_proj]``, the projections of the layer's input ``h``, handed over to the
        attention, which runs them in one ``LinearGroup`` with its own (one matmul where the formats
        allow) and passes their outputs to ``keys`` / ``queries``; the indexer keeps no reference
        (a weight concatenated into the group is then held once)."""
        taken = [self.wk, self.weights_proj]
        if any(t is None for t in taken):
            raise RuntimeError("the indexer's input projections were already handed over")
        self.wk = self.weights_proj = None
        return taken

    def keys(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The per-token key ``[n, D]`` (fp32) that the cache keeps for later queries, from the key
        projection ``k = wk(h)`` (``sin`` folded: ``rope.fold_sin``, here and in ``queries``).
        kernels/triton_mla_keys.py does this and the cache store in MLA's key kernel on CUDA."""
        return rope_leading(self.k_norm(k).float(), cos, sin)

    def queries(self, q_lora: torch.Tensor, head_weights: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query heads ``[n, G, D]`` and head weights ``[n, G]`` (fp32), from ``q_lora`` and the
        head-weight projection ``weights_proj(h)``."""
        q = self.wq_b(q_lora)
        fused = _fused_leading_rope(q)  # on CUDA one kernel: the rotation and both casts
        return (fused or queries_reference)(q, head_weights, cos, sin, self.num_heads)

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``candidates [n, m]`` (bool, the causal tokens) -> the kept ones ``[n, m]`` (bool).

        ``keys``: ``[m, D]`` shared by all rows, or ``[n, m, D]``, one set per row."""
        best = self._best(q, w, keys, ~candidates)
        keep = torch.zeros_like(candidates)
        # rows with fewer than k candidates pick some -inf entries: those stay out
        return keep.scatter(-1, best.indices, best.values > float("-inf"))

    def hidden(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, not_candidate: torch.Tensor,
               lead_shown: torch.Tensor) -> torch.Tensor:
        """``select`` as a decode step needs it, in fewer kernels: ``not_candidate [n, m]`` -> the
        keys each row does not see ``[n, L + m]``, after ``L`` leading always-visible entries (the
        sinks). ``lead_shown [n, L + m]``: False in the ``L`` leading columns, True elsewhere."""
        best = self._best(q, w, keys, not_candidate)
        lead = lead_shown.shape[-1] - not_candidate.shape[-1]
        return lead_shown.scatter(-1, best.indices + lead, best.values == float("-inf"))

    def _best(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, not_candidate: torch.Tensor):
        """The top-k of the index scores over the candidates (``topk``'s values and indices)."""
        per_row = "n" if keys.dim() == 3 else ""
        dots = torch.einsum(f"ngd,{per_row}md->ngm", q, keys.float())
        scores = torch.einsum("ng,ngm->nm", w, torch.relu(dots)).masked_fill(not_candidate, float("-inf"))
        return torch.topk(scores, min(self.top_k, keys.shape[-2]), dim=-1)
