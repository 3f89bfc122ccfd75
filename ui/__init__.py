"""exl3_triton.ui: Gradio panel and standalone demo, built on the public API only.

    from exl3_triton.ui.panel import build_panel     # inside any gr.Blocks / gr.Tab: adds the panel
    from exl3_triton.ui.demo import build_demo, launch_demo, BUNDLED_MODEL_DIR

``exl3_triton.ui`` itself does not import Gradio, so the package imports without the ``ui`` extra.
"""
