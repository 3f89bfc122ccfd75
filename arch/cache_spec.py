"""What decode-time state each layer keeps, declared by the adapters.

The runtime's cache (``exl3_triton.runtime.cache``) allocates storage from these
declarations without knowing what the state means:

* ``PagedTensorSpec``: state that grows with the sequence and lives in the
  shared pages (attention keys/values, MLA latents, compressed pools). A page
  holds ``page_size`` tokens; a tensor storing one entry per ``tokens_per_entry``
  tokens (a compressor) keeps ``page_size // tokens_per_entry`` entries per page.
* ``SlotTensorSpec``: fixed-size state per sequence (convolution states,
  compressor pending rows), in one slot per running sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PagedTensorSpec:
    name: str
    entry_shape: tuple[int, ...]
    dtype: torch.dtype
    tokens_per_entry: int = 1


@dataclass(frozen=True)
class SlotTensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class LayerCacheSpec:
    """The state of one layer. ``window``: attention reads only the last ``window`` tokens."""

    paged: tuple[PagedTensorSpec, ...] = ()
    slots: tuple[SlotTensorSpec, ...] = ()
    window: int | None = None
    device: torch.device = field(default=torch.device("cpu"))

    def bytes_per_token(self) -> float:
        total = 0.0
        for t in self.paged:
            numel = 1
            for d in t.entry_shape:
                numel *= d
            total += numel * torch.tensor([], dtype=t.dtype).element_size() / t.tokens_per_entry
        return total


def kv_spec(num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
            window: int | None = None, v_head_dim: int | None = None) -> LayerCacheSpec:
    """The usual attention state: paged keys and values."""
    return LayerCacheSpec(
        paged=(PagedTensorSpec("k", (num_kv_heads, head_dim), dtype),
               PagedTensorSpec("v", (num_kv_heads, v_head_dim or head_dim), dtype)),
        window=window, device=torch.device(device))
