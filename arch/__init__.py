"""exl3_triton.arch: model families (adapters) built from shared blocks, and their registry."""
