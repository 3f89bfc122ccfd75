"""Multi-head latent attention (DeepSeek-V2/V3 style) as OpenPanguV2 uses it.

architectures.md §0.3 / §3.4. Per token ``h``:

* ``q_lora = norm_qa(mome_qa(q_a_proj(h)))``, ``q = q_b_proj(q_lora)`` -> per head
  ``[q_nope | q_pe]``;
* ``[c | k_pe] = kv_a_proj_with_mqa(h)``, ``c = norm_kva(mome_kv(c))`` (the cached latent);
* NEOX RoPE on the trailing ``q_pe`` and the single shared ``k_pe`` head;
* absorbed attention: ``score = (W_UK^T q_nope) . c + q_pe . k_pe`` times
  ``(d_nope + d_rope)^-0.5``, ``out_h = W_UV_h sum_s p_s c_s``; ``kv_b_proj`` is kept dense;
* ``o = mome_o(concat_h out_h)``, ``o_proj(o)``.

Pangu extras, all optional here: learned sink entries (``param_sink_compressed_kv``
normed like a token latent, ``param_sink_k_pe`` not rotated) that every query sees
and the window/selection never hide; the MoME short convolutions (``short_conv``);
a sliding ``window`` (counting the current token); a lightning indexer whose top-k
picks the visible tokens (DSA layers).

Cached state (``cache_spec``), indexed by position so that speculative decoding can
roll back by forgetting positions:

* paged (or a ring for windowed layers): the normed latent ``c``, the rotated ``k_pe``
  and, on DSA layers, the indexer key;
* per sequence slot, a small ring of ``CONV_RING`` rows indexed by ``position %
  CONV_RING`` holding each MoME convolution's *input* (the previous ``K-1`` of them are
  the convolution's state). It must be longer than ``K-1`` plus the most tokens fed
  after a position that may still be rolled back to (a draft chain), hence 32.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ..batch import ForwardBatch, current_batch
from ..cache_spec import LayerCacheSpec, PagedTensorSpec, SlotTensorSpec
from .lightning_indexer import LightningIndexer
from .linear import Linear, LinearGroup
from .norm import RMSNorm
from .rope import RotaryEmbedding, fold_sin, rotate_neox_folded
from .short_conv import ShortConv, decode_windows, mome_decode_reference, sliding_windows

CONV_RING = 32
CONV_INPUTS = ("qa_in", "kv_in", "o_in")  # cache names of the MoME convs' inputs, in (qa, kv, o) order
PREFILL_ROWS = 1024  # query rows per attention block in a prefill chunk (scores are [rows, heads, keys] fp32)
INVALID = 1 << 62  # key position of history entries that do not exist (never visible)


def _fused_mome(x: torch.Tensor):
    """The Triton MoME decode kernel (kernels/triton_mome.py) for ``x``'s device, or None where it
    cannot run (then ``mome_decode_reference``; bench/count_ops.py stands in for it on a CPU)."""
    from ...kernels import triton_ops

    return triton_ops.cuda_kernel(x, "mome", "mome_decode_triton")


def _fused_store_keys(x: torch.Tensor):
    """The Triton MLA key-side kernel (kernels/triton_mla_keys.py) for ``x``'s device, or None where it
    cannot run (then ``store_keys_reference``; bench/count_ops.py stands in for it on a CPU)."""
    from ...kernels import triton_ops

    return triton_ops.cuda_kernel(x, "mla_keys", "mla_store_keys_triton")


def store_keys_reference(kv: torch.Tensor, rank: int, conv, norm: RMSNorm, positions: torch.Tensor, cos: torch.Tensor,
                         sin_folded: torch.Tensor, dest: torch.Tensor, c_cache: torch.Tensor, kpe_cache: torch.Tensor,
                         index=None) -> None:
    """A decode step's key side in PyTorch (the CPU path; the arguments of
    ``kernels.triton_mla_keys.mla_store_keys_triton``): the latent ``norm(x + conv(x))`` of
    ``kv``'s first ``rank`` columns, ``k_pe`` (the rest) NEOX-rotated, and on DSA layers the indexer
    key ``index = (wk(h), indexer, cache)``, each stored at the flat cache rows ``dest``."""
    kv_in, k_pe = kv.split([rank, kv.shape[-1] - rank], dim=-1)
    if conv is not None:
        ring, weight, seq_slots = conv
        kv_in = mome_decode_reference(ring, weight, seq_slots, positions, kv_in, kv_in.dtype)
    c = norm(kv_in)  # model dtype, as the cache keeps it
    c_cache.index_copy_(0, dest, c.to(c_cache.dtype))
    kpe_cache.index_copy_(0, dest, rotate_neox_folded(k_pe.float(), cos, sin_folded, kpe_cache.dtype))
    if index is not None:
        k, indexer, cache = index
        cache.index_copy_(0, dest, indexer.keys(k, cos, sin_folded).to(cache.dtype))


def _fused_mla(x: torch.Tensor):
    """The Triton MLA decode kernels (kernels/triton_mla.py: the query ``q_prologue``, the attention
    with the value product ``decode_out`` and the indexer's ``index_scores``) for ``x``'s device, or
    None where they cannot run (then the einsum path below, which is their reference on a CPU)."""
    from ...kernels import triton_ops

    if x.dtype != torch.float16:  # the kernels' operands are fp16 (the cache's dtype); bf16 / fp32 models: PyTorch
        return None
    kernels = {name: triton_ops.cuda_kernel(x, "mla", kernel) for name, kernel in (
        ("q_prologue", "mla_q_prologue_triton"), ("decode_out", "mla_decode_out_triton"),
        ("index_scores", "index_scores_triton"))}
    return None if None in kernels.values() else SimpleNamespace(**kernels)


class MLAAttention(nn.Module):
    def __init__(self, *, q_a_proj: Linear, q_a_norm: RMSNorm, q_b_proj: Linear, kv_a_proj: Linear,
                 kv_a_norm: RMSNorm, kv_b: torch.Tensor, o_proj: Linear, num_heads: int, nope_dim: int,
                 rope_dim: int, v_dim: int, rope: RotaryEmbedding, window: int | None = None, ring: bool = False,
                 sink_latent: torch.Tensor | None = None, sink_k_pe: torch.Tensor | None = None,
                 convs: tuple[ShortConv, ShortConv, ShortConv] | None = None,
                 indexer: LightningIndexer | None = None, layer_idx: int = 0):
        super().__init__()
        # every projection of the layer input in one LinearGroup (one matmul where their formats match):
        # q_a, kv_a and on DSA layers the indexer's key and head-weight projections
        inputs = [q_a_proj, kv_a_proj] + ([] if indexer is None else indexer.input_projections())
        self.x_proj = LinearGroup(inputs)
        self.q_a_norm, self.q_b_proj, self.kv_a_norm, self.o_proj = q_a_norm, q_b_proj, kv_a_norm, o_proj
        self.num_heads, self.nope_dim, self.rope_dim, self.v_dim = num_heads, nope_dim, rope_dim, v_dim
        self.kv_rank = kv_b.shape[1]
        w = kv_b.float().view(num_heads, nope_dim + v_dim, self.kv_rank)
        self.register_buffer("w_uk", w[:, :nope_dim].contiguous())  # [heads, nope, rank]
        self.register_buffer("w_uv", w[:, nope_dim:].contiguous())  # [heads, v, rank]
        self._kernel_params = None  # fp16 copies for the decode kernels, made on their first use
        self.scale = (nope_dim + rope_dim) ** -0.5
        self.rope, self.window, self.ring = rope, window, ring
        if (sink_latent is None) != (sink_k_pe is None):
            raise ValueError("sink entries need both their latent and their k_pe")
        if sink_latent is None:
            sink_latent, sink_k_pe = torch.zeros(0, self.kv_rank), torch.zeros(0, rope_dim)
        else:  # constant per layer: normalise once (the reference normalises sinks in fp32)
            sink_latent = kv_a_norm(sink_latent.float())
        self.register_buffer("sink_c", sink_latent.float())
        self.register_buffer("sink_pe", sink_k_pe.float())
        self.convs = None if convs is None else nn.ModuleList(convs)
        self.indexer = indexer
        self.layer_idx = layer_idx
        self.record_selection = False  # keep the last chunk's visibility mask in ``last_selection`` (tests)

    # ------------------------------------------------------------- state

    def cache_spec(self, dtype: torch.dtype, device: torch.device) -> LayerCacheSpec:
        paged = [PagedTensorSpec("c", (self.kv_rank,), dtype), PagedTensorSpec("kpe", (self.rope_dim,), dtype)]
        if self.indexer is not None:
            paged.append(PagedTensorSpec("kidx", (self.indexer.head_dim,), dtype))
        slots = ()
        if self.convs is not None:
            slots = tuple(SlotTensorSpec(name, (CONV_RING, conv.channels), dtype, position_ring=conv.width - 1)
                          for name, conv in zip(CONV_INPUTS, self.convs))
        return LayerCacheSpec(paged=tuple(paged), slots=slots, window=self.window, device=torch.device(device),
                              ring=self.ring)

    # ------------------------------------------------------------- one sequence

    def _mome(self, which: int, x: torch.Tensor, previous: torch.Tensor | None, positions: torch.Tensor):
        """``previous``: the inputs before a consecutive chunk ``[K-1, C]``, or before each row ``[n, K-1, C]``."""
        if self.convs is None:
            return x
        conv = self.convs[which]
        if previous is None:
            previous = x.new_zeros(conv.width - 1, x.shape[-1])
        if previous.dim() == 3:
            return conv(torch.cat([previous.to(x.dtype), x[:, None]], dim=1), positions)
        return conv(sliding_windows(x, previous, conv.width), positions)

    def _chunk(self, h: torch.Tensor, positions: torch.Tensor, hist: dict) -> tuple[torch.Tensor, dict]:
        """New rows ``h [n, hidden]`` at ``positions [n]`` after the cached history ``hist``
        (``positions``, ``c``, ``kpe``, ``kidx`` of earlier tokens and each conv's previous inputs).

        The rows are one sequence's consecutive tokens (a prefill chunk, or the whole sequence
        without a cache; decode steps take ``_forward_decode``). Returns the output
        ``[n, hidden]`` and the new rows' state."""
        n, heads = h.shape[0], self.num_heads
        prev = hist.get("conv_prev", (None, None, None))
        qa_in, kv, *index_in = self.x_proj(h)  # index_in: the indexer's wk(h), weights_proj(h)
        q_lora = self.q_a_norm(self._mome(0, qa_in, prev[0], positions))
        q = self.q_b_proj(q_lora).float().view(n, heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv_in, k_pe = kv.split([self.kv_rank, self.rope_dim], dim=-1)
        c = self.kv_a_norm(self._mome(1, kv_in.contiguous(), prev[1], positions)).float()
        cos, sin = self._rope_tables(positions)
        q_pe = rotate_neox_folded(q_pe, cos[:, None], sin[:, None])
        k_pe = rotate_neox_folded(k_pe.float(), cos, sin)
        new = {"c": c, "kpe": k_pe, "qa_in": qa_in, "kv_in": kv_in}

        def with_new(old: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
            return torch.cat([old.float(), fresh])

        key_pos = torch.cat([hist["positions"], positions])[None, :]
        keys_c, keys_pe = with_new(hist["c"], c), with_new(hist["kpe"], k_pe)
        visible = key_pos <= positions[:, None]
        if self.window is not None:
            visible &= key_pos > positions[:, None] - self.window
        if self.indexer is not None:
            k_idx = self.indexer.keys(index_in[0], cos, sin)
            new["kidx"] = k_idx
            q_idx, w_idx = self.indexer.queries(q_lora, index_in[1], cos, sin)
            visible = self.indexer.select(q_idx, w_idx, with_new(hist["kidx"], k_idx), visible)
        if self.record_selection:
            self.last_selection = visible  # tests compare the DSA selection with the reference's

        # sinks first, always visible; absorbed attention in the latent space
        keys_c = torch.cat([self.sink_c, keys_c], dim=-2)
        keys_pe = torch.cat([self.sink_pe, keys_pe], dim=-2)
        visible = torch.cat([visible.new_ones(n, self.sink_c.shape[0]), visible], dim=1)
        q_abs = torch.einsum("nhd,hdr->nhr", q_nope, self.w_uk)
        masked = ~visible
        # a long prefill chunk: bound the [rows, heads, keys] score tensors
        ctx = torch.cat([self._attend(q_abs[i:i + PREFILL_ROWS], q_pe[i:i + PREFILL_ROWS], keys_c, keys_pe,
                                      masked[i:i + PREFILL_ROWS], "") for i in range(0, n, PREFILL_ROWS)])
        o_in = torch.einsum("nhr,hvr->nhv", ctx, self.w_uv).reshape(n, heads * self.v_dim).to(h.dtype)
        new["o_in"] = o_in
        return self.o_proj(self._mome(2, o_in, prev[2], positions)), new

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the folded sin (``rope.fold_sin``) for ``positions``; in a cached step shared by
        every layer with this rotary embedding."""
        def tables():
            cos, sin = self.rope(positions)
            return cos, fold_sin(sin)
        batch = current_batch()
        if batch is None or batch.positions is not positions:
            return tables()
        return self._decode_memo(batch, ("rope", id(self.rope)), tables)

    def _attend(self, q_abs, q_pe, keys_c, keys_pe, masked, per_row: str) -> torch.Tensor:
        """Absorbed attention -> the latent context ``[n, heads, rank]``; ``masked [n, s]``: the keys
        a row does not see; ``per_row`` "n": keys per row."""
        k = per_row
        scores = torch.einsum(f"nhr,{k}sr->nhs", q_abs, keys_c) + torch.einsum(f"nhd,{k}sd->nhs", q_pe, keys_pe)
        probs = torch.softmax((scores * self.scale).masked_fill(masked[:, None], float("-inf")), dim=-1)
        return torch.einsum(f"nhs,{k}sr->nhr", probs, keys_c)

    def empty_history(self, like: torch.Tensor) -> dict:
        hist = {"positions": torch.zeros(0, dtype=torch.long, device=like.device),
                "c": like.new_zeros(0, self.kv_rank), "kpe": like.new_zeros(0, self.rope_dim)}
        if self.indexer is not None:
            hist["kidx"] = like.new_zeros(0, self.indexer.head_dim)
        return hist

    # ------------------------------------------------------------- entry points

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        """Without ``batch``: one whole sequence ``x [T, hidden]`` from position 0, no cache.
        With ``batch``: packed tokens of several sequences, history from the paged cache."""
        if batch is None:
            return self._chunk(x, positions, self.empty_history(x))[0]
        return self._forward_cached(x, batch)

    def _forward_cached(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if batch.is_decode:
            return self._forward_decode(x, batch)
        paged, slots = batch.cache.paged[self.layer_idx], batch.cache.slots[self.layer_idx]
        table = batch.ring_page_table if self.ring else batch.page_table
        write_at = batch.ring_slot_mapping if self.ring else batch.slot_mapping
        page_size = batch.cache.page_size
        outs = []
        for b, lo, hi in batch.segments():
            n = hi - lo
            start = batch.kv_lens[b] - n  # first new position
            first = 0 if self.window is None else max(0, start - self.window + 1)
            hist_pos = torch.arange(first, start, device=x.device)
            where = table[b, hist_pos // page_size].long() * page_size + hist_pos % page_size
            hist = {"positions": hist_pos}
            for name, t in paged.items():
                hist[name] = t.flatten(0, 1)[where]
            seq_slot = int(batch.seq_slots[b])
            if self.convs is not None:
                k = self.convs[0].width - 1
                ring_rows = torch.arange(start - k, start, device=x.device) % CONV_RING
                hist["conv_prev"] = tuple(slots[name][seq_slot][ring_rows] for name in CONV_INPUTS)
            out, new = self._chunk(x[lo:hi], batch.positions[lo:hi], hist)
            outs.append(out)
            # store after reading: a ring slot written now may have held a position read above
            dest = write_at[lo:hi]
            keep = dest >= 0
            for name, t in paged.items():
                t.flatten(0, 1).index_copy_(0, dest[keep], new[name][keep].to(t.dtype))
            if self.convs is not None:
                last = slice(max(0, n - CONV_RING), n)  # earlier rows would be overwritten in this chunk
                rows = batch.positions[lo:hi][last] % CONV_RING
                for name in CONV_INPUTS:
                    slots[name][seq_slot].index_copy_(0, rows, new[name][last].to(slots[name].dtype))
        return torch.cat(outs)

    def _decode_history_index(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each decode row's positions up to and including its own (``INVALID`` where none) and
        their flat cache rows."""
        table = batch.ring_page_table if self.ring else batch.page_table
        page_size, pos = batch.cache.page_size, batch.positions
        if self.window is not None:  # the window's tokens, oldest first, the row's own last
            span = torch.arange(1 - self.window, 1, device=pos.device)
            hist_pos = pos[:, None] + span[None, :]
        else:  # every token the page table can address
            hist_pos = torch.arange(table.shape[1] * page_size, device=pos.device)[None, :].expand(pos.shape[0], -1)
        exists = (hist_pos >= 0) & (hist_pos <= pos[:, None])
        safe = hist_pos.clamp_min(0)
        pages = table.gather(1, safe // page_size).long().clamp_min(0)
        where = pages * page_size + safe % page_size
        return torch.where(exists, hist_pos, torch.full_like(hist_pos, INVALID)), where

    @staticmethod
    def _decode_memo(batch: ForwardBatch, key: tuple, make):
        """``make()``, computed once per decode step (the model clears ``batch.memo`` per step)."""
        if key not in batch.memo:
            batch.memo[key] = make()
        return batch.memo[key]

    def _decode_conv_rows(self, batch: ForwardBatch) -> tuple[torch.Tensor, tuple]:
        """Each decode row's MoME window in the conv rings ``[n, K]`` (oldest first, its own entry
        last) and ``ShortConv.active``: the same for every layer of the step."""
        width = self.convs[0].width
        return self._decode_memo(batch, ("mla_conv_rows", width),
                                 lambda: decode_windows(batch.positions, width, CONV_RING))

    def _store_keys(self, kv: torch.Tensor, index_in: list, batch: ForwardBatch) -> None:
        """The decode rows' key side into the paged cache (before any row reads it): the normed
        latent after its MoME conv and the rotated ``k_pe`` from ``kv = kv_a_proj(x)``, the indexer
        key from ``index_in[0] = wk(x)`` on DSA layers. One Triton kernel on CUDA
        (kernels/triton_mla_keys.py)."""
        paged, pos = batch.cache.paged[self.layer_idx], batch.positions
        cos, sin = self._rope_tables(pos)
        conv = None
        if self.convs is not None:
            conv = (batch.cache.slots[self.layer_idx][CONV_INPUTS[1]], self.convs[1].weight, batch.seq_slots)
        index = None
        if self.indexer is not None:
            index = (index_in[0], self.indexer, paged["kidx"].flatten(0, 1))
        dest = batch.ring_slot_mapping if self.ring else batch.slot_mapping
        store = _fused_store_keys(kv) or store_keys_reference
        store(kv, self.kv_rank, conv, self.kv_a_norm, pos, cos, sin, dest, paged["c"].flatten(0, 1),
              paged["kpe"].flatten(0, 1), index)

    def _forward_decode(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """One query per row at its own position, from device tensors only (no host values, fixed
        shapes), so that the step can be captured in a CUDA graph.

        Every row's new state (MoME inputs, latent, k_pe, indexer key) is stored before any row
        reads the cache, and each row then reads everything up to its own position from it. So
        several consecutive positions of one sequence can run as rows of one decode step (the
        generator verifies drafted tokens that way) and each sees the rows before it."""
        slots = batch.cache.slots[self.layer_idx]
        pos, seq_slots, n, heads = batch.positions, batch.seq_slots, x.shape[0], self.num_heads

        def conv(which: int, value: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
            """Stores the rows' inputs in the conv's ring and returns ``x + conv(x)``, normed by ``norm``."""
            if self.convs is None:
                return value if norm is None else norm(value)
            ring = slots[CONV_INPUTS[which]]
            weight = self.convs[which].weight
            fused = _fused_mome(value)
            if fused is not None:  # one kernel instead of six (eight with the norm), the ring store included
                return fused(ring, weight, seq_slots, pos, value, value.dtype, norm)
            rows, active = self._decode_conv_rows(batch)
            return mome_decode_reference(ring, weight, seq_slots, pos, value, value.dtype, norm, rows, active)

        qa_in, kv, *index_in = self.x_proj(x)  # index_in: the indexer's wk(x), weights_proj(x)
        q_lora = conv(0, qa_in, self.q_a_norm)
        self._store_keys(kv, index_in, batch)
        q = self.q_b_proj(q_lora).view(n, heads, self.nope_dim + self.rope_dim)
        cos, sin = self._rope_tables(pos)
        fused = _fused_mla(x)
        q_abs, q_pe = self._decode_queries(fused, q, cos, sin)

        q_idx = w_idx = None
        if self._selects(fused, batch):
            q_idx, w_idx = self.indexer.queries(q_lora, index_in[1], cos, sin)
        # the kernels on every layer kind where they run (bench/mla_decode.py); else the PyTorch path in fp32
        if fused is not None:
            o_in = self._decode_attention_fused(fused, batch, q_abs, q_pe, q_idx, w_idx, x.dtype)
        else:
            ctx = self._decode_attention(batch, q_abs, q_pe, q_idx, w_idx)
            o_in = torch.einsum("nhr,hvr->nhv", ctx, self.w_uv).reshape(n, heads * self.v_dim).to(x.dtype)
        return self.o_proj(conv(2, o_in))

    def _selects(self, fused, batch: ForwardBatch) -> bool:
        """Whether this decode step runs the indexer's selection: on DSA layers, unless the kernels run and
        every position is below the indexer's ``top_k`` (``batch.context_bound``, a host bound that is part
        of the step's graph key): then every row keeps all its candidates, and the kernel walks them all
        without a selection (the same keys, so the same result)."""
        if self.indexer is None:
            return False
        bound = batch.context_bound
        return fused is None or bound is None or bound > self.indexer.top_k

    def _half_params(self) -> SimpleNamespace:
        """``w_uk``, ``w_uv`` and the sink entries in fp16 for the kernels, made once on their device (the
        warm-up steps run before a decode graph is captured). kv_b_proj is decoded from EXL3 to fp16, so on
        a quantized model the weights hold exactly its values; the sinks, like the cached latents, are
        rounded to the cache's fp16."""
        half = self._kernel_params
        if half is None or half.w_uk.device != self.w_uk.device:
            half = self._kernel_params = SimpleNamespace(w_uk=self.w_uk.half(), w_uv=self.w_uv.half(),
                                                         sink_c=self.sink_c.half(), sink_pe=self.sink_pe.half())
        return half

    def _decode_queries(self, fused, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``q_abs [n, H, R]`` and the rotated ``q_pe [n, H, P]`` from ``q_b_proj``'s output ``q [n, H, nope + P]``:
        one prologue kernel (fp16 results) where the kernels run, else in fp32 as the reference computes them."""
        if fused is not None:
            return fused.q_prologue(q, self._half_params().w_uk, cos, sin)
        q_nope, q_pe = q.float().split([self.nope_dim, self.rope_dim], dim=-1)
        return torch.einsum("nhd,hdr->nhr", q_nope, self.w_uk), rotate_neox_folded(q_pe, cos[:, None], sin[:, None])

    def _decode_attention_fused(self, fused, batch: ForwardBatch, q_abs, q_pe, q_idx, w_idx,
                                out_dtype: torch.dtype) -> torch.Tensor:
        """o_proj's input ``[n, heads * v_dim]`` from the Triton kernels: each row visits only its own
        visible keys (sinks, then ``pos - window + 1 .. pos`` or ``0 .. pos``) and the merge of the
        splits multiplies the context by ``w_uv``; on DSA layers the indexer scores only those
        candidates and ``torch.topk`` of the scores, laid out by position like ``_decode_attention``'s,
        picks what the attention reads."""
        paged, pos = batch.cache.paged[self.layer_idx], batch.positions
        table = batch.ring_page_table if self.ring else batch.page_table
        selected = None
        if q_idx is not None:  # see _selects
            scores = fused.index_scores(q_idx, w_idx, paged["kidx"], table, pos, window=self.window)
            # unsorted: the kernel reads the selection as a set, and sorting the k picks was most of topk's
            # time (radixSortKVInPlace, ~21 us a DSA layer at a 32k capacity in the H100 profile)
            selected = torch.topk(scores, min(self.indexer.top_k, scores.shape[1]), dim=-1, sorted=False).indices
        half = self._half_params()
        return fused.decode_out(q_abs, q_pe, half.sink_c, half.sink_pe, paged["c"], paged["kpe"], table, pos,
                                half.w_uv, scale=self.scale, window=self.window, selected=selected,
                                out_dtype=out_dtype)

    def _decode_attention(self, batch: ForwardBatch, q_abs, q_pe, q_idx, w_idx) -> torch.Tensor:
        """The latent context ``[n, heads, rank]`` in PyTorch (the CPU path and the fused kernels'
        reference): every row gathers all the history its page table can address (the window's
        on window layers) and masks what it does not see."""
        paged, pos, n = batch.cache.paged[self.layer_idx], batch.positions, q_abs.shape[0]
        # the same for every layer of this kind in the step (the model clears the memo per step)
        key = ("mla_decode_history", self.ring, self.window)

        def history():
            hist_pos, where = self._decode_history_index(batch)
            return where, hist_pos <= pos[:, None]  # INVALID entries are never visible
        where, visible = self._decode_memo(batch, key, history)
        sinks = self.sink_c.shape[0]
        if self.indexer is not None:
            not_candidate = self._decode_memo(batch, key + ("not_candidate",), lambda: ~visible)
            lead_shown = self._decode_memo(batch, key + ("lead_shown", sinks), lambda: torch.cat(
                [visible.new_zeros(n, sinks), visible.new_ones(visible.shape)], dim=1))
            masked = self.indexer.hidden(q_idx, w_idx, paged["kidx"].flatten(0, 1)[where], not_candidate, lead_shown)
        else:  # sinks first, always visible
            masked = self._decode_memo(batch, key + ("masked", sinks), lambda: ~torch.cat(
                [visible.new_ones(n, sinks), visible], dim=1))
        # sinks first; cat promotes the cached rows to fp32 in the same kernel
        keys_c = torch.cat([self.sink_c.expand(n, -1, -1), paged["c"].flatten(0, 1)[where]], dim=1)
        keys_pe = torch.cat([self.sink_pe.expand(n, -1, -1), paged["kpe"].flatten(0, 1)[where]], dim=1)
        return self._attend(q_abs, q_pe, keys_c, keys_pe, masked, "n")
