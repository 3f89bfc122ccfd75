"""Grouped-query self-attention with RoPE (Llama-class)."""

from __future__ import annotations

import torch
from torch import nn

from ...kernels.reference.attention import attention_ref
from .linear import Linear
from .rope import RotaryEmbedding, apply_rope_neox


class GQAAttention(nn.Module):
    """q/k/v projections, RoPE on q and k, causal attention, output projection.

    Optional pieces used by other families: ``q_norm``/``k_norm`` (per-head
    RMSNorm before RoPE), a sliding ``window``.
    """

    def __init__(
        self,
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
        o_proj: Linear,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope: RotaryEmbedding,
        scale: float | None = None,
        window: int | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope = rope
        self.scale = head_dim**-0.5 if scale is None else scale
        self.window = window
        self.q_norm, self.k_norm = q_norm, k_norm

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [B, T, hidden]``, ``positions [B, T]`` -> ``[B, T, hidden]`` (full causal forward)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = self.rope(positions)
        q, k = apply_rope_neox(q, cos, sin), apply_rope_neox(k, cos, sin)
        out = attention_ref(q, k, v, positions, positions, scale=self.scale, window=self.window)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
