"""``Generator``: continuous batching over a loaded model.

Each ``step()``:

1. finishes jobs whose cancellation was requested;
2. admits waiting jobs (first come, first served) while there is a free batch
   slot and room in the cache for their first prompt chunk, attaching shared
   prefix pages where another job already computed the same prompt start;
3. plans the step: every decoding job feeds its last token, and prefilling jobs
   feed prompt chunks until ``chunk_size`` tokens are planned; pages are
   reserved, and if they run out the most recently admitted job is sent back
   to the queue (it will recompute its tokens later) -- a job that cannot fit
   even alone fails with a clear message;
4. runs the model once over all planned tokens (``ModelRunner``);
5. samples a token for every job whose pending tokens are now all cached,
   streams its text, applies the stop conditions and emits ``JobEvent``s.

With speculative decoding (``draft=DraftOptions(...)``), a decoding job feeds its
last token plus up to ``num_tokens`` drafted ones; step 5 then verifies the
drafts (``sampling.verify_drafts``), emits every accepted token and the target's
own next one, and the job's cache forgets the positions of rejected drafts.
See ``drafting.py`` for the drafters.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterator

import torch

from ..arch.cache_spec import fitting_page_size
from ..errors import InvalidArgumentError
from .cache import OutOfPagesError, PagedCache
from .drafting_options import DraftOptions, DraftStats, check_rollback
from .job import Job, JobEvent, JobStatus
from .runner import ModelRunner, StepItem
from .sampling import RowState, verify_drafts
from .text import IncrementalDecoder


class Generator:
    def __init__(
        self,
        model,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        cache_tokens: int | None = None,
        page_size: int | None = None,
        chunk_size: int = 512,
        use_cuda_graphs: bool = True,
        prefix_sharing: bool = True,
        draft: DraftOptions | None = None,
        draft_model=None,
    ):
        """``model``: an ``exl3_triton.Model``.

        max_seq_len: longest prompt + output (default: the config's
        ``max_position_embeddings``, capped at 8192). cache_tokens: tokens the
        paged cache holds in all (default: ``max_batch_size * max_seq_len`` on
        CPU; on CUDA as much as fits in 90% of free memory, capped at that).
        page_size: tokens per cache page (default: 256 on CUDA, 16 on CPU, or the smallest
        size the model's cache accepts where that is larger). draft: speculative
        decoding (``DraftOptions``; off by default). draft_model: an
        already loaded ``Model`` to draft with in mode "model" (instead of loading
        ``draft.model_dir``).
        """
        if max_batch_size < 1:
            raise InvalidArgumentError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if chunk_size < 1:
            raise InvalidArgumentError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.network = model.network
        self.tokenizer = model.tokenizer
        self.device = model.options.device
        self.max_batch_size = max_batch_size
        self.chunk_size = chunk_size
        config_len = getattr(self.network.config, "max_position_embeddings", None) or \
            model.checkpoint.config.get("max_position_embeddings") or 8192
        self.max_seq_len = int(max_seq_len or min(int(config_len), 8192))
        if self.max_seq_len < 2:
            raise InvalidArgumentError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        specs = self.network.cache_spec()
        # unset: the device's usual size, grown where the model's cache needs bigger pages (DeepSeek-V4: 128);
        # a size given explicitly is used as given (PagedCache names the tensor it does not fit)
        page_size = page_size or fitting_page_size(specs, 256 if self.device.type == "cuda" else 16)
        self.draft_options = draft or DraftOptions()
        self._check_draft_options(specs)
        # a verification step writes its drafts before knowing whether they stay: rings keep room for them
        self.ring_margin = self.draft_options.num_tokens + 1 if self.draft_options.enabled else 0
        num_pages = self._cache_pages(specs, page_size, cache_tokens)
        graphs = use_cuda_graphs and self.device.type == "cuda"
        # captured decode steps need one extra page for their padding rows
        self.cache = PagedCache(specs, num_pages=num_pages + graphs, page_size=page_size, max_seqs=max_batch_size,
                                ring_margin=self.ring_margin)
        # models with per-sequence state outside the pages (rings, slots) cannot share prefix pages
        self.prefix_sharing = prefix_sharing and self.cache.shares_prefixes
        self.runner = ModelRunner(self.network, self.cache, max_pages_per_seq=-(-self.max_seq_len // page_size),
                                  use_cuda_graphs=graphs)
        self.capacity_tokens = num_pages * page_size
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.draft_stats = DraftStats()  # over every job this generator ran
        self.drafter = self._make_drafter(page_size, draft_model)

    def _check_draft_options(self, specs) -> None:
        opts = self.draft_options
        if not opts.enabled:
            return
        check_rollback(specs, opts.num_tokens, type(self.network).__name__)
        if opts.mode == "mtp":
            block = self.network.block_drafter
            if block is not None:  # one forward drafts a block (DeepSeek-V4 DSpark)
                if opts.num_tokens > block.block_size:
                    raise InvalidArgumentError(f"draft num_tokens={opts.num_tokens}: this model's block drafter "
                                               f"drafts at most {block.block_size} tokens (dspark_block_size)")
                return
            depth = self.network.mtp_depth
            if depth == 0:
                raise InvalidArgumentError(
                    f"draft mode 'mtp': this model ({type(self.network).__name__}) has no MTP draft layers; "
                    "use draft mode 'ngram' or 'model'")
            if opts.num_tokens > depth:
                raise InvalidArgumentError(f"draft num_tokens={opts.num_tokens}: this model has {depth} MTP layers, "
                                           f"so it drafts at most {depth} tokens")
            if opts.confidence_threshold is not None:  # would be ignored: MTP layers propose every draft
                raise InvalidArgumentError(
                    f"draft confidence_threshold={opts.confidence_threshold!r} (--draft-confidence, TabbyAPI's "
                    f"draft_model.draft_confidence): this model ({type(self.network).__name__}) drafts with its "
                    f"{depth} MTP layers, which have no confidence gate; only a block drafter (DeepSeek-V4 DSpark) "
                    "has one. Leave it unset")

    def _make_drafter(self, page_size: int, draft_model):
        from .drafting import BlockDrafter, DraftModelDrafter, MtpDrafter, NgramDrafter

        opts = self.draft_options
        if opts.mode == "ngram":
            return NgramDrafter(opts.ngram_min, opts.ngram_max)
        if opts.mode == "mtp" and self.network.block_drafter is not None:
            return BlockDrafter(self.network, self.cache, opts.block_confidence)
        if opts.mode == "mtp":
            return MtpDrafter(self.network, self.runner)
        if opts.mode == "model":
            from ..model import load

            if draft_model is None:
                if not opts.model_dir:
                    raise InvalidArgumentError("draft mode 'model' needs a draft model: set DraftOptions.model_dir "
                                               "to its directory")
                draft_model = load(opts.model_dir, device=self.device, dtype=self.model.options.dtype)
            return DraftModelDrafter(draft_model, self.network.vocab_size, max_batch_size=self.max_batch_size,
                                     max_seq_len=self.max_seq_len, max_draft=opts.num_tokens, page_size=page_size,
                                     chunk_size=self.chunk_size)
        return None

    def _cache_pages(self, specs, page_size: int, cache_tokens: int | None) -> int:
        if cache_tokens is not None:
            if cache_tokens < 1:
                raise InvalidArgumentError(f"cache_tokens={cache_tokens}: the cache needs room for at least one token")
            return -(-int(cache_tokens) // page_size)
        # every sequence occupies whole pages: size for max_batch_size full-length sequences
        pages = self.max_batch_size * -(-self.max_seq_len // page_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            fixed = PagedCache.fixed_bytes(specs, page_size, self.max_batch_size, self.ring_margin)
            if fixed > 0.9 * free:
                raise InvalidArgumentError(
                    f"the per-sequence state for max_batch_size={self.max_batch_size} needs {fixed / 2**30:.2f} GiB "
                    f"but {free / 2**30:.2f} GiB are free on {self.device}; lower max_batch_size")
            free -= fixed
            per_page = max(1.0, PagedCache.bytes_per_token(specs)) * page_size
            pages = min(pages, int(0.9 * free / per_page))
        if pages < 1:
            raise InvalidArgumentError("not enough free device memory for even one cache page")
        return pages

    # ------------------------------------------------------------- jobs in

    def enqueue(self, job: Job) -> Job:
        """Validate and queue a job. Raises InvalidArgumentError for a request that can never run."""
        if job.status != JobStatus.QUEUED or job.prompt_ids:
            raise InvalidArgumentError("this job was already submitted")
        job.prompt_ids = self._prompt_ids(job)
        vocab = self.network.vocab_size
        n = len(job.prompt_ids)
        if n == 0:
            raise InvalidArgumentError("the prompt is empty")
        if any(not 0 <= t < vocab for t in job.prompt_ids):
            raise InvalidArgumentError(f"prompt token ids must be in [0, {vocab})")
        if n >= self.max_seq_len:
            raise InvalidArgumentError(f"the prompt has {n} tokens; max_seq_len is {self.max_seq_len} "
                                       "(prompt and output together)")
        if job.max_new_tokens < 1 or job.min_new_tokens < 0 or job.min_new_tokens > job.max_new_tokens:
            raise InvalidArgumentError(f"need 0 <= min_new_tokens ({job.min_new_tokens}) <= max_new_tokens "
                                       f"({job.max_new_tokens}) and max_new_tokens >= 1")
        if job.top_logprobs < 0:
            raise InvalidArgumentError(f"top_logprobs must be >= 0, got {job.top_logprobs}")
        job.sampling.validate(vocab)
        if job.draft_tokens is not None:
            cap = self.draft_options.num_tokens if self.draft_options.enabled else 0
            if not isinstance(job.draft_tokens, int) or not 0 <= job.draft_tokens <= cap:
                raise InvalidArgumentError(f"draft_tokens={job.draft_tokens!r}: must be an integer from 0 to {cap} "
                                           "(the generator's draft num_tokens)")
        job.draft_length = job.draft_tokens if job.draft_tokens is not None else (
            self.draft_options.num_tokens if self.draft_options.enabled else 0)
        if n + 1 > self.capacity_tokens:
            raise InvalidArgumentError(f"the prompt needs {n + 1} tokens of cache but the cache holds "
                                       f"{self.capacity_tokens}; raise cache_tokens")
        eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else []
        job.eos_ids = tuple(eos if job.stop_tokens is None else job.stop_tokens)
        if job.sampling.seed is not None or not job.sampling.greedy:
            job.generator = torch.Generator(device=self.device)
            job.generator.manual_seed(job.sampling.seed if job.sampling.seed is not None
                                      else int(torch.randint(0, 2**62, (1,))))
        if self.tokenizer is not None:
            job.decoder = IncrementalDecoder(self.tokenizer.decode, job.prompt_ids)
        job.stats.prompt_tokens = n
        job.stats.time_enqueued = time.perf_counter()
        self.waiting.append(job)
        return job

    def _prompt_ids(self, job: Job) -> list[int]:
        p = job.prompt
        if isinstance(p, str):
            if self.tokenizer is None:
                raise InvalidArgumentError("this model has no tokenizer.json; pass token ids instead of text")
            return self.tokenizer.encode(p, add_bos=job.add_bos)
        if isinstance(p, torch.Tensor):
            if p.dim() != 1 or p.dtype not in (torch.int32, torch.int64):
                raise InvalidArgumentError(f"a token-id prompt must be a 1-D integer tensor, got {p.dtype} "
                                           f"{list(p.shape)}")
            return [int(t) for t in p]
        if isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p)
        raise InvalidArgumentError("the prompt must be text, a list of token ids or a 1-D integer tensor")

    def cancel(self, job: Job) -> None:
        job.cancel()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------- step

    def step(self) -> list[JobEvent]:
        """Run one batched forward pass; returns the events it produced."""
        events: list[JobEvent] = []
        self._finish_cancelled(events)
        self._admit()
        items = self._plan(events)
        if not items:
            return events
        observes = self.drafter is not None and self.drafter.observes
        needs_hidden = observes and self.drafter.needs_hidden  # hidden rows only for a drafter that reads them
        try:
            out = self.runner.run(items, return_hidden=needs_hidden)
        except torch.cuda.OutOfMemoryError as e:  # lose the step's jobs, not the generator
            for job in list(self.running):
                self._finish(job, "error", events, error=f"out of GPU memory: {e}")
            return events
        logits, hidden = out if needs_hidden else (out, None)
        planned = list(zip(self._planned_jobs, items))
        # where each job's fed rows start, read before verification forgets rejected positions
        firsts = {job.id: it.seq.num_tokens - len(it.tokens) for job, it in planned} if observes else None
        self._postprocess([(job, it.num_logits) for job, it in planned if it.want_logits], logits, events)
        self._register_prefixes()
        if observes:
            self._observe_drafts(planned, firsts, hidden)
        return events

    def _observe_drafts(self, planned, firsts, hidden) -> None:
        """Tell the drafter which positions this step verified, with the trunk's hidden rows of them
        if it asked for those (``hidden`` is None otherwise)."""
        updates, row = [], 0
        for job, it in planned:
            first_row, row = row, row + len(it.tokens)  # rows are packed in plan order
            if job.status != JobStatus.RUNNING or job.cache is None:
                continue
            kept = job.cache.num_tokens - firsts[job.id]  # rows whose tokens stayed in the cache
            updates.append((job, firsts[job.id], None if hidden is None else hidden[first_row:first_row + kept]))
        if updates:
            self.drafter.observe(updates)

    def iterate(self) -> Iterator[JobEvent]:
        """Step until every queued job finished, yielding events as they come."""
        while self.has_work:
            yield from self.step()

    def generate(self, prompt, **job_kwargs) -> str:
        """Run one prompt to the end (other queued jobs advance too) and return its text."""
        job = self.enqueue(Job(prompt, **job_kwargs))
        for _ in self.iterate():
            if job.finished:
                break
        if job.finish_reason == "error":
            raise RuntimeError(job.error)
        return job.text

    def stream(self, prompt, **job_kwargs) -> Iterator[str]:
        """Yield one prompt's text as it is generated."""
        job = self.enqueue(Job(prompt, **job_kwargs))
        while not job.finished:
            for ev in self.step():
                if ev.job is job and ev.text:
                    yield ev.text

    # ------------------------------------------------------------- scheduling

    def _finish_cancelled(self, events: list[JobEvent]) -> None:
        for job in [j for j in self.waiting if j.cancel_requested]:
            self.waiting.remove(job)
            self._finish(job, "cancelled", events)
        for job in [j for j in self.running if j.cancel_requested]:
            self._finish(job, "cancelled", events)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size and self.cache.free_slots:
            job = self.waiting[0]
            first_chunk = min(len(job.tokens), self.chunk_size) + 1
            if self.cache.pages_for(first_chunk) > self.cache.num_free_pages and self.running:
                break  # wait for pages; with nothing running the planner reports what does not fit
            self.waiting.popleft()
            job.cache = self.cache.new_sequence()
            if self.prefix_sharing:
                cached = self.cache.match_prefix(job.cache, job.tokens)
                if not job.output_ids:
                    job.stats.cached_prompt_tokens = cached
            job.status = JobStatus.RUNNING
            self.running.append(job)

    def _plan(self, events: list[JobEvent]) -> list[StepItem]:
        """Decide what every running job feeds this step, reserving pages (preempting if they run out)."""
        while True:
            budget = self.chunk_size
            items, jobs = [], []
            decoding = [j for j in self.running if len(j.tokens) - j.cache.num_tokens == 1]
            prefilling = [j for j in self.running if len(j.tokens) - j.cache.num_tokens > 1]
            for job in decoding + prefilling:
                pending = job.tokens[job.cache.num_tokens:]
                if job in decoding:
                    job.drafts = self._drafts_for(job)
                    budget -= 1 + len(job.drafts)
                    items.append(StepItem(job.cache, pending + job.drafts, want_logits=True,
                                          num_logits=1 + len(job.drafts)))
                    jobs.append(job)
                    continue
                n = min(len(pending), budget)
                if n <= 0:
                    continue
                budget -= n
                items.append(StepItem(job.cache, pending[:n], want_logits=(n == len(pending))))
                jobs.append(job)
            failed = self._reserve(items, jobs, events)
            if not failed:
                self._planned_jobs = jobs
                for job in jobs:
                    if job.stats.time_prefill_start is None:
                        job.stats.time_prefill_start = time.perf_counter()
                return items

    def _drafts_for(self, job: Job) -> list[int]:
        """This step's draft for a decoding job, never running past its token or length limits."""
        if self.drafter is None or job.draft_length == 0:
            return []
        room = min(job.max_new_tokens - len(job.output_ids), self.max_seq_len - len(job.tokens)) - 1
        k = min(job.draft_length, room)
        return self.drafter.propose(job, k) if k > 0 else []

    def _reserve(self, items: list[StepItem], jobs: list[Job], events: list[JobEvent]) -> bool:
        """Reserve pages for the plan; on shortage free a job and return True (plan again)."""
        for it, job in zip(items, jobs):
            try:
                self.cache.reserve(it.seq, it.seq.num_tokens + len(it.tokens))
            except OutOfPagesError:
                victim = self.running[-1] if self.running[-1] is not job else None
                if victim is None and len(self.running) > 1:
                    victim = self.running[-2]
                if victim is None:  # alone and still too big
                    need = self.cache.pages_for(it.seq.num_tokens + len(it.tokens)) * self.cache.page_size
                    self._finish(job, "error", events, error=(
                        f"the cache is too small for this job: it needs {need} tokens of cache, the cache holds "
                        f"{self.capacity_tokens}; raise cache_tokens"))
                else:
                    self._preempt(victim)
                return True
        return False

    def _preempt(self, job: Job) -> None:
        """Send a running job back to the front of the queue; it recomputes its cache when readmitted."""
        self.cache.release(job.cache)
        job.cache = None
        job.status = JobStatus.QUEUED
        if self.drafter is not None:
            self.drafter.release(job)
        self.running.remove(job)
        self.waiting.appendleft(job)

    def _register_prefixes(self) -> None:
        if self.prefix_sharing:
            for job in self.running:
                self.cache.register_full_pages(job.cache, job.tokens)

    # ------------------------------------------------------------- results

    def _postprocess(self, planned: list[tuple[Job, int]], logits: torch.Tensor, events: list[JobEvent]) -> None:
        """Sample (or verify drafts for) every job that produced logits; ``planned``: (job, its logit rows)."""
        first = 0
        for job, n in planned:
            drafts = job.drafts if n > 1 else []  # n rows: the last verified token's and one per draft
            row = RowState(job.sampling, job.tokens, len(job.prompt_ids), job.generator, job.eos_ids,
                           min_new=job.min_new_tokens)
            emitted, accepted, logprobs, tops = verify_drafts(
                logits[first:first + n], drafts, row, want_logprobs=job.return_logprobs, top_logprobs=job.top_logprobs)
            first += n
            if drafts:
                job.cache.num_tokens -= len(drafts) - accepted  # forget the rejected drafts' positions
                job.stats.draft.record(len(drafts), accepted)
                self.draft_stats.record(len(drafts), accepted)
                self._adapt_draft_length(job, len(drafts), accepted)
            self._emit(job, emitted, logprobs, tops, events)

    def _adapt_draft_length(self, job: Job, drafted: int, accepted: int) -> None:
        """Dynamic drafting: draft as deep as the measured chance of reaching that depth pays for."""
        if not self.draft_options.dynamic or drafted == 0:
            return
        ema = job.acceptance_ema
        while len(ema) < drafted:
            ema.append(0.8)  # optimistic start: try the full depth first
        for d in range(drafted):
            ema[d] = 0.8 * ema[d] + 0.2 * (d < accepted)
        cap = job.draft_tokens if job.draft_tokens is not None else self.draft_options.num_tokens
        reach, length = 1.0, 0
        for d in range(cap):
            reach *= ema[d] if d < len(ema) else ema[-1]
            if reach < 0.3:  # a verified row costs about as much as the chance of gaining a token
                break
            length = d + 1
        job.draft_length = max(1, length)

    def _emit(self, job: Job, tokens: list[int], logprobs: list, tops: list, events: list[JobEvent]) -> None:
        """Append sampled tokens to a job one by one, streaming text and stopping where a stop condition hits."""
        now = time.perf_counter()
        if job.stats.time_first_token is None:
            job.stats.time_first_token = now
        job.stats.time_last_token = now
        for token, lp, top in zip(tokens, logprobs, tops):
            if token in job.eos_ids:
                self._finish(job, "stop_token", events)
                return
            job.output_ids.append(token)
            job.stats.new_tokens += 1
            text, stop = self._text_for(job, token)
            event = JobEvent(job, text=text, token_ids=[token], logprobs=None if lp is None else [lp],
                             top_logprobs=None if top is None else [top])
            job.text += text
            if stop is not None:
                self._finish(job, "stop_string", events, last=event)
            elif len(job.output_ids) >= job.max_new_tokens:
                self._finish(job, "max_new_tokens", events, last=event)
            elif len(job.tokens) >= self.max_seq_len:
                self._finish(job, "max_seq_len", events, last=event)
            else:
                events.append(event)
                continue
            return

    def _text_for(self, job: Job, token: int) -> tuple[str, str | None]:
        if job.decoder is None:
            return "", None
        return job.stopper.feed(job.decoder.add(token))

    def _finish(self, job: Job, reason: str, events: list[JobEvent], *, last: JobEvent | None = None,
                error: str | None = None) -> None:
        event = last or JobEvent(job)
        if reason != "stop_string" and job.decoder is not None:
            tail, _ = job.stopper.feed(job.decoder.flush())
            tail += job.stopper.flush()
            event.text += tail
            job.text += tail
        event.finished, event.finish_reason, event.stats, event.error = True, reason, job.stats, error
        job.finish_reason, job.error = reason, error
        job.status = JobStatus.FINISHED
        if self.drafter is not None:
            self.drafter.release(job)
        if job.cache is not None:
            self.cache.release(job.cache)
            job.cache = None
        if job in self.running:
            self.running.remove(job)
        events.append(event)
