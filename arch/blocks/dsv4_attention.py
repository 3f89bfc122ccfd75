"""DeepSeek-V4 attention: sliding window plus compressed entries, with a lightning indexer.

architectures.md §2.3-2.5 (transformers ``DeepseekV4Attention``):

* q low-rank path ``q_r = RMSNorm(wq_a h)``, ``q = wq_b q_r`` per head, then an unweighted
  per-head RMSNorm; one shared K = V head ``kv = RMSNorm(wkv h)``;
* interleaved RoPE on the trailing ``rope_dim`` channels of q and kv (plain theta on sliding
  layers, the compress rope with YaRN on compressed ones);
* keys: the raw kv of the last ``window`` positions (the token included) and, on compressed
  layers, the compressor's entries whose windows have closed (CSA: only the indexer's top-k);
* softmax with a per-head sink logit (an extra denominator term without a value), scale
  ``head_dim^-0.5``; since V = K the output carries the keys' rope, so its trailing channels
  are rotated back by the query position;
* grouped low-rank output: head group ``g`` goes through its own ``wo_a`` slice, then ``wo_b``.

Decode state (all indexed by position, per the runtime's rule): a ring per sequence holding each
position's kv row and, on compressed layers, its compressor (and indexer-compressor) rows
``(C, Z)``; the compressed entries live in shared pages, ``ratio`` positions per entry. A step
reads the ring rows before its first position, appends its own, and recomputes every window it
touches from those rows, so prefill, full forward and decode are one causal function, and
forgetting positions (speculative rollback) needs no undo.
"""

from __future__ import annotations

import torch
from torch import nn

from ..batch import ForwardBatch, running
from .compressor import KVCompressor
from .linear import Linear
from .norm import RMSNorm
from .rope_interleaved import rope_angles, rotate_tail_interleaved


class LightningIndexer(nn.Module):
    """Scores compressed entries for each query: ``sum_h w[t,h] ReLU(q[t,h] . K[s]) / sqrt(D)``,
    ``w = weights_proj(h) / sqrt(H)``; keeps the top ``topk`` visible ones (§2.4)."""

    def __init__(self, wq_b: Linear, weights_proj: torch.Tensor, compressor: KVCompressor, *, num_heads: int,
                 head_dim: int, topk: int, inv_freq: torch.Tensor):
        super().__init__()
        self.wq_b, self.compressor = wq_b, compressor
        # unquantized in every reference (a router-like scoring head): kept fp32
        self.register_buffer("weights_proj", weights_proj.float())
        # on the layer's device: a copy from the host inside a captured decode step is not allowed
        self.register_buffer("inv_freq", inv_freq.float().to(weights_proj.device))
        self.num_heads, self.head_dim, self.topk = num_heads, head_dim, topk

    def select(self, q_r: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
        """``q_r``, ``h``, ``positions`` of ``[B, T]`` queries, ``keys [B, E, D]``, ``visible [B, T, E]``
        -> the selected entries ``[B, T, E]`` (bool)."""
        q = self.wq_b(q_r.reshape(-1, q_r.shape[-1])).view(*q_r.shape[:-1], self.num_heads, self.head_dim)
        cos, sin = rope_angles(positions, self.inv_freq)
        q = rotate_tail_interleaved(q, cos, sin).float()
        w = (h.float() @ self.weights_proj.T) * self.num_heads ** -0.5  # [B, T, H]
        scores = torch.relu(torch.einsum("bthd,bed->bthe", q, keys.float())) * self.head_dim ** -0.5
        scores = (scores * w[..., None]).sum(2).masked_fill(~visible, float("-inf"))
        k = min(self.topk, keys.shape[1])
        if k >= keys.shape[1]:
            return visible
        # Exact ties are common (ReLU zeroes whole score rows). A stable sort breaks them towards the
        # earlier entry, so the choice does not depend on how many (invisible) entries follow:
        # torch.topk's order among ties does, which would make a prefix's logits change.
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        chosen = torch.zeros_like(visible).scatter_(-1, top, True)
        return chosen & visible


class GroupedOutput(nn.Module):
    """``wo_b(cat_g wo_a[g](o_g))``: head group ``g`` of the attention output through its own slice."""

    def __init__(self, wo_a: list[Linear], wo_b: Linear):
        super().__init__()
        self.wo_a, self.wo_b = nn.ModuleList(wo_a), wo_b

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        groups = o.reshape(o.shape[0], len(self.wo_a), -1)
        return self.wo_b(torch.cat([proj(groups[:, g]) for g, proj in enumerate(self.wo_a)], dim=-1))


class DSV4Attention(nn.Module):
    def __init__(self, *, wq_a: Linear, q_norm: RMSNorm, wq_b: Linear, wkv: Linear, kv_norm: RMSNorm,
                 output: GroupedOutput, sink: torch.Tensor, num_heads: int, head_dim: int, window: int,
                 inv_freq: torch.Tensor, eps: float, layer_idx: int, compressor: KVCompressor | None = None,
                 indexer: LightningIndexer | None = None, pool_idx: int | None = None):
        super().__init__()
        self.wq_a, self.q_norm, self.wq_b, self.wkv, self.kv_norm = wq_a, q_norm, wq_b, wkv, kv_norm
        self.output, self.compressor, self.indexer = output, compressor, indexer
        self.q_head_norm = RMSNorm(None, eps)
        self.register_buffer("sink", sink.float())
        self.register_buffer("inv_freq", inv_freq.float().to(sink.device))
        self.num_heads, self.head_dim, self.window = num_heads, head_dim, window
        self.scale = head_dim ** -0.5
        self.layer_idx = layer_idx
        self.pool_idx = pool_idx  # cache entry (after the trunk's layers) holding this layer's compressed pools

    @property
    def ring_window(self) -> int:
        """Positions each sequence's ring must keep: the attention window and the compressor's history."""
        need = self.window
        for comp in (self.compressor, self.indexer.compressor if self.indexer is not None else None):
            if comp is not None:
                need = max(need, comp.history + 1)
        return need

    # ------------------------------------------------------------- the causal function

    def _project(self, h: torch.Tensor, positions: torch.Tensor):
        # the linears see 2-D rows: in a decode step one row per sequence, which is what
        # ``Linear``'s batch-invariant mode splits by
        lead = h.shape[:-1]
        flat, flat_pos = h.reshape(-1, h.shape[-1]), positions.reshape(-1)
        cos, sin = rope_angles(positions, self.inv_freq)
        q_r = self.q_norm(self.wq_a(flat))
        q = self.q_head_norm(self.wq_b(q_r).view(*lead, self.num_heads, self.head_dim))
        q = rotate_tail_interleaved(q, cos, sin)
        rows = {"kv": self.roped_kv(flat, cos, sin).view(*lead, -1)}
        for prefix, comp in (("comp", self.compressor), ("idx", self.indexer.compressor if self.indexer is not None else None)):
            if comp is not None:
                c, z = comp.project(flat, flat_pos)
                rows[f"{prefix}_kv"], rows[f"{prefix}_gate"] = c.view(*lead, -1), z.view(*lead, -1)
        return q_r.view(*lead, -1), q, rows, (cos, sin)

    def roped_kv(self, flat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The shared K = V row ``RoPE(RMSNorm(wkv h))`` of rows ``flat [R, hidden]`` (angles ``[R, rope_dim / 2]``);
        the DSpark drafter also builds its main-kv rows with it, from the trunk's projected taps."""
        return rotate_tail_interleaved(self.kv_norm(self.wkv(flat)), cos.reshape(flat.shape[0], -1),
                                       sin.reshape(flat.shape[0], -1))

    def _groups(self, h: torch.Tensor, positions: torch.Tensor, n_windows: int,
                history: dict[str, torch.Tensor] | None, pools) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``B`` sequences' new tokens ``h [B, T, hidden]`` at contiguous ``positions [B, T]``.

        ``history``: rows ``[B, N, ...]`` of the positions ``first - N .. first - 1`` (None: nothing
        before). ``n_windows``: compressor windows touched per sequence. ``pools(name, entries [B, n, D],
        windows [B, n])`` stores freshly computed entries and returns ``(all entries [B, E, D], position
        from which each is visible [B, E])``. Returns the attention output ``[B, T, hidden]`` and the
        new rows. Prefill (B = 1), decode (T = 1) and the full forward all run this.
        """
        b, t = positions.shape
        q_r, q, new, (cos, sin) = self._project(h, positions)
        n_hist = 0 if history is None else history["kv"].shape[1]
        first, last = positions[:, 0], positions[:, -1]
        base = first - n_hist
        rows = {k: v if history is None else torch.cat([history[k].to(v.dtype), v], dim=1) for k, v in new.items()}
        key_pos = base[:, None] + torch.arange(n_hist + t, device=h.device)  # [B, N]
        qp = positions[..., None]  # [B, T, 1]
        mask = (key_pos[:, None] >= 0) & (key_pos[:, None] <= qp) & (key_pos[:, None] > qp - self.window)
        keys = rows["kv"].float()
        if self.compressor is not None:
            m = self.compressor.ratio
            windows = first[:, None] // m + torch.arange(n_windows, device=h.device)
            new_entries = self.compressor.compress(rows["comp_kv"], rows["comp_gate"], base, windows, last)
            entries, ready_at = pools("pool", new_entries, windows)
            visible = ready_at[:, None, :] <= qp  # the window closed at or before the query
            if self.indexer is not None:
                ic = self.indexer.compressor
                new_keys = ic.compress(rows["idx_kv"], rows["idx_gate"], base, windows, last)
                idx_keys, _ = pools("idx_pool", new_keys, windows)
                visible = self.indexer.select(q_r, h, positions, idx_keys, visible)
            keys = torch.cat([keys, entries.float()], dim=1)
            mask = torch.cat([mask, visible], dim=2)
        out = self._attend(q.float(), keys, mask)
        out = rotate_tail_interleaved(out, cos, -sin)  # V = K carries the rope: undo it at the query
        return self.output(out.to(h.dtype).reshape(b * t, -1)).view(b, t, -1), new

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``q [B, T, H, D]``, shared K = V ``keys [B, N, D]``, ``mask [B, T, N]`` -> ``[B, T, H, D]`` (fp32)."""
        logits = torch.einsum("bthd,bnd->bthn", q, keys) * self.scale
        logits = logits.masked_fill(~mask[:, :, None, :], float("-inf"))
        sink = self.sink[:, None].expand(*q.shape[:2], -1, 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        return torch.einsum("bthn,bnd->bthd", probs, keys)

    # ------------------------------------------------------------- entry points

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        if batch is not None:
            return self._forward_cached(x, batch)
        return self._forward_whole(x, positions)

    def _forward_whole(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Whole sequences ``h [B, T, hidden]`` without a cache (each row's positions contiguous)."""
        n_windows = 0
        if self.compressor is not None:
            m = self.compressor.ratio
            n_windows = int((positions[:, -1] // m - positions[:, 0] // m).max()) + 1

        def pools(name, entries, windows):
            return entries, (windows + 1) * self._ratio - 1

        return self._groups(h, positions, n_windows, None, pools)[0]

    @property
    def _ratio(self) -> int:
        return self.compressor.ratio if self.compressor is not None else 1

    def _forward_cached(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Decode steps run every sequence at once (one token each, no host values: CUDA-graph safe);
        prefill steps one sequence at a time."""
        if batch.is_decode:
            rows = torch.arange(batch.num_seqs, device=x.device)
            return self._cached_group(x[:, None], batch.positions[:, None], rows, 1, batch,
                                      batch.ring_slot_mapping, slice(None))[:, 0]
        outs = []
        for b, lo, hi in batch.segments():
            n, n_windows = hi - lo, 0
            if self.compressor is not None:  # host positions: prefill steps are never graph-captured
                m, start = self.compressor.ratio, batch.kv_lens[b] - (hi - lo)
                n_windows = (start + n - 1) // m - start // m + 1
            seq = torch.tensor([b], device=x.device)
            slots = batch.ring_slot_mapping[lo:hi]  # -1: overwritten later in this chunk, not written
            with running(None):  # one sequence's rows: nothing for batch-invariant linears to split
                outs.append(self._cached_group(x[None, lo:hi], batch.positions[None, lo:hi], seq, n_windows,
                                               batch, slots, slots >= 0)[0])
        return torch.cat(outs)

    def _cached_group(self, h, positions, seqs, n_windows, batch, slots, keep) -> torch.Tensor:
        """Sequences ``seqs`` of the batch (rows of its page tables) with their new tokens ``h [B, T, hidden]``:
        ring rows of positions ``first - ring_size .. first - 1`` as history (ring index = position mod
        ring size), then the new rows written into the ring at ``slots [B * T]`` (``keep``: which)."""
        ring = batch.cache.paged[self.layer_idx]
        ps = batch.cache.page_size
        ring_size = batch.cache.ring_pages * ps
        region = batch.ring_page_table[seqs, 0].long() * ps
        offsets = torch.arange(ring_size, device=h.device)
        hist_idx = region[:, None] + (positions[:, :1] - ring_size + offsets) % ring_size  # [B, ring_size]
        history = {name: t.view(-1, *t.shape[2:])[hist_idx] for name, t in ring.items()}
        pool_state = batch.cache.paged[self.pool_idx] if self.pool_idx is not None else None
        pools = _PagedPools(pool_state, batch.page_table[seqs], ps, self._ratio)
        out, new = self._groups(h, positions, n_windows, history, pools)
        for name, t in ring.items():
            flat = t.view(-1, *t.shape[2:])
            flat[slots[keep]] = new[name].reshape(-1, *new[name].shape[2:])[keep].to(flat.dtype)
        return out


class _PagedPools:
    """Sequences' compressed entries in the shared pages: entry ``w`` at page ``(w m) // page_size``."""

    def __init__(self, state: dict[str, torch.Tensor] | None, page_rows: torch.Tensor, page_size: int, ratio: int):
        self.state, self.page_rows, self.ratio = state, page_rows.long(), ratio
        self.per_page = page_size // ratio

    def __call__(self, name: str, entries: torch.Tensor, windows: torch.Tensor):
        pool = self.state[name]
        flat = pool.view(-1, pool.shape[-1])
        pages = self.page_rows.gather(1, windows // self.per_page)
        flat[pages * self.per_page + windows % self.per_page] = entries.to(flat.dtype)
        everything = pool[self.page_rows.clamp(min=0)].flatten(1, 2)  # [B, E, D]
        w = torch.arange(everything.shape[1], device=everything.device)
        # pages past a sequence's end hold other data; their windows close after any of its queries
        return everything, ((w + 1) * self.ratio - 1).expand(everything.shape[0], -1)
