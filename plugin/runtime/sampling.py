"""Sampling settings and the sampler (``verify_drafts``: one token, or a verified draft plus one).

Order of operations for one row (the usual one, as in transformers/vLLM):
penalties and biases on the raw logits -> banned tokens -> temperature ->
top-k -> top-p -> min-p -> softmax -> draw with the job's own generator.
``temperature == 0`` is greedy (argmax after penalties and bans).

* repetition_penalty (transformers semantics): logits of tokens that occur in
  the prompt or output are divided by it when positive, multiplied when negative.
* presence / frequency penalty (OpenAI semantics): over generated tokens,
  ``logit -= presence * [count > 0] + frequency * count``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    banned_tokens: tuple[int, ...] = ()
    seed: int | None = None

    def validate(self, vocab_size: int) -> None:
        def bad(name, value, rule):
            raise InvalidArgumentError(f"sampling option {name}={value!r} is invalid: {rule}")

        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            bad("temperature", self.temperature, "must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            bad("top_k", self.top_k, "must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            bad("min_p", self.min_p, "must be in [0, 1)")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1 = off)")
        for tid in list(self.logit_bias) + list(self.banned_tokens):
            if not (isinstance(tid, int) and 0 <= tid < vocab_size):
                bad("logit_bias/banned_tokens", tid, f"token ids must be in [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RowState:
    """What the sampler needs to know about one job for this step."""

    params: SamplingParams
    history: list[int]  # prompt + generated token ids
    num_prompt: int
    generator: torch.Generator | None
    suppress: tuple[int, ...] = ()  # e.g. stop tokens before min_new_tokens
    min_new: int = 0  # apply ``suppress`` only while fewer tokens than this were generated


def apply_penalties(logits: torch.Tensor, row: RowState) -> torch.Tensor:
    p = row.params
    if p.repetition_penalty != 1.0 and row.history:
        ids = torch.tensor(sorted(set(row.history)), device=logits.device)
        vals = logits[ids]
        logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    generated = row.history[row.num_prompt:]
    if (p.presence_penalty or p.frequency_penalty) and generated:
        ids, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=logits.dtype)
    banned = tuple(p.banned_tokens) + tuple(row.suppress)
    if banned:
        logits[torch.tensor(banned, device=logits.device)] = float("-inf")
    return logits


def filtered_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p (one row)."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest set whose mass reaches top_p (the token that crosses it stays)
        drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= p.top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def _logprob_info(raw: torch.Tensor, token: int, want: bool, top: int):
    """The token's log-probability under the raw logits and the ``top`` best alternatives, where asked."""
    if not (want or top):
        return None, None
    lp = torch.log_softmax(raw, dim=-1)
    alternatives = None
    if top:
        vals, ids = torch.topk(lp, top)
        alternatives = list(zip(ids.tolist(), vals.tolist()))
    return (float(lp[token]) if want else None), alternatives


def verify_drafts(logits: torch.Tensor, drafts: list[int], row: RowState, *, want_logprobs: bool,
                  top_logprobs: int) -> tuple[list[int], int, list[float | None], list[list[tuple[int, float]] | None]]:
    """Check drafted tokens against the target model's logits ``[len(drafts) + 1, V]`` (row i
    predicts the token after draft i - 1; row 0 the token after the last verified one).

    Every drafter here proposes deterministically (n-gram, greedy draft model, greedy MTP), so
    the draft distribution is a point mass on the drafted token. Speculative sampling then
    reduces to: accept draft ``x`` with probability ``p(x)``; on rejection, draw from ``p`` with
    ``x`` removed (the normalised residual ``max(p - q, 0)``); after all drafts are accepted draw
    one more token from the last row. The emitted tokens are distributed exactly as if sampled
    one at a time from the target. Greedy: accept while the draft is the argmax. Without drafts
    (one logits row) this is plain sampling of the next token.

    Returns the emitted tokens (accepted drafts, then one token of the target's own), how many
    drafts were accepted, and log-probabilities / top alternatives per emitted token where asked.
    """
    emitted: list[int] = []
    accepted = 0
    history = list(row.history)
    for i in range(len(drafts) + 1):
        suppress = row.suppress if len(history) - row.num_prompt < row.min_new else ()
        state = RowState(row.params, history, row.num_prompt, row.generator, suppress)
        processed = apply_penalties(logits[i].clone(), state)
        draft = drafts[i] if i < len(drafts) else None
        if row.params.greedy:
            token = int(torch.argmax(processed))
        else:
            probs = filtered_distribution(processed, row.params)
            if draft is not None and float(torch.rand((), generator=row.generator, device=probs.device)) \
                    < float(probs[draft]):
                token = draft
            else:
                if draft is not None:
                    probs[draft] = 0.0
                    probs = probs / probs.sum()
                token = int(torch.multinomial(probs, 1, generator=row.generator))
        emitted.append(token)
        history.append(token)
        if token != draft:
            break
        accepted += 1
    info = [_logprob_info(logits[i], token, want_logprobs, top_logprobs) for i, token in enumerate(emitted)]
    return emitted, accepted, [lp for lp, _ in info], [top for _, top in info]
