"""The chat transcript as HTML.

The panel draws its own transcript instead of using ``gr.Chatbot`` because the Chatbot's message
format differs between Gradio 4.37 (pairs) and current Gradio (role dicts only); an HTML block
behaves the same in both.
"""

from __future__ import annotations

import html

ROLE_LABELS = {"user": "You", "assistant": "Model"}


def transcript_html(history: list[dict], pending: str | None = None) -> str:
    """``history``: ``[{"role": "user"|"assistant", "content": str}, ...]``; ``pending``: a reply being
    streamed (shown after the history)."""
    rows = list(history) + ([{"role": "assistant", "content": pending}] if pending is not None else [])
    if not rows:
        return '<div class="exl3-chat"><p class="exl3-chat-empty">No messages yet.</p></div>'
    items = []
    for m in rows:
        role = m.get("role", "user")
        text = html.escape(str(m.get("content", ""))).replace("\n", "<br>")
        items.append(f'<div class="exl3-msg exl3-msg-{html.escape(role)}" data-role="{html.escape(role)}">'
                     f"<b>{ROLE_LABELS.get(role, html.escape(role))}:</b> {text}</div>")
    return '<div class="exl3-chat">' + "".join(items) + "</div>"
