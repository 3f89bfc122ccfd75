"""The panel's speculative-decoding controls mapped onto ``DraftOptions``, and the live statistics view."""

from __future__ import annotations

import html

from ..errors import InvalidArgumentError
from ..runtime.drafting_options import DraftOptions, DraftStats

# Radio labels -> DraftOptions.mode
DRAFT_SOURCES = {"MTP heads": "mtp", "draft model": "model", "n-gram": "ngram"}
MAX_PANEL_DEPTH = 3


def draft_options(enabled: bool, source: str, depth, dynamic: bool, draft_model_dir: str | None = None,
                  *, model_mtp_depth: int | None = None) -> DraftOptions:
    """What the MTP box asks for, validated against the loaded model (``model_mtp_depth``: its MTP heads)."""
    if not enabled:
        return DraftOptions(mode="disabled")
    if source not in DRAFT_SOURCES:
        raise InvalidArgumentError(f"draft source {source!r}: choose one of {', '.join(DRAFT_SOURCES)}")
    try:
        depth = int(depth)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"draft depth {depth!r}: choose 1 to {MAX_PANEL_DEPTH}") from None
    if not 1 <= depth <= MAX_PANEL_DEPTH:
        raise InvalidArgumentError(f"draft depth {depth}: choose 1 to {MAX_PANEL_DEPTH}")
    mode = DRAFT_SOURCES[source]
    if mode == "mtp" and model_mtp_depth is not None:
        if model_mtp_depth == 0:
            raise InvalidArgumentError("draft source 'MTP heads': this model has no MTP heads; "
                                       "choose n-gram or a draft model")
        if depth > model_mtp_depth:
            raise InvalidArgumentError(f"draft depth {depth}: this model has {model_mtp_depth} MTP head(s)")
    model_dir = (draft_model_dir or "").strip() or None
    if mode == "model" and not model_dir:
        raise InvalidArgumentError("draft source 'draft model': enter the draft model's directory")
    return DraftOptions(mode=mode, num_tokens=depth, dynamic=bool(dynamic),
                        model_dir=model_dir if mode == "model" else None)


def available_sources(model_mtp_depth: int) -> list[str]:
    """Radio choices for a model: MTP heads only where the checkpoint has them."""
    return [s for s in DRAFT_SOURCES if s != "MTP heads" or model_mtp_depth > 0]


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
