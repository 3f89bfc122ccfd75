"""The Gradio panel: Loading, speculative decoding (the checkpoint's MTP heads or DSpark block drafter,
a draft model, n-gram) and Chat, built on the public API only.

``build_panel()`` adds its components to the Blocks (or tab) it is called in, so the same panel
mounts in the standalone demo (``ui/demo.py``) and in text-generation-webui's extension tab.
It uses only components and event APIs that behave the same in Gradio 4.37.2 (the webui's pin)
and current Gradio: Textbox, Number, Slider, Checkbox, Radio, Dropdown, Button, Markdown, HTML,
State, ``.click/.change/.submit/.then`` and ``gr.Progress``; no version checks. Status and errors
are shown as text in the panel (never only as a toast), and a failed action leaves the previous
state usable.
"""

from __future__ import annotations

import time

import gradio as gr

from ..runtime.drafting_options import DSPARK_CONFIDENCE_THRESHOLD
from .chat_view import transcript_html
from .drafting import DRAFT_SOURCES, OwnDrafter, available_sources, draft_options, stats_html
from .model_info import card_markdown
from .session import DEVICES, ChatSettings, LoadSettings, ModelSession, error_message, generator_accepts_draft

CACHE_QUANT_NOTE = ("Cache quantisation: not supported yet; the cache is kept in the model's dtype "
                    "(fp16 on GPU, fp32 on CPU).")


def _error(text: str) -> str:
    return f"**Error:** {text}"


def _mtp_note(session: ModelSession) -> str:
    if not session.loaded:
        return "Load a model to see which draft sources it supports."
    heads = session.own_drafter.describe()
    if not generator_accepts_draft():
        heads += " Speculative decoding is not in this build's generator yet: settings are checked but not used."
    return heads


def _own(session: ModelSession) -> OwnDrafter:
    """The loaded model's own drafter; before a load, none."""
    return session.own_drafter or OwnDrafter()


def draft_control_updates(session: ModelSession, depth) -> tuple:
    """After a load or unload: the depth slider's range and the confidence gate's visibility
    (shown only for a model with a block drafter), as updates for those two sliders."""
    own = _own(session)
    return (gr.Slider(maximum=own.max_panel_depth, value=min(int(depth or 1), own.max_panel_depth)),
            gr.Slider(visible=own.has_confidence_gate))


def build_panel(session: ModelSession | None = None, *, default_model_dir: str = "") -> ModelSession:
    """Add the panel's components to the current Blocks context; returns the session it drives."""
    session = session or ModelSession()

    # ------------------------------------------------------------------ Loading
    gr.Markdown("### Model")
    with gr.Row():
        model_dir = gr.Textbox(label="Model directory", value=default_model_dir, elem_id="exl3-model-dir",
                               placeholder="/path/to/model-exl3", scale=3)
        recent = gr.Dropdown(label="Recent models", choices=session.recent.list(), value=None,
                             elem_id="exl3-recent", scale=2)
    with gr.Row():
        max_seq_len = gr.Number(label="Max sequence length", value=1024, precision=0, elem_id="exl3-max-seq-len")
        cache_tokens = gr.Number(label="Cache size (tokens, 0 = batch x length)", value=0, precision=0,
                                 elem_id="exl3-cache-tokens")
        chunk_size = gr.Number(label="Chunk size", value=512, precision=0, elem_id="exl3-chunk-size")
        max_batch = gr.Number(label="Max batch size", value=4, precision=0, elem_id="exl3-max-batch")
    with gr.Row():
        device = gr.Radio(label="Device", choices=list(DEVICES), value="auto", elem_id="exl3-device")
        gpu_split = gr.Textbox(label="GPU split (GB per GPU, e.g. 20,24, or auto; empty: one device)",
                               elem_id="exl3-gpu-split")
    gr.Markdown(CACHE_QUANT_NOTE)
    with gr.Row():
        load_btn = gr.Button("Load", variant="primary", elem_id="exl3-load")
        unload_btn = gr.Button("Unload", elem_id="exl3-unload")
    load_status = gr.Markdown("No model loaded." if not session.loaded else "Model loaded.",
                              elem_id="exl3-load-status")
    card = gr.Markdown(card_markdown(session.card) if session.card else "", elem_id="exl3-model-card")

    # ------------------------------------------------------------------ MTP
    gr.Markdown("### Speculative decoding")
    with gr.Row():
        draft_on = gr.Checkbox(label="Enable drafting", value=False, elem_id="exl3-draft-enable")
        draft_source = gr.Radio(label="Draft source", choices=list(DRAFT_SOURCES), value="n-gram",
                                elem_id="exl3-draft-source")
        draft_depth = gr.Slider(label="Depth", minimum=1, maximum=_own(session).max_panel_depth, step=1, value=2,
                                elem_id="exl3-draft-depth")
        draft_dynamic = gr.Checkbox(label="Dynamic depth", value=False, elem_id="exl3-draft-dynamic")
    # only a block drafter has a confidence gate: shown while a model with one is loaded
    draft_gate = gr.Slider(label="Confidence gate (block drafter: drafts only while its confidence head "
                           f"reaches this; 0 keeps every draft; default {DSPARK_CONFIDENCE_THRESHOLD})",
                           minimum=0, maximum=1, step=0.05, value=DSPARK_CONFIDENCE_THRESHOLD,
                           visible=_own(session).has_confidence_gate, elem_id="exl3-draft-confidence")
    draft_model_dir = gr.Textbox(label="Draft model directory (draft source: draft model)",
                                 elem_id="exl3-draft-model-dir")
    draft_status = gr.Markdown(_mtp_note(session), elem_id="exl3-draft-status")
    draft_view = gr.HTML(stats_html(None), elem_id="exl3-draft-stats")

    # ------------------------------------------------------------------ Chat
    gr.Markdown("### Chat")
    history = gr.State([])
    transcript = gr.HTML(transcript_html([]), elem_id="exl3-chat")
    message = gr.Textbox(label="Message", lines=2, elem_id="exl3-message", placeholder="Type a message")
    with gr.Row():
        send_btn = gr.Button("Send", variant="primary", elem_id="exl3-send")
        stop_btn = gr.Button("Stop", elem_id="exl3-stop")
        regen_btn = gr.Button("Regenerate", elem_id="exl3-regenerate")
        clear_btn = gr.Button("Clear", elem_id="exl3-clear")
    chat_stats = gr.Markdown("", elem_id="exl3-chat-stats")
    with gr.Row():
        max_new = gr.Number(label="Max new tokens", value=120, precision=0, elem_id="exl3-max-new")
        temperature = gr.Slider(label="Temperature", minimum=0, maximum=2, step=0.05, value=0.7,
                                elem_id="exl3-temperature")
        top_k = gr.Slider(label="Top-k", minimum=0, maximum=200, step=1, value=40, elem_id="exl3-top-k")
        top_p = gr.Slider(label="Top-p", minimum=0.05, maximum=1, step=0.05, value=0.95, elem_id="exl3-top-p")
    with gr.Row():
        min_p = gr.Slider(label="Min-p", minimum=0, maximum=0.5, step=0.01, value=0.0, elem_id="exl3-min-p")
        rep_pen = gr.Slider(label="Repetition penalty", minimum=1, maximum=2, step=0.01, value=1.1,
                            elem_id="exl3-rep-penalty")
        seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, elem_id="exl3-seed")
        system = gr.Textbox(label="System prompt", elem_id="exl3-system")

    # ------------------------------------------------------------------ handlers
    load_inputs = [model_dir, max_seq_len, cache_tokens, chunk_size, max_batch, device, gpu_split]

    def on_load(path, seq_len, cache, chunk, batch, dev, split, progress=gr.Progress()):
        t0 = time.perf_counter()
        settings = LoadSettings(path, seq_len, cache, chunk, batch, dev, split)

        def report(done: int, total: int) -> None:
            progress((done, total), desc="loading layers")

        try:
            session.load(settings, progress=report)
        except Exception as e:  # noqa: BLE001 - every failure becomes a message; the app keeps running
            return (_error(error_message(e)) + (" (the previous model was unloaded)" if not session.loaded else ""),
                    "", gr.Dropdown(choices=session.recent.list()), _mtp_note(session))
        status = f"Loaded **{session.settings.model_dir}** in {time.perf_counter() - t0:.1f} s."
        return status, card_markdown(session.card), gr.Dropdown(choices=session.recent.list()), _mtp_note(session)

    def on_model_changed(depth):
        return draft_control_updates(session, depth)

    load_btn.click(on_load, inputs=load_inputs, outputs=[load_status, card, recent, draft_status]) \
        .then(on_model_changed, inputs=[draft_depth], outputs=[draft_depth, draft_gate])

    def on_unload():
        session.unload()
        return "No model loaded.", "", _mtp_note(session)

    unload_btn.click(on_unload, outputs=[load_status, card, draft_status]) \
        .then(on_model_changed, inputs=[draft_depth], outputs=[draft_depth, draft_gate])
    recent.change(lambda choice, current: choice or current, inputs=[recent, model_dir], outputs=[model_dir])

    def on_draft(enabled, source, depth, dynamic, dmodel, gate):
        try:
            opts = draft_options(enabled, source, depth, dynamic, dmodel, own=session.own_drafter, confidence=gate)
            if not session.loaded:
                return "Load a model first; the drafting settings apply after loading."
            if opts.enabled and not generator_accepts_draft():
                return _mtp_note(session) + f" (asked for: {opts.mode}, depth {opts.num_tokens}" + \
                    (", dynamic)" if opts.dynamic else ")")
            session.set_draft(opts)
        except Exception as e:  # noqa: BLE001
            return _error(error_message(e))
        if not opts.enabled:
            return _mtp_note(session) + " Drafting off."
        gate = "" if opts.confidence_threshold is None else f", confidence gate {opts.confidence_threshold:g}"
        return (f"{_mtp_note(session)} Drafting: {opts.mode}, depth {opts.num_tokens}"
                f"{', dynamic' if opts.dynamic else ''}{gate}. "
                f"Sources for this model: {', '.join(available_sources(session.own_drafter))}.")

    draft_inputs = [draft_on, draft_source, draft_depth, draft_dynamic, draft_model_dir, draft_gate]
    for control in draft_inputs:
        control.change(on_draft, inputs=draft_inputs, outputs=[draft_status])

    chat_inputs = [max_new, temperature, top_k, top_p, min_p, rep_pen, seed, system]

    def run_chat(hist, text, new, temp, k, p, minp, rep, sd, sys_prompt):
        """Stream one reply: yields (transcript, history, stats, message box, draft stats)."""
        settings = ChatSettings(new, temp, k, p, minp, rep, sd, sys_prompt or "")
        hist = list(hist or [])
        try:
            updates = session.chat(hist, text, settings)
            shown = hist + [{"role": "user", "content": text}]
            yield transcript_html(shown, ""), hist, "writing...", "", stats_html(session.draft_stats)
            last = None
            for last in updates:
                yield (transcript_html(shown, last.text), hist, last.stats_line(), "",
                       stats_html(last.draft or session.draft_stats))
        except Exception as e:  # noqa: BLE001
            yield transcript_html(hist), hist, _error(error_message(e)), text, stats_html(session.draft_stats)
            return
        reply = last.text if last else ""
        hist = shown + [{"role": "assistant", "content": reply}]
        line = last.stats_line() if last else ""
        if last and last.error:
            line += " · " + _error(last.error)
        yield transcript_html(hist), hist, line, "", stats_html(session.draft_stats)

    chat_outputs = [transcript, history, chat_stats, message, draft_view]
    send_btn.click(run_chat, inputs=[history, message, *chat_inputs], outputs=chat_outputs)
    message.submit(run_chat, inputs=[history, message, *chat_inputs], outputs=chat_outputs)

    def regenerate(hist, *settings):
        hist = list(hist or [])
        if hist and hist[-1]["role"] == "assistant":
            hist.pop()
        if not hist or hist[-1]["role"] != "user":
            yield transcript_html(hist), hist, _error("nothing to regenerate yet"), "", stats_html(None)
            return
        last_user = hist.pop()["content"]
        yield from run_chat(hist, last_user, *settings)

    regen_btn.click(regenerate, inputs=[history, *chat_inputs], outputs=chat_outputs)
    stop_btn.click(lambda: session.stop())
    clear_btn.click(lambda: (transcript_html([]), [], ""), outputs=[transcript, history, chat_stats])
    return session
