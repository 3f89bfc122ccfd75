"""What decode-time state each layer keeps, declared by the adapters.

The runtime's cache (``exl3_triton.runtime.cache``) allocates storage from these
declarations without knowing what the state means:

* ``PagedTensorSpec``: state that grows with the sequence and lives in the
  shared pages (attention keys/values, MLA latents, compressed pools). A page
  holds ``page_size`` tokens; a tensor storing one entry per ``tokens_per_entry``
  tokens (a compressor) keeps ``page_size // tokens_per_entry`` entries per page.
* ``SlotTensorSpec``: fixed-size state per sequence (convolution states,
  compressor pending rows), in one slot per running sequence.

A layer with a sliding ``window`` may ask for a ``ring``: its paged tensors then
hold only the last ``window`` tokens of each sequence (rounded up to whole
pages), in a fixed ring per sequence slot, instead of the whole history in
shared pages. Position ``p`` lives at ring page ``(p // page_size) % ring_pages``.
This is what keeps a long-context Gemma 4 affordable: 50 of its 60 layers need
1024 tokens of keys whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class PagedTensorSpec:
    name: str
    entry_shape: tuple[int, ...]
    dtype: torch.dtype
    tokens_per_entry: int = 1


@dataclass(frozen=True)
class SlotTensorSpec:
    """``position_ring``: the first dimension is a ring over positions (position ``p`` at row
    ``p % shape[0]``) of which each step reads the last ``position_ring`` before its own; such
    state rolls back by forgetting positions, like pages, as long as a step never writes more
    than ``shape[0] - position_ring`` positions ahead of one it may return to. 0: the slot is
    plain per-sequence state, which speculative decoding cannot roll back."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    position_ring: int = 0


@dataclass(frozen=True)
class LayerCacheSpec:
    """The state of one layer. ``window``: attention reads only the last ``window`` tokens;
    ``ring``: keep only those (needs ``window``)."""

    paged: tuple[PagedTensorSpec, ...] = ()
    slots: tuple[SlotTensorSpec, ...] = ()
    window: int | None = None
    device: torch.device = field(default=torch.device("cpu"))
    ring: bool = False

    def __post_init__(self):
        if self.ring and not self.window:
            raise ValueError("a ring cache needs a sliding window")

    def bytes_per_token(self) -> float:
        """Bytes of shared-page state per cached token (0 for ring layers: their state is per sequence)."""
        return 0.0 if self.ring else self.entry_bytes()

    def entry_bytes(self) -> float:
        total = 0.0
        for t in self.paged:
            numel = 1
            for d in t.entry_shape:
                numel *= d
            total += numel * torch.tensor([], dtype=t.dtype).element_size() / t.tokens_per_entry
        return total


def kv_spec(num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
            window: int | None = None, v_head_dim: int | None = None, ring: bool = False) -> LayerCacheSpec:
    """The usual attention state: paged keys and values."""
    return LayerCacheSpec(
        paged=(PagedTensorSpec("k", (num_kv_heads, head_dim), dtype),
               PagedTensorSpec("v", (num_kv_heads, v_head_dim or head_dim), dtype)),
        window=window, device=torch.device(device), ring=ring)


def ring_pages(specs: list[LayerCacheSpec], page_size: int, margin: int = 0) -> int:
    """Pages in each sequence's ring: enough for the widest ring window plus ``margin`` tokens
    (0 without ring layers). Speculative decoding needs the margin: a verification step writes
    its drafted tokens before knowing whether they stay, and those writes must not overwrite
    entries still inside the window."""
    windows = [s.window for s in specs if s.ring]
    return -(-(max(windows) + margin) // page_size) if windows else 0


def fitting_page_size(specs: list[LayerCacheSpec], preferred: int) -> int:
    """The page size to use when none is given: ``preferred`` (a power of two), doubled until every
    paged tensor's ``tokens_per_entry`` divides it, since a page must hold whole entries (DeepSeek-V4's
    heavily compressed layers keep one entry per 128 tokens, so its pages hold at least 128 tokens)."""
    size = preferred
    for spec in specs:
        for t in spec.paged:
            per = t.tokens_per_entry
            if per & (per - 1):  # pages hold a power of two of tokens: no page size would fit
                raise ConfigError(f"cache tensor {t.name!r} stores one entry per {per} tokens (a compression "
                                  "ratio in config.json); pages hold a power of two of tokens, so none fits")
            size = max(size, per)
    return size
