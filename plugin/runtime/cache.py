"""The paged cache: fixed-size pages shared by all sequences, with prefix sharing.

Storage: for every layer and every ``PagedTensorSpec`` of that layer a tensor
``[num_pages, page_size // tokens_per_entry, *entry_shape]``; for every
``SlotTensorSpec`` a tensor ``[max_seqs + 1, *shape]``. All layers use the same page
numbers, so one page table per sequence serves the whole model.

Ring layers (sliding-window layers that keep only their window, see
``arch.cache_spec``) instead get ``ring_pages`` pages per sequence slot:
``[(max_seqs + 1) * ring_pages, page_size, *entry_shape]``, slot ``s`` owning pages
``s * ring_pages ...``. The runner maps positions onto them (``ring_slot``).
The extra slot (``dummy_slot``) is where padding rows of captured decode steps
write, so they never touch a live sequence's state.

Pages are reference-counted. A full page whose tokens (and all tokens before
them) are known is registered under a hash of that token prefix; a new sequence
whose prompt starts with the same tokens takes the registered pages instead of
recomputing them (``match_prefix``). A shared page is never written: a sequence
only ever writes into its own last, partly filled page.

A registered page whose last user finished keeps its contents: it goes to the
back of the free list (reused last) and stays matchable until it is handed out
again, so a later request with the same prompt start (a chat's system prompt)
still skips that work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..arch.cache_spec import LayerCacheSpec, ring_pages
from ..errors import InvalidArgumentError


class OutOfPagesError(RuntimeError):
    """Raised internally when a sequence needs a page and none is free (the scheduler handles it)."""


@dataclass
class SequenceCache:
    """One sequence's view of the cache: its pages, how many tokens they hold, its state slot."""

    page_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    slot: int = -1
    # hash of the prefix ending at each full page, for registering/sharing pages
    page_hashes: list[bytes] = field(default_factory=list)


class PagedCache:
    def __init__(self, specs: list[LayerCacheSpec], *, num_pages: int, page_size: int = 256,
                 max_seqs: int = 64, ring_margin: int = 0):
        if page_size <= 0 or page_size & (page_size - 1):
            raise InvalidArgumentError(f"page_size must be a power of two, got {page_size}")
        if num_pages < 1:
            raise InvalidArgumentError(f"the cache needs at least one page, got {num_pages}")
        self.specs = specs
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_seqs = max_seqs
        self.dummy_slot = max_seqs
        self.ring_pages = ring_pages(specs, page_size, ring_margin)
        self.paged: list[dict[str, torch.Tensor]] = []
        self.slots: list[dict[str, torch.Tensor]] = []
        for spec in specs:
            layer_paged = {}
            pages = (max_seqs + 1) * self.ring_pages if spec.ring else num_pages
            for t in spec.paged:
                if page_size % t.tokens_per_entry:
                    raise InvalidArgumentError(f"page_size {page_size} is not a multiple of {t.tokens_per_entry}: "
                                               f"cache tensor {t.name!r} stores one entry per {t.tokens_per_entry} "
                                               "tokens; leave page_size unset to get one that fits")
                if spec.ring and t.tokens_per_entry != 1:
                    raise InvalidArgumentError(f"ring layers store one entry per token ({t.name})")
                layer_paged[t.name] = torch.zeros((pages, page_size // t.tokens_per_entry, *t.entry_shape),
                                                  dtype=t.dtype, device=spec.device)
            self.paged.append(layer_paged)
            self.slots.append({t.name: torch.zeros((max_seqs + 1, *t.shape), dtype=t.dtype, device=spec.device)
                               for t in spec.slots})
        self.refcount = [0] * num_pages
        # pop() hands out from the end: blank pages sit there, pages with reusable contents at the front
        self.free_pages = list(range(num_pages - 1, -1, -1))
        self.free_slots = list(range(max_seqs - 1, -1, -1))
        self.prefix_pages: dict[bytes, int] = {}  # prefix hash -> page holding its last page_size tokens
        self.page_prefix: dict[int, bytes] = {}

    # ------------------------------------------------------------- sizing

    @staticmethod
    def bytes_per_token(specs: list[LayerCacheSpec]) -> float:
        return sum(s.bytes_per_token() for s in specs)

    @staticmethod
    def fixed_bytes(specs: list[LayerCacheSpec], page_size: int, max_seqs: int, ring_margin: int = 0) -> float:
        """Bytes that do not depend on the page count: the rings and per-sequence slots."""
        ring_tokens = (max_seqs + 1) * ring_pages(specs, page_size, ring_margin) * page_size
        total = 0.0
        for spec in specs:
            if spec.ring:
                total += spec.entry_bytes() * ring_tokens
            for t in spec.slots:
                numel = 1
                for d in t.shape:
                    numel *= d
                total += numel * torch.tensor([], dtype=t.dtype).element_size() * (max_seqs + 1)
        return total

    @property
    def shares_prefixes(self) -> bool:
        """Prefix pages can be shared only when every layer's state lives in the pages."""
        return self.ring_pages == 0 and not any(s.slots for s in self.specs)

    def ring_slot(self, seq_slot: int, position: int) -> int:
        """Flat index of ``position``'s entry in the ring of sequence slot ``seq_slot``."""
        r, s = self.ring_pages, self.page_size
        return (seq_slot * r + (position // s) % r) * s + position % s

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    # ------------------------------------------------------------- sequences

    def new_sequence(self) -> SequenceCache:
        if not self.free_slots:
            raise OutOfPagesError("no free sequence slot")
        return SequenceCache(slot=self.free_slots.pop())

    def release(self, seq: SequenceCache) -> None:
        """Give back a sequence's pages (shared ones stay while others use them) and its slot."""
        for page in seq.page_ids:
            self._unref(page)
        seq.page_ids.clear()
        seq.page_hashes.clear()
        seq.num_tokens = 0
        if seq.slot >= 0:
            for tensors in self.slots:
                for t in tensors.values():
                    t[seq.slot].zero_()
            self.free_slots.append(seq.slot)
            seq.slot = -1

    def reserve(self, seq: SequenceCache, total_tokens: int) -> None:
        """Make sure ``seq`` has pages for ``total_tokens`` tokens (raises OutOfPagesError)."""
        need = self.pages_for(total_tokens) - len(seq.page_ids)
        if need > len(self.free_pages):
            raise OutOfPagesError(f"need {need} pages, {len(self.free_pages)} free")
        for _ in range(max(0, need)):
            page = self._take_free_page()
            self.refcount[page] = 1
            seq.page_ids.append(page)

    def _take_free_page(self) -> int:
        page = self.free_pages.pop()
        digest = self.page_prefix.pop(page, None)  # its old contents are about to be overwritten
        if digest is not None and self.prefix_pages.get(digest) == page:
            del self.prefix_pages[digest]
        return page

    def reserve_dummy_page(self) -> int:
        """Take one page out of circulation for good (padding rows of captured decode steps write there)."""
        if not self.free_pages:
            raise OutOfPagesError("no page left for the CUDA-graph padding page")
        page = self._take_free_page()
        self.refcount[page] = 1
        return page

    def _unref(self, page: int) -> None:
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            if page in self.page_prefix:
                self.free_pages.insert(0, page)  # keep the contents as long as possible
            else:
                self.free_pages.append(page)

    # ------------------------------------------------------------- prefix sharing

    @staticmethod
    def _chain(previous: bytes, tokens: list[int]) -> bytes:
        h = hashlib.blake2b(previous, digest_size=16)
        h.update(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes())
        return h.digest()

    def match_prefix(self, seq: SequenceCache, tokens: list[int]) -> int:
        """Attach registered pages matching the start of ``tokens`` to a new, empty ``seq``.

        At least one token is always left to compute (the model needs the last
        prompt token's output). Returns the number of tokens now cached.
        """
        assert not seq.page_ids, "prefix matching is for new sequences"
        if not self.shares_prefixes:
            return 0
        digest = b""
        full = (len(tokens) - 1) // self.page_size
        for i in range(full):
            digest = self._chain(digest, tokens[i * self.page_size:(i + 1) * self.page_size])
            page = self.prefix_pages.get(digest)
            if page is None:
                break
            if self.refcount[page] == 0:  # a finished sequence's page, still holding its tokens
                self.free_pages.remove(page)
            self.refcount[page] += 1
            seq.page_ids.append(page)
            seq.page_hashes.append(digest)
            seq.num_tokens += self.page_size
        return seq.num_tokens

    def register_full_pages(self, seq: SequenceCache, tokens: list[int]) -> None:
        """After ``seq`` cached ``tokens``, publish its newly completed pages for sharing."""
        full = min(seq.num_tokens, len(tokens)) // self.page_size
        digest = seq.page_hashes[-1] if seq.page_hashes else b""
        for i in range(len(seq.page_hashes), full):
            digest = self._chain(digest, tokens[i * self.page_size:(i + 1) * self.page_size])
            seq.page_hashes.append(digest)
            page = seq.page_ids[i]
            if digest not in self.prefix_pages:
                self.prefix_pages[digest] = page
                self.page_prefix[page] = digest
