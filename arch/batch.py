"""Per-step metadata the runtime hands to a model: which tokens belong to which sequence.

Tokens of all sequences in a step are packed into one flat row dimension ``[T]``
(varlen): sequence ``b`` owns rows ``cu_q[b]:cu_q[b+1]``; after the step it has
``kv_lens[b]`` tokens in the cache. New keys/values are written at
``slot_mapping`` (flat ``page * page_size + offset`` indices into the paged
tensors) and read back through ``page_table``.

Ring layers (``LayerCacheSpec.ring``) use ``ring_slot_mapping`` and
``ring_page_table`` instead: the same layout, over each sequence's ring of
pages. A ring slot of -1 marks a token of a long prefill chunk whose entry
would be overwritten later in the same chunk, so it is not written at all.

``current_batch()`` exposes the batch being run to code that is not handed it
explicitly (``Linear`` uses it to run each sequence's rows on their own when the
model must be batch-invariant).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [T] long, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] long, where each new token's state is written
    page_table: torch.Tensor  # [B, P] int32, -1 padded
    kv_lens_t: torch.Tensor  # [B] int32 on the device
    seq_slots: torch.Tensor  # [B] long, each sequence's state slot
    cu_q: list[int]  # host: B + 1 row offsets
    kv_lens: list[int]  # host: tokens cached per sequence after this step
    cache: object  # runtime.cache.PagedCache
    is_decode: bool = False  # every sequence has exactly one new token
    memo: dict = field(default_factory=dict)  # per-step values shared by layers (e.g. RoPE tables)
    ring_slot_mapping: torch.Tensor | None = None  # [T] long
    ring_page_table: torch.Tensor | None = None  # [B, P] int32: logical page -> ring page
    # host knowledge: every position in this step is below this bound (one of the network's
    # ``decode_context_buckets``); None: any position up to the cache's capacity. Part of a captured
    # graph's key, so a layer may choose its work by it (openPangu's DSA layers skip the indexer's
    # top-k while no row has more candidates than it keeps).
    context_bound: int | None = None

    def on(self, device: torch.device) -> "ForwardBatch":
        """This batch with its tensors on ``device`` (for layers placed on another GPU); memoised."""
        if self.positions.device == device:
            return self
        key = ("on", str(device))
        moved = self.memo.get(key)
        if moved is None:
            moved = self.memo[key] = ForwardBatch(
                positions=self.positions.to(device), slot_mapping=self.slot_mapping.to(device),
                page_table=self.page_table.to(device), kv_lens_t=self.kv_lens_t.to(device),
                seq_slots=self.seq_slots.to(device), cu_q=self.cu_q, kv_lens=self.kv_lens, cache=self.cache,
                is_decode=self.is_decode,
                ring_slot_mapping=None if self.ring_slot_mapping is None else self.ring_slot_mapping.to(device),
                ring_page_table=None if self.ring_page_table is None else self.ring_page_table.to(device),
                context_bound=self.context_bound)
        return moved

    @property
    def num_seqs(self) -> int:
        return len(self.kv_lens)

    @property
    def num_tokens(self) -> int:
        return self.cu_q[-1]

    def segments(self):
        """(sequence index, first row, end row) for each sequence."""
        for b in range(self.num_seqs):
            yield b, self.cu_q[b], self.cu_q[b + 1]

    def last_rows(self) -> list[int]:
        return [self.cu_q[b + 1] - 1 for b in range(self.num_seqs)]


_CURRENT: contextvars.ContextVar[ForwardBatch | None] = contextvars.ContextVar("exl3_batch", default=None)


def current_batch() -> ForwardBatch | None:
    return _CURRENT.get()


@contextlib.contextmanager
def running(batch: ForwardBatch | None):
    token = _CURRENT.set(batch)
    try:
        yield batch
    finally:
        _CURRENT.reset(token)
