"""The panel's speculative-decoding controls mapped onto ``DraftOptions``, and the live statistics view."""

from __future__ import annotations

import html
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from ..runtime.drafting_options import MAX_DRAFT_TOKENS, DraftOptions, DraftStats

# Radio labels -> DraftOptions.mode. Both of the checkpoint's own drafters are mode "mtp"; they are told
# apart by name because they differ for the user: a block drafter (DeepSeek-V4 DSpark) drafts a whole
# block in one forward and has a confidence gate, MTP heads draft one token per layer.
MTP_HEADS, BLOCK_DRAFTER = "MTP heads", "block drafter (DSpark)"
DRAFT_SOURCES = {MTP_HEADS: "mtp", BLOCK_DRAFTER: "mtp", "draft model": "model", "n-gram": "ngram"}
MAX_PANEL_DEPTH = 3


@dataclass(frozen=True)
class OwnDrafter:
    """What a loaded checkpoint drafts with itself (draft mode "mtp"): ``source`` is its radio label
    (``MTP_HEADS``, ``BLOCK_DRAFTER``, or None: nothing) and ``max_tokens`` the most it drafts per step."""

    source: str | None = None
    max_tokens: int = 0

    @classmethod
    def of(cls, network) -> OwnDrafter:
        # the generator's rule: a block drafter, where there is one, is what mode "mtp" drafts with
        block = getattr(network, "block_drafter", None)
        if block is not None:
            return cls(BLOCK_DRAFTER, int(block.block_size))
        depth = int(getattr(network, "mtp_depth", 0) or 0)
        return cls(MTP_HEADS, depth) if depth else cls()

    @property
    def has_confidence_gate(self) -> bool:
        return self.source == BLOCK_DRAFTER

    @property
    def max_panel_depth(self) -> int:
        """The depth slider's top: 3, or a longer block where the block drafter drafts one."""
        return min(max(MAX_PANEL_DEPTH, self.max_tokens), MAX_DRAFT_TOKENS)

    def describe(self) -> str:
        if self.source == BLOCK_DRAFTER:
            return (f"This model has a DSpark block drafter: it drafts up to {self.max_tokens} tokens per step "
                    "in one forward, keeping those its confidence gate passes.")
        if self.source == MTP_HEADS:
            return f"This model has {self.max_tokens} MTP head(s)."
        return "MTP heads: unavailable (this model has none); use n-gram or a draft model."


def draft_options(enabled: bool, source: str, depth, dynamic: bool, draft_model_dir: str | None = None,
                  *, own: OwnDrafter | None = None, confidence=None) -> DraftOptions:
    """What the drafting box asks for, validated against the loaded model's own drafter (``own``; None:
    no model loaded yet). ``confidence``: the confidence gate, used with the block drafter only."""
    if not enabled:
        return DraftOptions(mode="disabled")
    if source not in DRAFT_SOURCES:
        raise InvalidArgumentError(f"draft source {source!r}: choose one of {', '.join(DRAFT_SOURCES)}")
    limit = (own or OwnDrafter()).max_panel_depth
    try:
        depth = int(depth)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"draft depth {depth!r}: choose 1 to {limit}") from None
    if not 1 <= depth <= limit:
        raise InvalidArgumentError(f"draft depth {depth}: choose 1 to {limit}")
    mode = DRAFT_SOURCES[source]
    if mode == "mtp" and own is not None:
        if source != own.source:  # the other kind of own drafter, or none
            if own.source is None:
                has, choose = f"no {'MTP heads' if source == MTP_HEADS else 'block drafter'}", "n-gram or a draft model"
            elif own.source == BLOCK_DRAFTER:
                has, choose = "a block drafter", repr(BLOCK_DRAFTER)
            else:
                has, choose = f"{own.max_tokens} MTP head(s)", repr(MTP_HEADS)
            raise InvalidArgumentError(f"draft source {source!r}: this model has {has}; choose {choose}")
        if depth > own.max_tokens:
            most = (f"drafts at most {own.max_tokens} tokens per step" if source == BLOCK_DRAFTER
                    else f"has {own.max_tokens} MTP head(s)")
            raise InvalidArgumentError(f"draft depth {depth}: this model {most}")
    gate = None
    if source == BLOCK_DRAFTER and confidence is not None:
        try:
            gate = float(confidence)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"confidence gate {confidence!r}: choose a number from 0 to 1") from None
        if not 0 <= gate <= 1:
            raise InvalidArgumentError(f"confidence gate {gate}: choose a number from 0 to 1")
    model_dir = (draft_model_dir or "").strip() or None
    if mode == "model" and not model_dir:
        raise InvalidArgumentError("draft source 'draft model': enter the draft model's directory")
    return DraftOptions(mode=mode, num_tokens=depth, dynamic=bool(dynamic),
                        model_dir=model_dir if mode == "model" else None, confidence_threshold=gate)


def available_sources(own: OwnDrafter) -> list[str]:
    """Radio choices for a model: its own drafter where it has one, under its own name."""
    return [s for s in DRAFT_SOURCES if DRAFT_SOURCES[s] != "mtp" or s == own.source]


def stats_html(stats: DraftStats | None, *, note: str = "") -> str:
    """Acceptance per depth as a small bar chart (inline SVG: renders the same in every Gradio version)
    plus tokens per verification step."""
    if stats is None or not stats.steps:
        body = html.escape(note or "no drafted tokens yet")
        return f'<div class="exl3-draft-stats"><p>{body}</p></div>'
    rates = stats.acceptance_per_depth
    bar_w, gap, height = 36, 12, 80
    bars = []
    for d, rate in enumerate(rates):
        x = gap + d * (bar_w + gap)
        h = max(1.0, rate * height)
        bars.append(f'<rect x="{x}" y="{height - h + 4:.1f}" width="{bar_w}" height="{h:.1f}" fill="#4a7bd0"/>'
                    f'<text x="{x + bar_w / 2}" y="{height + 18}" font-size="11" text-anchor="middle">'
                    f'd{d + 1}: {rate:.0%}</text>')
    width = gap + len(rates) * (bar_w + gap)
    svg = (f'<svg width="{width}" height="{height + 24}" role="img" aria-label="acceptance per depth">'
           + "".join(bars) + "</svg>")
    return (f'<div class="exl3-draft-stats">{svg}<p>acceptance per depth: '
            + ", ".join(f"{r:.0%}" for r in rates)
            + f"; tokens per step: {stats.mean_tokens_per_step:.2f}; accepted {stats.total_accepted}, "
            f"rejected {stats.total_rejected}</p></div>")
