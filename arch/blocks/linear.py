"""``Linear``: one projection, EXL3 or dense, with the padding rules of the format."""

from __future__ import annotations

import torch
from torch import nn

from ... import kernels
from ...kernels.weights import DenseWeight, Exl3Weight, LinearWeight, concat_exl3
from ...options import RuntimeOptions
from ..batch import current_batch


class Linear(nn.Module):
    """``y = x W + b`` for a stored linear.

    ``in_features``/``out_features`` are the layer's true sizes. EXL3 weights are
    stored padded to multiples of 128 (exl3-format.md 2.3): a narrower input is
    zero-extended and the padded output columns are cut off.
    """

    def __init__(self, weight: LinearWeight, in_features: int, out_features: int, options: RuntimeOptions):
        super().__init__()
        if isinstance(weight, DenseWeight):
            weight = weight.to(options.device, options.dtype)
        else:
            weight = weight.to(options.device)
        self.weight = weight
        self.in_features = in_features
        self.out_features = out_features
        self.options = options
        self.backend = kernels.resolve_backend(options.backend, options.device)
        self._decoded: torch.Tensor | None = None

    @property
    def is_exl3(self) -> bool:
        return isinstance(self.weight, Exl3Weight)

    def _inner(self) -> torch.Tensor | None:
        # The reference backend decodes W_hat on every call unless we keep it.
        if self.backend != "reference" or not self.options.cache_decoded_weights:
            return None
        if self._decoded is None:
            self._decoded = kernels.exl3_dequant(self.weight, backend="reference")
        return self._decoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = current_batch()
        if (self.options.batch_invariant and batch is not None and batch.num_seqs > 1 and x.dim() == 2
                and x.shape[0] == batch.num_tokens):
            # Each sequence's rows on their own: a GEMM's rounding depends on how many rows it
            # multiplies, and a job's output must not depend on the jobs running beside it. (Not for
            # a gathered subset of the rows, such as one expert's tokens: its rows are not the batch's.)
            return torch.cat([self._apply(x[lo:hi]) for _, lo, hi in batch.segments()])
        return self._apply(x)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{w.key}: input has {x.shape[-1]} features, layer expects {self.in_features}")
        if isinstance(w, DenseWeight):
            return kernels.linear(x, w, self.backend)
        if w.in_features > self.in_features:
            x = nn.functional.pad(x, (0, w.in_features - self.in_features))
        y = kernels.exl3_matmul(x, w, self.backend, inner=self._inner())
        if w.out_features > self.out_features:
            y = y[..., : self.out_features]
        return y

    def extra_repr(self) -> str:
        w = self.weight
        kind = f"exl3 {w.bits:g}b {w.codebook.label}" if isinstance(w, Exl3Weight) else "dense"
        return f"{w.key}: {self.in_features}->{self.out_features}, {kind}"


class LinearGroup(nn.Module):
    """Several ``Linear``s that read the same input (q/k/v, gate/up), computed by one matmul where
    their weights can share it: ``group(x)`` returns each member's output, in order.

    EXL3 members with one format are concatenated along the output (``kernels.weights.concat_exl3``:
    one launch instead of one per member, measured by bench/fused_projections.py), dense members
    with one dtype likewise; anything else (mixed bit widths, mixed kinds, the reference backend, which
    gains nothing) runs member by member. The members' own weights are not kept once concatenated.
    """

    def __init__(self, members: list[Linear]):
        super().__init__()
        first = members[0]
        self.out_features = [m.out_features for m in members]
        self.widths = [m.weight.out_features for m in members]  # stored (padded) widths
        fused = None
        if len(members) > 1 and first.backend == "triton" and all(
                m.in_features == first.in_features and m.options == first.options for m in members):
            weights = [m.weight for m in members]
            if all(isinstance(w, Exl3Weight) for w in weights):
                fused = concat_exl3(weights)
            elif all(isinstance(w, DenseWeight) and w.weight.dtype == weights[0].weight.dtype for w in weights):
                fused = concat_dense(weights)
        if fused is None:
            self.members = nn.ModuleList(members)
            self.fused = None
        else:
            self.members = None
            self.fused = Linear(fused, first.in_features, fused.out_features, first.options)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused is None:
            return [m(x) for m in self.members]
        parts = self.fused(x).split(self.widths, dim=-1)
        return [p if w == n else p[..., :n] for p, w, n in zip(parts, self.widths, self.out_features)]

    def extra_repr(self) -> str:
        return "one matmul" if self.fused is not None else "member by member"


def concat_dense(weights: list[DenseWeight]) -> DenseWeight:
    """Dense linears sharing an input as one ``[sum out, in]`` weight (members without a bias add zeros)."""
    bias = None
    if any(w.bias is not None for w in weights):
        bias = torch.cat([w.weight.new_zeros(w.out_features) if w.bias is None else w.bias for w in weights])
    return DenseWeight(torch.cat([w.weight for w in weights]), bias, key="+".join(w.key for w in weights))
