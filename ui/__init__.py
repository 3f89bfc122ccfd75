"""exl3_triton.ui: Gradio panel and standalone demo, built on the public API only."""
