"""DeepSeek-V4 KV compressor: one gated-softmax summary per window of ``ratio`` tokens.

architectures.md §2.4 (transformers ``DeepseekV4HCACompressor`` / ``DeepseekV4CSACompressor``):
every token ``t`` contributes ``C_t = wkv(h_t)`` and ``Z_t = wgate(h_t) + ape[t mod m]``.

* non-overlapping (HCA, ``m = 128``): entry ``w`` is a per-channel softmax over the gates of
  tokens ``[w m, (w+1) m)`` applied to their ``C``;
* overlapping (CSA ``m = 4`` and the indexer's keys): rows are ``2 D`` wide, ``[Ca | Cb]``;
  entry ``w`` takes the ``Ca`` half of window ``w - 1`` and the ``Cb`` half of window ``w``
  (``2 m`` slots; window ``-1`` does not exist and gets weight 0).

Then an RMSNorm (weighted) and interleaved RoPE of the trailing dims at position ``w m``.
Entry ``w`` becomes visible to query ``t`` once its window has closed: ``w < (t + 1) // m``.

The compressor is stateless here: callers hand it the projected rows of a contiguous run of
positions (cached rows from the ring plus the new ones) and the windows to summarise, so prefill,
full forward and step-by-step decode compute the same thing.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear
from .norm import RMSNorm
from .rope_interleaved import rope_angles, rotate_tail_interleaved

# Gate value of a slot that does not exist (before position 0, or not yet seen): a finite stand-in
# for -inf so that a window with no rows at all still gives finite (and never visible) numbers.
_ABSENT = -1e30


class KVCompressor(nn.Module):
    def __init__(self, wkv: Linear, wgate: Linear, ape: torch.Tensor, norm: RMSNorm, *, ratio: int, head_dim: int,
                 overlap: bool, inv_freq: torch.Tensor):
        super().__init__()
        width = (2 if overlap else 1) * head_dim
        if tuple(ape.shape) != (ratio, width):
            raise ValueError(f"compressor ape has shape {tuple(ape.shape)}, expected {(ratio, width)}")
        self.wkv, self.wgate, self.norm = wkv, wgate, norm
        self.register_buffer("ape", ape.float())
        # on the layer's device: a copy from the host inside a captured decode step is not allowed
        self.register_buffer("inv_freq", inv_freq.float().to(ape.device))
        self.ratio, self.head_dim, self.overlap, self.width = ratio, head_dim, overlap, width

    @property
    def history(self) -> int:
        """How many earlier positions' rows a new window may need (ring sizing)."""
        return (2 if self.overlap else 1) * self.ratio - 1

    def project(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rows ``(C [T, width], Z [T, width])``; the gate already carries its ape (fp32)."""
        kv = self.wkv(h)
        gate = self.wgate(h).float() + self.ape[positions % self.ratio]
        return kv, gate

    def compress(self, kv_rows: torch.Tensor, gate_rows: torch.Tensor, base: torch.Tensor,
                 windows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Entries ``[B, n, head_dim]`` (fp32) for ``windows [B, n]`` of ``B`` sequences.

        ``kv_rows``/``gate_rows [B, N, width]`` hold positions ``base .. base + N - 1`` (``base [B]``);
        rows after position ``last [B]`` (not seen yet) and before 0 are left out. Windows that have
        not closed by ``last`` give partial summaries, which callers never let a query see.
        """
        m, d = self.ratio, self.head_dim
        if self.overlap:
            offsets = torch.arange(-m, m, device=windows.device)
        else:
            offsets = torch.arange(m, device=windows.device)
        pos = windows[..., None] * m + offsets  # [B, n, slots]
        n_rows = kv_rows.shape[1]
        rel = pos - base[:, None, None]
        present = (pos >= 0) & (rel >= 0) & (rel < n_rows) & (pos <= last[:, None, None])
        idx = rel.clamp(0, max(n_rows - 1, 0))
        seq = torch.arange(kv_rows.shape[0], device=idx.device)[:, None, None]
        kv, gate = kv_rows[seq, idx].float(), gate_rows[seq, idx]  # [B, n, slots, width]
        if self.overlap:  # first m slots: the previous window's Ca half; last m: this window's Cb half
            kv = torch.cat([kv[..., :m, :d], kv[..., m:, d:]], dim=-2)
            gate = torch.cat([gate[..., :m, :d], gate[..., m:, d:]], dim=-2)
        gate = gate.masked_fill(~present[..., None], _ABSENT)
        entries = (kv * torch.softmax(gate, dim=-2)).sum(dim=-2)
        entries = self.norm(entries)
        cos, sin = rope_angles(windows * m, self.inv_freq)
        return rotate_tail_interleaved(entries, cos, sin)
