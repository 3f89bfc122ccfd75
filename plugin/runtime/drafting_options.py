"""Speculative decoding options and statistics, shared by the generator and the front ends.

``DraftOptions`` is what a user picks (CLI flags, the Gradio panel, TabbyAPI's
``draft_model`` block, the webui's extension tab all map onto it):

* ``mode``: ``"mtp"`` (the checkpoint's own MTP draft layers), ``"model"`` (a
  separate, smaller draft model with the same tokenizer, from ``model_dir``),
  ``"ngram"`` (copy continuations of the last tokens from the prompt and output;
  no extra weights) or ``"disabled"``.
* ``num_tokens``: draft length per step (1-3 for MTP heads: one per layer the
  checkpoint ships; up to ``MAX_DRAFT_TOKENS`` otherwise).
* ``dynamic``: let each job shorten or lengthen its draft from its measured
  acceptance (never beyond ``num_tokens``).
* ``confidence_threshold``: mode ``"mtp"`` with a block drafter (DeepSeek-V4
  DSpark): propose only the drafts whose positions' confidence head reaches it
  (ExLlamaV3 reads the same gate from ``EXL3_DSPARK_CONF``, default 0.3); 0 keeps
  every draft. None (unset) means that default. Setting it where no drafter reads it
  (another mode, or MTP layers that are not a block drafter) is an error, not a
  silently ignored option.

``DraftStats`` counts, per job and for the whole generator, how many drafted
tokens were proposed and accepted at each depth, and how many tokens each
verification step produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgumentError

DRAFT_MODES = ("disabled", "mtp", "model", "ngram")
MAX_DRAFT_TOKENS = 8
DSPARK_CONFIDENCE_THRESHOLD = 0.3  # ExLlamaV3's default for EXL3_DSPARK_CONF (architecture/deepseek_v4_mtp.py)


@dataclass(frozen=True)
class DraftOptions:
    mode: str = "disabled"
    num_tokens: int = 3
    dynamic: bool = False
    model_dir: str | Path | None = None  # mode "model": the draft model's directory
    ngram_max: int = 4  # mode "ngram": longest suffix looked up
    ngram_min: int = 1  # and the shortest
    confidence_threshold: float | None = None  # block drafters: the confidence gate (None: the default)

    def __post_init__(self):
        if self.mode not in DRAFT_MODES:
            raise InvalidArgumentError(f"draft mode {self.mode!r} is not one of {', '.join(DRAFT_MODES)}")
        if not isinstance(self.num_tokens, int) or not 1 <= self.num_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidArgumentError(
                f"draft num_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {self.num_tokens!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise InvalidArgumentError(f"ngram_min={self.ngram_min} and ngram_max={self.ngram_max}: "
                                       "need 1 <= ngram_min <= ngram_max")
        gate = self.confidence_threshold
        if gate is not None:
            if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 <= gate <= 1:
                raise InvalidArgumentError(f"draft confidence_threshold must be a number from 0 to 1, got {gate!r}")
            check_confidence_mode("draft confidence_threshold", gate, self.mode)

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    @property
    def block_confidence(self) -> float:
        """The confidence gate a block drafter applies: the one set, else ExLlamaV3's default."""
        return DSPARK_CONFIDENCE_THRESHOLD if self.confidence_threshold is None else self.confidence_threshold


def check_confidence_mode(option: str, value, mode: str) -> None:
    """Refuse a confidence gate (``option``, as the user spelled it) in a draft mode that has none,
    rather than ignoring it: only mode "mtp" drafts with a block drafter."""
    if value is not None and mode != "mtp":
        raise InvalidArgumentError(f"{option}={value!r} has no effect with draft mode {mode!r}: only mode 'mtp' "
                                   "with a block drafter (DeepSeek-V4 DSpark) has a confidence gate")


def check_rollback(specs, num_tokens: int, model_name: str) -> None:
    """Refuse drafting ``num_tokens`` ahead for a model whose decode state (``LayerCacheSpec``s)
    cannot forget rejected positions: plain per-sequence slots, or position rings too short."""
    for spec in specs:
        for t in spec.slots:
            if not t.position_ring:
                raise InvalidArgumentError(
                    f"{model_name} keeps per-sequence state ({t.name}) that cannot be rolled back after "
                    "rejected drafts; speculative decoding is not available for it")
            if t.shape[0] - t.position_ring < num_tokens + 1:
                raise InvalidArgumentError(
                    f"draft num_tokens={num_tokens}: {model_name}'s {t.name} state keeps {t.shape[0]} positions, "
                    f"enough for drafts of up to {t.shape[0] - t.position_ring - 1}")


@dataclass
class DraftStats:
    """Acceptance counts. ``proposed[d]`` / ``accepted[d]``: drafted tokens at depth d+1."""

    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    steps: int = 0  # verification steps
    tokens: int = 0  # tokens those steps produced (accepted drafts + one sampled by the target)

    def record(self, num_drafted: int, num_accepted: int) -> None:
        while len(self.proposed) < num_drafted:
            self.proposed.append(0)
            self.accepted.append(0)
        for d in range(num_drafted):
            self.proposed[d] += 1
            self.accepted[d] += d < num_accepted
        self.steps += 1
        self.tokens += num_accepted + 1

    @property
    def acceptance_per_depth(self) -> list[float]:
        """Of the drafts made at depth d, the share accepted (depth d is only tried if d-1 was drafted)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def mean_tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def total_accepted(self) -> int:
        return sum(self.accepted)

    @property
    def total_rejected(self) -> int:
        return sum(self.proposed) - sum(self.accepted)

    def as_dict(self) -> dict:
        return {"acceptance_per_depth": self.acceptance_per_depth, "mean_tokens_per_step": self.mean_tokens_per_step,
                "proposed": list(self.proposed), "accepted": list(self.accepted), "steps": self.steps,
                "draft_accept": self.total_accepted, "draft_reject": self.total_rejected}
