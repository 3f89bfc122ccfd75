"""Grouped-query self-attention with RoPE (Llama-class)."""

from __future__ import annotations

import torch
from torch import nn

from ... import kernels
from ...kernels.reference.attention import attention_ref
from ..batch import ForwardBatch
from .linear import Linear
from .rope import RotaryEmbedding, apply_rope_neox


class GQAAttention(nn.Module):
    """q/k/v projections, RoPE on q and k, causal attention, output projection.

    Optional pieces used by other families: ``q_norm``/``k_norm`` (per-head
    RMSNorm before RoPE), a sliding ``window``.

    Two ways in: ``x [B, T, hidden]`` with no batch (a plain causal pass over
    those tokens, no cache), or packed tokens ``x [T, hidden]`` with a
    ``ForwardBatch``: new keys/values go into the paged cache (layer
    ``layer_idx``) and attention reads each sequence's cached history.
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
        layer_idx: int = 0,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope = rope
        self.scale = head_dim**-0.5 if scale is None else scale
        self.window = window
        self.q_norm, self.k_norm = q_norm, k_norm

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        if batch is not None:
            return self._forward_cached(x, batch)
        return self._forward_full(x, positions)

    def _forward_cached(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        state = batch.cache.paged[self.layer_idx]
        k_cache, v_cache = state["k"], state["v"]
        tables = None
        if not q.is_cuda:  # the reference path reuses one cos/sin table for every layer of the step
            tables = batch.memo.get(id(self.rope))
            if tables is None:
                tables = batch.memo[id(self.rope)] = self.rope(batch.positions)
        q = kernels.rope_store_kv(q, k, v, positions=batch.positions, inv_freq=self.rope.inv_freq,
                                  slot_mapping=batch.slot_mapping, k_cache=k_cache, v_cache=v_cache,
                                  scaling=self.rope.attention_scaling, tables=tables, backend=self.o_proj.backend)
        out = kernels.paged_attention(
            q, k_cache, v_cache, page_table=batch.page_table, cu_q=batch.cu_q, kv_lens=batch.kv_lens,
            q_positions=batch.positions, scale=self.scale, window=self.window, kv_lens_t=batch.kv_lens_t,
            is_decode=batch.is_decode, backend=self.o_proj.backend)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))

    def _forward_full(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [B, T, hidden]``, ``positions [B, T]`` -> ``[B, T, hidden]`` (causal, no cache)."""
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
