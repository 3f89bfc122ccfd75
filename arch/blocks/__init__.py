"""Family-agnostic building blocks (linear, norms, RoPE, attention, MLP)."""
