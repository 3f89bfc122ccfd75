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
    """Several ``Linear``s that read the same input (q/k/v, gate/up, ...), computed with as few
    matmuls as their weights allow: ``group(x)`` returns each member's output, in order.

    Members are sorted by format; each format shared by two or more members becomes one matmul:
    EXL3 weights with the same bits and codebook are concatenated along the output
    (``kernels.weights.concat_exl3``: one launch instead of one per member, measured by
    bench/fused_projections.py), dense ones with the same dtype likewise. The rest, and every member
    on the reference backend (which gains nothing from it), run on their own. Concatenated members'
    own weights are not kept.
    """

    def __init__(self, members: list[Linear]):
        super().__init__()
        self.out_features = [m.out_features for m in members]
        classes: dict[tuple, list[int]] = {}
        for i, m in enumerate(members):
            classes.setdefault(_format_key(m, members[0]), []).append(i)
        self.parts = nn.ModuleList()
        slots: dict[int, tuple[int, int, int]] = {}  # member -> (part, first column, stored width)
        for key, idx in classes.items():
            fused = _concatenate([members[i] for i in idx]) if key is not None and len(idx) > 1 else None
            if fused is None:
                for i in idx:
                    slots[i] = (len(self.parts), 0, members[i].out_features)
                    self.parts.append(members[i])
                continue
            col = 0
            for i in idx:
                width = members[i].weight.out_features  # stored (padded) width
                slots[i] = (len(self.parts), col, width)
                col += width
            self.parts.append(fused)
        self.layout: list[tuple[int, int, int]] = [slots[i] for i in range(len(members))]  # in member order

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [p(x) for p in self.parts]
        return [outs[p] if (col == 0 and width == n == outs[p].shape[-1]) else outs[p][..., col:col + n]
                for (p, col, width), n in zip(self.layout, self.out_features)]

    @property
    def launches(self) -> int:
        return len(self.parts)


def _format_key(m: Linear, first: Linear) -> tuple | None:
    """Members with equal keys can share a matmul; None: this one runs on its own."""
    if m.backend != "triton" or m.in_features != first.in_features or m.options != first.options:
        return None
    w = m.weight
    if isinstance(w, Exl3Weight):
        return ("exl3", w.bits, int(w.codebook), w.in_features)
    return ("dense", w.weight.dtype, w.bias is not None)


def _concatenate(members: list[Linear]) -> Linear | None:
    weights = [m.weight for m in members]
    first = members[0]
    fused = concat_exl3(weights) if isinstance(weights[0], Exl3Weight) else concat_dense(weights)
    if fused is None:
        return None
    return Linear(fused, first.in_features, fused.out_features, first.options)


def concat_dense(weights: list[DenseWeight]) -> DenseWeight:
    """Dense linears sharing an input as one ``[sum out, in]`` weight (all with a bias or none)."""
    bias = None if weights[0].bias is None else torch.cat([w.bias for w in weights])
    return DenseWeight(torch.cat([w.weight for w in weights]), bias, key="+".join(w.key for w in weights))
