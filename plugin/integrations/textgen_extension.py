"""The webui extension behind the ``user_data/extensions/exl3_triton/script.py`` shim.

``params`` (the webui stores them in settings.yaml as ``exl3_triton-<key>``) is the very dict the
model reads its drafting settings from; ``setup()`` installs the loader (a no-op when the launcher
already did); ``ui()`` builds the tab: MTP / drafting options, the draft statistics of the loaded
model, and the shared exl3-triton Gradio panel when this build has one. Only Gradio calls that
exist unchanged in Gradio 4.37 (the webui's pin) and later are used.
"""

from __future__ import annotations

from ..runtime.drafting_options import DRAFT_MODES, MAX_DRAFT_TOKENS
from .common import log
from .textgen_model import DRAFT_SETTINGS

params = DRAFT_SETTINGS
params.update({"display_name": "EXL3 Triton", "is_tab": True})

MODE_HELP = {
    "disabled": "no drafting",
    "mtp": ("the checkpoint's own drafter: its MTP draft layers, or DeepSeek-V4's DSpark block drafter "
            "(models that ship one)"),
    "ngram": "copy continuations from the prompt and reply (no extra weights)",
    "model": "the draft model chosen in the Model tab (speculative decoding section)",
}


def setup() -> None:
    from .textgen import install

    install()


def draft_status() -> str:
    """Markdown: the loaded model's drafting and its acceptance so far."""
    from .textgen_model import Exllamav3Model, webui_shared

    shared = webui_shared()
    model = getattr(shared, "model", None) if shared is not None else None
    lines = [f"Draft source for the next load: **{params['draft_mode']}** ({MODE_HELP[params['draft_mode']]}), "
             f"{params['draft_num_tokens']} token(s) per step{', dynamic' if params['dynamic_draft'] else ''}."]
    if not isinstance(model, Exllamav3Model) or model.parallel_generator is None:
        lines.append("No model is loaded with the ExLlamav3-Triton loader.")
        return "\n\n".join(lines)
    stats = model.draft_stats
    if stats is None or not stats.steps:
        lines.append("The loaded model has not drafted yet.")
    else:
        depths = ", ".join(f"depth {d + 1}: {a:.0%}" for d, a in enumerate(stats.acceptance_per_depth))
        lines.append(f"Acceptance {depths}; {stats.mean_tokens_per_step:.2f} tokens per step.")
    return "\n\n".join(lines)


def _set(key):
    def update(value):
        params[key] = int(value) if key == "draft_num_tokens" else value
        return draft_status()

    return update


def shared_panel():
    """The shared Gradio panel's builder from ``exl3_triton.ui`` (None when this build has none)."""
    try:
        import exl3_triton.ui.panel as panel
    except ImportError:
        return None
    for name in ("build_panel", "create_panel", "panel"):
        builder = getattr(panel, name, None)
        if callable(builder):
            return builder
    return None


def ui() -> None:
    import gradio as gr

    with gr.Column():
        gr.Markdown("### Speculative decoding for the ExLlamav3-Triton loader\n"
                    "Takes effect when the model is (re)loaded with that loader.")
        with gr.Row():
            mode = gr.Dropdown(choices=list(DRAFT_MODES), value=params["draft_mode"], label="Draft source",
                               info="; ".join(f"{k}: {v}" for k, v in MODE_HELP.items()))
            num = gr.Slider(minimum=1, maximum=MAX_DRAFT_TOKENS, step=1, value=params["draft_num_tokens"],
                            label="Draft tokens per step", info="MTP: at most one per MTP layer the model ships")
            dynamic = gr.Checkbox(value=params["dynamic_draft"], label="Dynamic draft length",
                                  info="shorten or lengthen drafts from the measured acceptance")
        status = gr.Markdown(draft_status())
        refresh = gr.Button("Refresh draft statistics")
    mode.change(_set("draft_mode"), mode, status)
    num.change(_set("draft_num_tokens"), num, status)
    dynamic.change(_set("dynamic_draft"), dynamic, status)
    refresh.click(draft_status, None, status)

    builder = shared_panel()
    if builder is not None:
        with gr.Accordion("exl3-triton panel", open=False):
            try:
                builder()
            except Exception:  # the tab must still work if the panel cannot be built here
                log.exception("the exl3-triton Gradio panel could not be built inside the webui")
