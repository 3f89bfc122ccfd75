"""Runs one step of the model over packed sequences, with CUDA graphs for decode steps.

``ModelRunner.run(items)`` takes, per sequence, the new tokens to feed (a prefill
chunk or one decode token), lays them out as a ``ForwardBatch`` and returns the
logits of the rows that need them.

Decode steps on CUDA (every sequence feeds one token) are replayed from CUDA
graphs, one per batch-size bucket (1, 2, 4, 8, ...), captured on first use. The
graph's inputs live in static buffers; rows beyond the real batch point at a
dummy page reserved for that purpose, so they never touch a real sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.base import CausalLM
from ..arch.batch import ForwardBatch
from ..kernels.dispatch import assume_capture
from .cache import PagedCache, SequenceCache

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class StepItem:
    seq: SequenceCache
    tokens: list[int]  # new tokens fed this step
    want_logits: bool  # this step ends the sequence's pending tokens: sample from its last row
    num_logits: int = 1  # with want_logits: logits of this many last rows (a verified draft: 1 + its length)


class ModelRunner:
    def __init__(self, network: CausalLM, cache: PagedCache, *, max_pages_per_seq: int,
                 use_cuda_graphs: bool = True):
        self.network = network
        self.cache = cache
        self.device = network.options.device
        self.max_pages = max_pages_per_seq
        self.page_size = cache.page_size
        # graphs capture one device's stream; a model split over several GPUs runs eagerly
        self.use_graphs = use_cuda_graphs and self.device.type == "cuda" and network.options.plan is None
        self.graphs: dict[tuple, _DecodeGraph] = {}
        # one memory pool for every captured step, as vLLM does: steps never run concurrently and
        # each step's outputs are copied out right after its replay
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.dummy_page = cache.reserve_dummy_page() if self.use_graphs else None

    # ------------------------------------------------------------- layout

    def _slots(self, seq: SequenceCache, start: int, n: int) -> list[int]:
        s = self.page_size
        return [seq.page_ids[p // s] * s + p % s for p in range(start, start + n)]

    def _ring_slots(self, seq_slot: int, start: int, n: int) -> list[int]:
        """Ring entries for positions start..start+n-1; -1 for those the same chunk overwrites later."""
        keep_from = start + n - self.cache.ring_pages * self.page_size
        return [self.cache.ring_slot(seq_slot, p) if p >= keep_from else -1 for p in range(start, start + n)]

    def _ring_table(self, seq_slots: list[int], width: int) -> torch.Tensor:
        """Logical page j of slot s -> ring page s * R + j % R, for every row."""
        r = self.cache.ring_pages
        j = torch.arange(width, dtype=torch.int32) % r
        return torch.tensor(seq_slots, dtype=torch.int32)[:, None] * r + j[None, :]

    def build_batch(self, items: list[StepItem]) -> tuple[torch.Tensor, ForwardBatch, torch.Tensor]:
        """The step's packed ids, its ``ForwardBatch`` and the rows whose logits are wanted."""
        ids, batch = self.layout([(it.seq, it.seq.num_tokens, it.tokens) for it in items])
        cu_q = batch.cu_q
        rows = torch.tensor([r for b, it in enumerate(items) if it.want_logits
                             for r in range(cu_q[b + 1] - it.num_logits, cu_q[b + 1])], dtype=torch.long,
                            device=self.device)
        return ids, batch, rows

    def layout(self, spans: list[tuple[SequenceCache, int, list[int]]]) -> tuple[torch.Tensor, ForwardBatch]:
        """Pack ``(sequence, first position, tokens)`` spans into one step. The pages for every
        position must be reserved; the sequences' ``num_tokens`` are not changed (MTP draft layers
        use this to run over positions the trunk has already cached)."""
        ids, positions, slots, cu_q, kv_lens = [], [], [], [0], []
        table = torch.full((len(spans), max(1, max(len(seq.page_ids) for seq, _, _ in spans))), -1,
                           dtype=torch.int32)
        for b, (seq, start, tokens) in enumerate(spans):
            n = len(tokens)
            ids += tokens
            positions += range(start, start + n)
            slots += self._slots(seq, start, n)
            cu_q.append(cu_q[-1] + n)
            kv_lens.append(start + n)
            table[b, :len(seq.page_ids)] = torch.tensor(seq.page_ids, dtype=torch.int32)
        dev = self.device
        ring_slots = ring_table = None
        if self.cache.ring_pages:
            ring_slots = []
            for seq, start, tokens in spans:
                ring_slots += self._ring_slots(seq.slot, start, len(tokens))
            ring_slots = torch.tensor(ring_slots, dtype=torch.long, device=dev)
            ring_table = self._ring_table([seq.slot for seq, _, _ in spans], table.shape[1]).to(dev)
        batch = ForwardBatch(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            page_table=table.to(dev),
            kv_lens_t=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
            seq_slots=torch.tensor([seq.slot for seq, _, _ in spans], dtype=torch.long, device=dev),
            cu_q=cu_q, kv_lens=kv_lens, cache=self.cache,
            is_decode=all(len(tokens) == 1 for _, _, tokens in spans),
            ring_slot_mapping=ring_slots, ring_page_table=ring_table,
            context_bound=self._context_bound(max(kv_lens) - 1),
        )
        return torch.tensor(ids, dtype=torch.long, device=dev), batch

    # ------------------------------------------------------------- run

    @torch.inference_mode()
    def run(self, items: list[StepItem], *, return_hidden: bool = False):
        """Feed every item's tokens; returns fp32 logits ``[rows wanting logits, vocab]`` (each item's
        ``num_logits`` last rows, in item order), and with ``return_hidden`` a pair ``(logits, hidden)``
        with the hidden state of every fed row (what seeds MTP draft layers).

        A step where every item wants logits for all its rows (a decode step, or a verification
        of drafted tokens) runs as a decode step over rows: each row a query of its own, at its own
        position, over its sequence's pages (see ``CausalLM.verify_as_decode_rows``). Those steps
        replay CUDA graphs.
        """
        rows = self._decode_rows(items)
        if rows is not None and self._graphable(rows):
            out = self._run_graph(rows, return_hidden)
        else:
            if rows is not None:
                ids, batch = self._row_layout(rows)
                logit_rows = None
            else:
                ids, batch, logit_rows = self.build_batch(items)
            out = self.network.forward_batch(ids, batch, logit_rows, return_hidden=return_hidden)
        for it in items:
            it.seq.num_tokens += len(it.tokens)
        return out

    def _decode_rows(self, items: list[StepItem]) -> list[tuple[SequenceCache, int, int]] | None:
        """``(sequence, position, token)`` per row if this step can run as a decode step over rows."""
        if not all(it.want_logits and it.num_logits == len(it.tokens) for it in items):
            return None
        if any(len(it.tokens) > 1 for it in items) and not self.network.verify_as_decode_rows:
            return None
        return [(it.seq, it.seq.num_tokens + i, tok) for it in items for i, tok in enumerate(it.tokens)]

    def _row_layout(self, rows: list[tuple[SequenceCache, int, int]]) -> tuple[torch.Tensor, ForwardBatch]:
        """Decode rows as a step of one-token sequences (each row at its own position)."""
        return self.layout([(seq, pos, [tok]) for seq, pos, tok in rows])

    def _graphable(self, rows: list[tuple[SequenceCache, int, int]]) -> bool:
        """Whether decode ``rows`` fit a captured graph (bucket sizes, page-table width)."""
        return (self.use_graphs and len(rows) <= GRAPH_BUCKETS[-1]
                and all(len(seq.page_ids) <= self.max_pages for seq, _, _ in rows))

    @staticmethod
    def _bucket(n: int) -> int:
        return next(b for b in GRAPH_BUCKETS if b >= n)

    def _context_bound(self, last_position: int) -> int | None:
        """The network's smallest context bucket above ``last_position`` (None: past them all)."""
        return next((b for b in self.network.decode_context_buckets() if last_position < b), None)

    def _run_graph(self, rows: list[tuple[SequenceCache, int, int]], return_hidden: bool):
        bucket = self._bucket(len(rows))
        bound = self._context_bound(max(p for _, p, _ in rows))
        key = ("trunk", bucket, return_hidden, bound)
        graph = self.graphs.get(key)
        if graph is None:
            net = self.network

            def body(ids, batch, inputs):
                out = net.forward_batch(ids, batch, None, return_hidden=return_hidden)
                return out if return_hidden else (out, None)

            graph = self.graphs[key] = _DecodeGraph(self, bucket, body, context_bound=bound)
        logits, hidden = graph.replay(rows)
        n = len(rows)  # copies: the graph's output buffers are overwritten by the next replay
        return (logits[:n].clone(), hidden[:n].clone()) if return_hidden else logits[:n].clone()

    @torch.inference_mode()
    def run_mtp(self, depth: int, rows: list[tuple[SequenceCache, int, int]], hidden: torch.Tensor,
                logit_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP draft layer ``depth`` over ``(sequence, position, next token)`` rows (consecutive
        positions per sequence) whose input hidden states are ``hidden``; fp32 logits of
        ``logit_rows`` and the layer's hidden state of every row. Sequences' ``num_tokens`` are
        not changed. Decode-row models replay CUDA graphs here too."""
        net, n = self.network, len(rows)
        if net.verify_as_decode_rows and self._graphable(rows):
            bucket, heads = self._bucket(n), self._bucket(max(1, len(logit_rows)))
            bound = self._context_bound(max(p for _, p, _ in rows))
            key = ("mtp", depth, bucket, heads, tuple(hidden.shape[1:]), hidden.dtype, bound)
            graph = self.graphs.get(key)
            if graph is None:
                def body(ids, batch, inputs):
                    return net.mtp_forward(depth, inputs["hidden"], ids, batch, inputs["logit_rows"])

                graph = self.graphs[key] = _DecodeGraph(self, bucket, body, inputs={
                    "hidden": ((bucket, *hidden.shape[1:]), hidden.dtype),
                    "logit_rows": ((heads,), torch.long)}, context_bound=bound)
            logits, out = graph.replay(rows, hidden=hidden,
                                       logit_rows=torch.tensor(logit_rows + [0] * (heads - len(logit_rows))))
            return logits[:len(logit_rows)].clone(), out[:n].clone()
        if net.verify_as_decode_rows:
            ids, batch = self._row_layout(rows)
        else:  # consecutive positions of a sequence as one span, run like a prefill chunk
            spans: list[tuple[SequenceCache, int, list[int]]] = []
            for seq, pos, tok in rows:
                if spans and spans[-1][0] is seq and spans[-1][1] + len(spans[-1][2]) == pos:
                    spans[-1][2].append(tok)
                else:
                    spans.append((seq, pos, [tok]))
            ids, batch = self.layout(spans)
        idx = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        return net.mtp_forward(depth, hidden, ids, batch, idx)


class _DecodeGraph:
    """One captured decode step for up to ``size`` rows (one query each).

    ``body(ids, batch, inputs)`` is the captured computation (the trunk's forward, or an MTP
    draft layer's); ``inputs`` declares extra static input buffers ``name: (shape, dtype)``
    that ``replay`` fills. ``context_bound``: every position it is replayed at is below this
    (``ForwardBatch.context_bound``; the runner keys the graphs by it).
    """

    def __init__(self, runner: ModelRunner, size: int, body, inputs: dict | None = None,
                 context_bound: int | None = None):
        dev, s = runner.device, runner.page_size
        self.runner, self.size = runner, size
        self.ids = torch.zeros(size, dtype=torch.long, device=dev)
        self.positions = torch.zeros(size, dtype=torch.long, device=dev)
        self.slots = torch.full((size,), runner.dummy_page * s, dtype=torch.long, device=dev)
        self.table = torch.full((size, runner.max_pages), -1, dtype=torch.int32, device=dev)
        self.table[:, 0] = runner.dummy_page
        self.kv_lens = torch.ones(size, dtype=torch.int32, device=dev)
        dummy_slot = runner.cache.dummy_slot
        self.seq_slots = torch.full((size,), dummy_slot, dtype=torch.long, device=dev)
        self.ring_slots = self.ring_table = None
        if runner.cache.ring_pages:
            self.ring_slots = torch.tensor([runner.cache.ring_slot(dummy_slot, 0)] * size, dtype=torch.long,
                                           device=dev)
            self.ring_table = runner._ring_table([dummy_slot] * size, runner.max_pages).to(dev)
        self.batch = ForwardBatch(positions=self.positions, slot_mapping=self.slots, page_table=self.table,
                                  kv_lens_t=self.kv_lens, seq_slots=self.seq_slots,
                                  cu_q=list(range(size + 1)), kv_lens=[1] * size, cache=runner.cache, is_decode=True,
                                  ring_slot_mapping=self.ring_slots, ring_page_table=self.ring_table,
                                  context_bound=context_bound)
        self.inputs = {name: torch.zeros(shape, dtype=dtype, device=dev) for name, (shape, dtype) in
                       (inputs or {}).items()}
        with assume_capture():  # compile and load every kernel the graph will use before capturing
            for _ in range(2):
                self.out = body(self.ids, self.batch, self.inputs)
        torch.cuda.synchronize(dev)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner.graph_pool):
            self.out = body(self.ids, self.batch, self.inputs)

    def replay(self, rows: list[tuple[SequenceCache, int, int]], **inputs):
        """Run the captured step for ``(sequence, position, token)`` rows; returns the output buffers."""
        r, s, n = self.runner, self.runner.page_size, len(rows)
        pad = self.size - n  # padding rows must point at the dummy page again: a row left over from a
        dummy = r.dummy_page  # bigger earlier step would write into a page that is no longer its own
        self.ids.copy_(torch.tensor([tok for _, _, tok in rows] + [0] * pad, dtype=torch.long))
        pos = [p for _, p, _ in rows]
        bound = self.batch.context_bound
        if bound is not None and max(pos) >= bound:  # the captured layers may have left out work beyond it
            raise RuntimeError(f"decode graph captured for positions below {bound}, replayed at {max(pos)}")
        self.positions.copy_(torch.tensor(pos + [0] * pad, dtype=torch.long))
        slots = [seq.page_ids[p // s] * s + p % s for seq, p, _ in rows]
        self.slots.copy_(torch.tensor(slots + [dummy * s] * pad, dtype=torch.long))
        full_table = torch.full((self.size, r.max_pages), -1, dtype=torch.int32)
        for b, (seq, _, _) in enumerate(rows):
            full_table[b, :len(seq.page_ids)] = torch.tensor(seq.page_ids, dtype=torch.int32)
        full_table[n:, 0] = dummy
        self.table.copy_(full_table)
        self.kv_lens.copy_(torch.tensor([p + 1 for p in pos] + [1] * pad, dtype=torch.int32))
        seq_slots = [seq.slot for seq, _, _ in rows] + [r.cache.dummy_slot] * pad
        self.seq_slots.copy_(torch.tensor(seq_slots, dtype=torch.long))
        if self.ring_slots is not None:
            ring = [r.cache.ring_slot(slot, p) for slot, p in zip(seq_slots, pos + [0] * pad)]
            self.ring_slots.copy_(torch.tensor(ring, dtype=torch.long))
            self.ring_table.copy_(r._ring_table(seq_slots, r.max_pages))
        for name, value in inputs.items():
            self.inputs[name][: value.shape[0]].copy_(value)
        self.graph.replay()
        return self.out
