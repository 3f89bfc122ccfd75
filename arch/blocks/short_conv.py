"""Causal depthwise short convolution with an identity path (OpenPanguV2's MoME convs).

``y_t = x_t + sum_j w[:, j] * x_{t-K+1+j}`` (PyTorch Conv1d cross-correlation order,
``w[:, K-1]`` multiplies the current token). Huawei's pure-torch reference zeroes the
convolution term on the first ``K - 1`` positions of a sequence (only the identity
survives there), so the term is applied only at absolute positions ``>= K - 1``
(architectures.md §3.4, "MoME start-of-sequence rule").

The decode state is the previous ``K - 1`` *inputs* (pre-convolution values); the
adapter stores them per position (a small ring indexed by position), so forgetting
speculated positions rolls the state back for free.
"""

from __future__ import annotations

import torch
from torch import nn


def mome_decode_reference(ring: torch.Tensor, weight: torch.Tensor, seq_slots: torch.Tensor,
                          positions: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, norm=None,
                          width_rows: torch.Tensor | None = None, active=None) -> torch.Tensor:
    """One decode row per sequence position: its input ``x [n, C]`` stored in ``ring [slots, R, C]``
    at ``pos % R``, its window read back from the ring, then ``ShortConv.mix`` with ``weight [K, C]``.
    Every row's input is stored before any row reads, so a row sees the rows of earlier positions of
    its sequence in the same step. ``norm``: an ``RMSNorm`` applied to the result (MLA's q latent).
    ``width_rows [n, K]`` / ``active``: the ring rows and ``ShortConv.active`` if already computed
    (once per decode step, ``decode_windows``). kernels/triton_mome.py does all this in one kernel."""
    if width_rows is None or active is None:
        width_rows, active = decode_windows(positions, weight.shape[0], ring.shape[1])
    ring.index_put_((seq_slots, width_rows[:, -1]), x.to(ring.dtype))
    y = ShortConv.mix_windows(ring[seq_slots[:, None], width_rows].to(dtype), weight, active)
    return y if norm is None else norm(y)


def decode_windows(positions: torch.Tensor, width: int, ring_len: int) -> tuple[torch.Tensor, tuple]:
    """Each decode row's window in a ring of ``ring_len`` rows ``[n, width]`` (oldest first, its own
    entry last) and ``ShortConv.active_rows``."""
    rows = (positions[:, None] + torch.arange(1 - width, 1, device=positions.device)[None, :]) % ring_len
    return rows, ShortConv.active_rows(positions, width)


def sliding_windows(x: torch.Tensor, previous: torch.Tensor, width: int) -> torch.Tensor:
    """Consecutive rows ``x [n, C]`` of one sequence, preceded by ``previous [width-1, C]`` (the
    inputs just before them) -> each row's window ``[n, width, C]`` (oldest first)."""
    full = torch.cat([previous.to(x.dtype), x], dim=0)
    return full.unfold(0, width, 1).transpose(1, 2)


class ShortConv(nn.Module):
    """``weight [C, 1, K]`` (a ``Conv1d(C, C, K, groups=C)`` without bias)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.dim() != 3 or weight.shape[1] != 1:
            raise ValueError(f"a depthwise conv weight is [C, 1, K], got {list(weight.shape)}")
        # [K, C] fp32: the products are fp32 whatever the checkpoint stores (the reference casts up)
        self.register_buffer("weight", weight[:, 0, :].t().float().contiguous())

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    @property
    def channels(self) -> int:
        return self.weight.shape[1]

    def forward(self, windows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``windows [n, K, C]`` (last entry = the current input), ``positions [n]`` -> ``x + conv(x)``."""
        return self.mix(windows, self.active(positions))

    def active(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.active_rows(positions, self.width)

    def mix(self, windows: torch.Tensor, active: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``forward`` with ``active()`` given (a decode step computes it once for every layer)."""
        return self.mix_windows(windows, self.weight, active)

    @staticmethod
    def active_rows(positions: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows whose conv term applies (the start-of-sequence rule), ``[n, 1]`` bool, and
        the 0 that replaces the term elsewhere (a device scalar: no fill per use)."""
        return (positions >= width - 1)[:, None], positions.new_zeros((), dtype=torch.float32)

    @staticmethod
    def mix_windows(windows: torch.Tensor, weight: torch.Tensor, active: tuple[torch.Tensor, torch.Tensor]):
        x = windows[:, -1]
        on, zero = active
        # fp32 weights promote the products and the sum with ``x`` to fp32 inside one kernel each,
        # the same values as casting first (a decode step's kernel count is its cost)
        term = torch.where(on, (windows * weight).sum(1), zero)
        # the fp32 sum rounded to x's dtype as it is stored: ``(x + term).to(x.dtype)`` in one kernel
        return torch.add(x, term, out=x.new_empty(x.shape))
