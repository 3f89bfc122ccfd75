"""A generation request (``Job``), the events it produces, and its timing statistics.

Events (``JobEvent``) come out of ``Generator.step()`` / ``iterate()`` in order:
zero or more with ``finished=False`` carrying new text/tokens, then exactly one
with ``finished=True`` carrying the ``finish_reason`` and ``stats`` (and any last
text). ``finish_reason`` is one of ``"stop_token"``, ``"stop_string"``,
``"max_new_tokens"``, ``"max_seq_len"``, ``"cancelled"`` or ``"error"`` (then
``error`` holds the message).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

import torch

from .drafting_options import DraftStats
from .sampling import SamplingParams
from .text import IncrementalDecoder, StopStringMatcher

_ids = itertools.count()


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class JobStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    cached_prompt_tokens: int = 0  # tokens taken from shared prefix pages
    time_enqueued: float = 0.0
    time_prefill_start: float | None = None
    time_first_token: float | None = None
    time_last_token: float | None = None
    draft: DraftStats = field(default_factory=DraftStats)  # speculative decoding: this job's acceptance

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.time_first_token is None else self.time_first_token - self.time_enqueued

    @property
    def prompt_tokens_per_second(self) -> float | None:
        if self.time_first_token is None or self.time_prefill_start is None:
            return None
        dt = self.time_first_token - self.time_prefill_start
        computed = self.prompt_tokens - self.cached_prompt_tokens
        return computed / dt if dt > 0 else None

    @property
    def new_tokens_per_second(self) -> float | None:
        if self.new_tokens < 2 or self.time_first_token is None or self.time_last_token is None:
            return None
        dt = self.time_last_token - self.time_first_token
        return (self.new_tokens - 1) / dt if dt > 0 else None


@dataclass
class JobEvent:
    job: "Job"
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stats: JobStats | None = None
    error: str | None = None


class Job:
    """One request: a prompt (text or token ids) and how to continue it.

    stop_tokens: None = the tokenizer's end-of-sequence ids. min_new_tokens:
    stop tokens are suppressed until this many tokens were generated.
    draft_tokens: with speculative decoding, this job's draft length (None: the
    generator's ``DraftOptions.num_tokens``; 0: no drafting for this job).
    """

    def __init__(
        self,
        prompt: str | list[int] | torch.Tensor,
        *,
        max_new_tokens: int = 256,
        min_new_tokens: int = 0,
        sampling: SamplingParams | None = None,
        stop_tokens: list[int] | None = None,
        stop_strings: list[str] | tuple[str, ...] = (),
        return_logprobs: bool = False,
        top_logprobs: int = 0,
        add_bos: bool | None = None,
        identifier: object = None,
        draft_tokens: int | None = None,
    ):
        self.id = next(_ids)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.sampling = sampling or SamplingParams()
        self.stop_tokens = stop_tokens
        self.stop_strings = tuple(stop_strings)
        self.return_logprobs = return_logprobs
        self.top_logprobs = top_logprobs
        self.add_bos = add_bos
        self.identifier = identifier
        self.draft_tokens = draft_tokens
        self.draft_length: int = 0  # the current draft length (dynamic drafting adapts it)
        self.drafts: list[int] = []  # drafted tokens fed this step
        self.acceptance_ema: list[float] = []  # per depth, for dynamic drafting
        self.status = JobStatus.QUEUED
        self.stats = JobStats()
        self.cancel_requested = False
        # filled in by the generator
        self.prompt_ids: list[int] = []
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.generator: torch.Generator | None = None
        self.decoder: IncrementalDecoder | None = None
        self.stopper = StopStringMatcher(self.stop_strings)
        self.cache = None  # runtime.cache.SequenceCache while running
        self.eos_ids: tuple[int, ...] = ()

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status == JobStatus.FINISHED

    def cancel(self) -> None:
        """Ask the generator to stop this job; it finishes with reason "cancelled" at the next step."""
        self.cancel_requested = True

    def __repr__(self) -> str:
        return f"Job(id={self.id}, {self.status.value}, {len(self.prompt_ids)}+{len(self.output_ids)} tokens)"


def route_events(events: list[JobEvent], queues: dict) -> None:
    """Put each event on its job's queue (``{job id: queue with put_nowait}``; asyncio or thread
    queues alike) and forget the queue once its job finished. Events of unknown jobs are dropped."""
    for event in events:
        q = queues.get(event.job.id)
        if q is not None:
            q.put_nowait(event)
            if event.finished:
                del queues[event.job.id]
