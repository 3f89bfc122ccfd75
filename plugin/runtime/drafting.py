"""Drafters for speculative decoding: n-gram lookup, a separate draft model, the checkpoint's MTP layers.

How a step goes (``Generator`` drives it):

1. ``propose(job, k)``: up to ``k`` draft tokens to follow ``job.tokens``.
2. The target model runs ``[last token] + drafts`` for the job in one forward pass;
   ``sampling.verify_drafts`` keeps the longest acceptable prefix plus one token of the
   target's own, and the job's cache forgets the positions of rejected drafts (all decode
   state is indexed by position, so that is just lowering ``num_tokens``).
3. ``observe(updates)``, for drafters that set ``observes``: the drafter learns what was
   verified (the MTP drafter runs its layers over the new positions here, which also yields
   the next step's drafts; the block drafter drafts its next blocks). ``Drafter`` describes
   the update rows and ``needs_hidden``.

Every drafter drafts deterministically (lookup, greedy draft model, greedy MTP), which keeps
verification exact for sampled output too (see ``verify_drafts``).
"""

from __future__ import annotations

import torch

from ..arch.cache_spec import fitting_page_size
from ..errors import InvalidArgumentError
from .cache import PagedCache, SequenceCache
from .drafting_options import check_rollback
from .runner import ModelRunner, StepItem


class Drafter:
    """What the generator asks of a drafter. Two class attributes say what it needs after each step:

    * ``observes``: call ``observe(updates)`` after every target step, with one ``(job, first, hidden)``
      per job still running: the step verified its positions ``first, first + 1, ...`` up to the job's
      cached length.
    * ``needs_hidden`` (only with ``observes``): ``hidden`` holds the trunk's hidden rows of those
      positions ``[n, ...]``, and the generator asks the runner to return them; otherwise ``hidden`` is
      None and the step returns no hidden rows (returning them costs a copy of every fed row).
    """

    observes = False
    needs_hidden = False

    def propose(self, job, k: int) -> list[int]:
        raise NotImplementedError

    def observe(self, updates: list[tuple[object, int, torch.Tensor | None]]) -> None:
        pass

    def release(self, job) -> None:
        pass


class NgramDrafter(Drafter):
    """Drafts by lookup: find the most recent earlier occurrence of the last n tokens (longest n
    first, from ``ngram_max`` down to ``ngram_min``) and propose the tokens that followed it."""

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, job, k: int) -> list[int]:
        tokens = job.tokens
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            suffix = tokens[-n:]
            for i in range(len(tokens) - n - 1, -1, -1):  # most recent earlier match first
                if tokens[i:i + n] == suffix:
                    return tokens[i + n:i + n + k]
        return []


class DraftModelDrafter(Drafter):
    """Drafts with a separate, smaller model of the same vocabulary, run greedily in its own cache.

    Each job has a sequence in the draft model's cache holding the tokens fed so far; before
    drafting, the cache forgets everything after the part that still agrees with the job's
    verified tokens and catches up on the rest.
    """

    def __init__(self, draft_model, target_vocab: int, *, max_batch_size: int, max_seq_len: int,
                 max_draft: int, page_size: int, chunk_size: int):
        net = draft_model.network
        if net.vocab_size != target_vocab:
            raise InvalidArgumentError(
                f"the draft model's vocabulary ({net.vocab_size} tokens) differs from the target's ({target_vocab}); "
                "a draft model must share the target's tokenizer")
        self.model, self.network, self.chunk_size = draft_model, net, chunk_size
        specs = net.cache_spec()
        check_rollback(specs, max_draft, f"the draft model ({type(net).__name__})")
        page_size = fitting_page_size(specs, page_size)  # the target's, grown where the draft's cache needs more
        pages_per_seq = -(-(max_seq_len + max_draft + 1) // page_size)
        graphs = net.options.device.type == "cuda"  # one more page: where graph padding rows write
        self.cache = PagedCache(specs, num_pages=max_batch_size * pages_per_seq + graphs, page_size=page_size,
                                max_seqs=max_batch_size, ring_margin=max_draft + 1)
        self.runner = ModelRunner(net, self.cache, max_pages_per_seq=pages_per_seq, use_cuda_graphs=graphs)
        self.seqs: dict[int, tuple[SequenceCache, list[int]]] = {}  # job id -> (sequence, tokens it holds)

    def _sync(self, job) -> tuple[SequenceCache, list[int]]:
        """The job's draft sequence, cut back to the part that agrees with the job's tokens."""
        seq, fed = self.seqs.get(job.id) or (self.cache.new_sequence(), [])
        same = 0
        for a, b in zip(fed, job.tokens):
            if a != b:
                break
            same += 1
        seq.num_tokens = min(seq.num_tokens, same)
        del fed[seq.num_tokens:]
        self.seqs[job.id] = (seq, fed)
        return seq, fed

    def _feed(self, seq: SequenceCache, fed: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens`` (in chunks) and return the logits of the last one."""
        logits = None
        for i in range(0, len(tokens), self.chunk_size):
            chunk = tokens[i:i + self.chunk_size]
            self.cache.reserve(seq, seq.num_tokens + len(chunk))
            logits = self.runner.run([StepItem(seq, chunk, want_logits=True)])
            fed += chunk
        return logits[0]

    @torch.inference_mode()
    def propose(self, job, k: int) -> list[int]:
        seq, fed = self._sync(job)
        drafts: list[int] = []
        pending = job.tokens[seq.num_tokens:]
        for _ in range(k):
            token = int(torch.argmax(self._feed(seq, fed, pending)))
            drafts.append(token)
            pending = [token]
        return drafts

    def release(self, job) -> None:
        entry = self.seqs.pop(job.id, None)
        if entry is not None:
            self.cache.release(entry[0])


class MtpDrafter(Drafter):
    """Drafts with the checkpoint's MTP layers (``CausalLM.mtp_forward``), greedily.

    Depth d at position p reads the previous depth's hidden state at p (depth 1: the trunk's)
    and the token at p + d, writes its own cache entry at p and predicts the token at p + d + 1.
    After every target step the drafter runs each depth over the positions it has not yet
    settled: an entry is settled once all its inputs are verified tokens; one computed from a
    draft token is redone next step, with the verified token, before it is relied on. The rows
    at the last cached position, chained through the depths, give the next drafts.
    """

    observes = needs_hidden = True  # depth 1 reads the trunk's hidden rows

    def __init__(self, network, runner: ModelRunner):
        self.network, self.runner, self.depth = network, runner, network.mtp_depth
        # job id -> per depth d (index d - 1): {position: (input hidden, whether that input is settled)}
        self.pending: dict[int, list[dict[int, tuple[torch.Tensor, bool]]]] = {}
        self.drafts: dict[int, list[int]] = {}

    def propose(self, job, k: int) -> list[int]:
        return self.drafts.get(job.id, [])[:k]

    def release(self, job) -> None:
        self.pending.pop(job.id, None)
        self.drafts.pop(job.id, None)

    @torch.inference_mode()
    def observe(self, updates: list[tuple[object, int, torch.Tensor]]) -> None:
        """``updates``: per running job, the trunk hidden rows this step verified, for positions
        ``first, first + 1, ...`` (``(job, first, hidden [n, ...])``)."""
        jobs = []
        for job, first, hidden in updates:
            pending = self.pending.setdefault(job.id, [{} for _ in range(self.depth)])
            for i in range(hidden.shape[0]):
                pending[0][first + i] = (hidden[i], True)
            jobs.append(job)
            self.drafts[job.id] = []
        for d in range(1, self.depth + 1):
            rows, inputs, work, logit_rows, wanted = [], [], [], [], []
            for job in jobs:
                known, drafts = job.tokens, self.drafts[job.id]
                todo = sorted(p for p in self.pending[job.id][d - 1] if p + d < len(known) + len(drafts))
                if not todo:
                    continue
                assert todo == list(range(todo[0], todo[-1] + 1)), "MTP positions must be contiguous"
                first = len(rows)
                rows += [(job.cache, p, known[p + d] if p + d < len(known) else drafts[p + d - len(known)])
                         for p in todo]
                inputs += [self.pending[job.id][d - 1][p][0] for p in todo]
                work.append((job, todo, first))
                if todo[-1] == job.cache.num_tokens - 1:  # the last cached position: its row drafts
                    logit_rows.append(len(rows) - 1)
                    wanted.append(job)
            if not rows:
                break
            logits, out = self.runner.run_mtp(d, rows, torch.stack(inputs), logit_rows)
            for job, token in zip(wanted, logits.argmax(-1).tolist()):
                self.drafts[job.id].append(int(token))
            for job, todo, first in work:
                here, known = self.pending[job.id][d - 1], len(job.tokens)
                for i, p in enumerate(todo):
                    settled = here[p][1] and p + d < known
                    if d < self.depth:
                        self.pending[job.id][d][p] = (out[first + i], settled)
                    if settled:
                        del here[p]


class BlockDrafter(Drafter):
    """Drafts with a block drafter (DeepSeek-V4 DSpark, ``CausalLM.draft_block``): after every step,
    one drafter forward for all jobs that are ready to decode, each seeded with its last sampled
    token at its cached length.

    The drafter's state (main-kv rows per position) is written by the trunk's own forward for every
    row it runs, so this class holds no per-sequence state but the next drafts: rolling back is the
    cache forgetting positions, and the drafts after a partial acceptance are those of a fresh run
    over the verified tokens. Each job proposes the prefix of its block whose confidence reaches
    ``confidence_threshold``.
    """

    observes = True  # drafts the next blocks after each step; the trunk's forward already wrote the
    # drafter's state (main-kv rows), so it needs no hidden rows (``needs_hidden`` stays False)

    def __init__(self, network, cache: PagedCache, confidence_threshold: float):
        self.network, self.cache, self.threshold = network, cache, confidence_threshold
        self.drafts: dict[int, list[int]] = {}

    def propose(self, job, k: int) -> list[int]:
        return self.drafts.get(job.id, [])[:k]

    def release(self, job) -> None:
        self.drafts.pop(job.id, None)

    @torch.inference_mode()
    def observe(self, updates: list[tuple[object, int, torch.Tensor | None]]) -> None:
        ready = []
        for job, _, _ in updates:
            self.drafts.pop(job.id, None)
            if len(job.tokens) - job.cache.num_tokens == 1 and job.draft_length:  # decoding, its last token the seed
                ready.append(job)
        if not ready:
            return
        draft = self.network.draft_block(
            torch.tensor([job.tokens[-1] for job in ready]), torch.tensor([job.cache.num_tokens for job in ready]),
            torch.tensor([self.cache.ring_slot(job.cache.slot, 0) for job in ready]), self.cache)
        for job, tokens, n in zip(ready, draft.tokens.tolist(), draft.lengths(self.threshold)):
            self.drafts[job.id] = tokens[:n]


def teacher_forced_acceptance(model, ids: list[int], *, page_size: int | None = None) -> list[float]:
    """For each MTP depth d: how often its greedy draft, fed the true text, equals the target's own
    greedy prediction for that position (the published per-depth acceptance method). A block drafter
    (DeepSeek-V4 DSpark): ``teacher_forced_block_acceptance``. ``page_size``: default 16, or the
    smallest the model's cache accepts where that is larger (DeepSeek-V4: 128)."""
    net = model.network
    page_size = page_size or fitting_page_size(net.cache_spec(), 16)
    if net.block_drafter is not None:
        return teacher_forced_block_acceptance(model, ids, page_size=page_size)
    if net.mtp_depth == 0:
        raise InvalidArgumentError(f"{type(net).__name__} has no MTP draft layers")
    n = len(ids)
    if n < net.mtp_depth + 2:
        raise InvalidArgumentError(f"the text has {n} tokens; need at least {net.mtp_depth + 2}")
    cache = PagedCache(net.cache_spec(), num_pages=-(-n // page_size), page_size=page_size, max_seqs=1)
    runner = ModelRunner(net, cache, max_pages_per_seq=-(-n // page_size), use_cuda_graphs=False)
    seq = cache.new_sequence()
    cache.reserve(seq, n)
    with torch.inference_mode():
        logits, hidden = runner.run([StepItem(seq, list(ids), want_logits=True, num_logits=n)],
                                       return_hidden=True)
        target = logits.argmax(-1)  # target[p]: the target's prediction for position p + 1
        rates = []
        for d in range(1, net.mtp_depth + 1):
            count = n - d  # positions p with a true token at p + d
            _, batch = runner.layout([(seq, 0, list(ids[d:]))])
            ids_t = torch.tensor(ids[d:], dtype=torch.long, device=hidden.device)
            m_logits, hidden = net.mtp_forward(d, hidden[:count], ids_t, batch, None)
            # depth d at p predicts position p + d + 1; the target predicts it from row p + d
            valid = count - 1
            hits = (m_logits[:valid].argmax(-1) == target[d:d + valid]).float()
            rates.append(float(hits.mean()) if valid > 0 else 0.0)
    return rates


def teacher_forced_block_acceptance(model, ids: list[int], *, page_size: int = 128) -> list[float]:
    """For a block drafter: at every position ``p`` the prefix ``ids[:p]`` is cached and the true token
    ``ids[p]`` seeds the block; draft ``d`` proposes position ``p + d``. Per draft position ``d``: of the
    blocks whose drafts ``1 .. d-1`` all equal the target's greedy predictions, the share whose draft ``d``
    does too (what greedy verification would accept; the confidence gate is not applied)."""
    net = model.network
    size = net.block_drafter.block_size
    n = len(ids)
    if n < size + 1:
        raise InvalidArgumentError(f"the text has {n} tokens; need at least {size + 1}")
    pages = -(-n // page_size)
    cache = PagedCache(net.cache_spec(), num_pages=pages, page_size=page_size, max_seqs=1)
    runner = ModelRunner(net, cache, max_pages_per_seq=pages, use_cuda_graphs=False)
    seq = cache.new_sequence()
    cache.reserve(seq, n)
    base = torch.tensor([cache.ring_slot(seq.slot, 0)])
    predicted, drafts = [], []  # predicted[q]: the target's greedy token for q + 1; drafts[p]: the block at p
    with torch.inference_mode():
        for p in range(n):
            if p + size <= n:
                block = net.draft_block(torch.tensor([ids[p]]), torch.tensor([p]), base, cache)
                drafts.append(block.tokens[0].tolist())
            predicted.append(int(runner.run([StepItem(seq, [ids[p]], want_logits=True)])[0].argmax()))
    proposed, accepted = [0] * size, [0] * size
    for p, block in enumerate(drafts):
        for d in range(size):
            proposed[d] += 1
            if block[d] != predicted[p + d]:
                break
            accepted[d] += 1
    return [a / c if c else 0.0 for a, c in zip(accepted, proposed)]
