"""The standalone demo (``exl3-triton demo [MODEL_DIR]``): the panel in its own page.

With no model directory it opens the bundled model, a small Gemma-4-architecture model trained by
``tools/demo_model/train.py`` and shipped as package data in ``ui/demo_model/``.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def build_demo(model_dir: str | Path | None = None, *, session=None, autoload: bool = True, device: str = "auto"):
    """The demo's ``gr.Blocks`` (not launched). ``autoload``: load the model before the page opens, so the
    first visitor can chat at once (Load in the page reloads it with other settings)."""
    import gradio as gr

    from .panel import build_panel
    from .session import LoadSettings, ModelSession

    model_dir = str(model_dir or BUNDLED_MODEL_DIR)
    session = session or ModelSession()
    if autoload:
        session.load(LoadSettings(model_dir, max_seq_len=1024, device=device))
    with gr.Blocks(title="exl3-triton") as blocks:
        gr.Markdown("## exl3-triton demo\nEXL3 models with Triton kernels. "
                    + ("The bundled model is a tiny Gemma 4 trained on the King James Bible: expect "
                       "simple, scripture-like text." if Path(model_dir) == BUNDLED_MODEL_DIR else ""))
        build_panel(session, default_model_dir=model_dir)
    blocks.exl3_session = session  # for tests and embedding code
    return blocks


def launch_demo(model_dir: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 7860,
                device: str = "auto", autoload: bool = True) -> None:
    """Build and serve the demo until interrupted."""
    blocks = build_demo(model_dir, autoload=autoload, device=device)
    blocks.queue().launch(server_name=host, server_port=port, inbrowser=False, show_error=True)
