"""``Linear``: one projection, EXL3 or dense, with the padding rules of the format."""

from __future__ import annotations

import torch
from torch import nn

from ... import kernels
from ...kernels.weights import DenseWeight, Exl3Weight, LinearWeight
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
