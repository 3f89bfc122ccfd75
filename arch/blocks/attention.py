"""Grouped-query self-attention with RoPE (Llama-class, Gemma 4)."""

from __future__ import annotations

import torch
from torch import nn

from ... import kernels
from ...kernels.reference.attention import attention_ref
from ...kernels.reference.rope import rotate_neox
from ..batch import ForwardBatch
from .linear import Linear, LinearGroup
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rope_neox


class GQAAttention(nn.Module):
    """q/k/v projections, RoPE on q and k, causal attention, output projection.

    Optional pieces used by other families: ``q_norm``/``k_norm`` (per-head
    RMSNorm before RoPE), ``v_norm`` (per-head, on the values), no ``v_proj``
    (Gemma 4's ``attention_k_eq_v``: the values are the raw, un-normed,
    un-rotated key projection), a sliding ``window``, and ``ring``: the layer's
    cache keeps only the window (``arch.cache_spec``).

    Two ways in: ``x [B, T, hidden]`` with no batch (a plain causal pass over
    those tokens, no cache), or packed tokens ``x [T, hidden]`` with a
    ``ForwardBatch``: new keys/values go into the paged cache (layer
    ``layer_idx``) and attention reads each sequence's cached history.
    """

    def __init__(
        self,
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear | None,
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
        v_norm: nn.Module | None = None,
        ring: bool = False,
        layer_idx: int = 0,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        if ring and not window:
            raise ValueError("a ring cache needs a sliding window")
        # q, k (and v) read the same input: one matmul where their weights allow (LinearGroup)
        self.qkv = LinearGroup([q_proj, k_proj] + ([] if v_proj is None else [v_proj]))
        self.has_v_proj = v_proj is not None
        self.o_proj = o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope = rope
        self.scale = head_dim**-0.5 if scale is None else scale
        self.window = window
        self.ring = ring
        self.q_norm, self.k_norm, self.v_norm = q_norm, k_norm, v_norm

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        if batch is not None:
            return self._forward_cached(x, batch)
        return self._forward_full(x, positions)

    @property
    def head_norms(self) -> kernels.HeadNorms | None:
        """The per-head norms for the fused RoPE + cache-store kernel (built per call: it holds the
        norms' current weight tensors)."""
        return _head_norms(self.q_norm, self.k_norm, self.v_norm)

    def _project_raw(self, x: torch.Tensor):
        """q ``[..., Hq, D]``, k and v ``[..., Hkv, D]`` as projected (no norms)."""
        lead = x.shape[:-1]
        q, k, *v = self.qkv(x)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v[0].view(*lead, self.num_kv_heads, self.head_dim) if v else k
        return q, k, v

    def _project(self, x: torch.Tensor):
        """q ``[..., Hq, D]``, k and v ``[..., Hkv, D]`` with the norms applied, before RoPE."""
        q, k, v = self._project_raw(x)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        return q, k, v.contiguous()

    def _rope_tables(self, batch: ForwardBatch):
        """cos/sin for this step's positions, shared by every layer with the same rotary embedding."""
        tables = batch.memo.get(id(self.rope))
        if tables is None:
            tables = batch.memo[id(self.rope)] = self.rope(batch.positions)
        return tables

    def _forward_cached(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        state = batch.cache.paged[self.layer_idx]
        k_cache, v_cache = state["k"], state["v"]
        backend = self.o_proj.backend
        if self.ring and not batch.is_decode:
            q, k, v = self._project(x)
            cos, sin = self._rope_tables(batch)
            out = kernels.ring_prefill_attention(
                rotate_neox(q, cos, sin), rotate_neox(k, cos, sin), v, k_cache, v_cache,
                ring_page_table=batch.ring_page_table, ring_slot_mapping=batch.ring_slot_mapping,
                cu_q=batch.cu_q, kv_lens=batch.kv_lens, q_positions=batch.positions, scale=self.scale,
                window=self.window, backend=backend)
            return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))
        slots = batch.ring_slot_mapping if self.ring else batch.slot_mapping
        table = batch.ring_page_table if self.ring else batch.page_table
        # the head norms go into the same kernel as the rotation and the cache store where they can
        norms = self.head_norms
        q, k, v = self._project(x) if norms is None else self._project_raw(x)
        # the reference path reuses one cos/sin table for every layer of the step (made on first use)
        q = kernels.rope_store_kv(q, k, v, positions=batch.positions, inv_freq=self.rope.inv_freq,
                                  slot_mapping=slots, k_cache=k_cache, v_cache=v_cache,
                                  scaling=self.rope.attention_scaling, tables=lambda: self._rope_tables(batch),
                                  norms=norms,
                                  backend=backend)
        out = kernels.paged_attention(
            q, k_cache, v_cache, page_table=table, cu_q=batch.cu_q, kv_lens=batch.kv_lens,
            q_positions=batch.positions, scale=self.scale, window=self.window, kv_lens_t=batch.kv_lens_t,
            is_decode=batch.is_decode, backend=backend)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))

    def _forward_full(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [B, T, hidden]``, ``positions [B, T]`` -> ``[B, T, hidden]`` (causal, no cache)."""
        b, t, _ = x.shape
        q, k, v = self._project(x)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = self.rope(positions)
        q, k = apply_rope_neox(q, cos, sin), apply_rope_neox(k, cos, sin)
        out = attention_ref(q, k, v, positions, positions, scale=self.scale, window=self.window)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def _head_norms(q_norm, k_norm, v_norm) -> kernels.HeadNorms | None:
    """The per-head norms as ``HeadNorms`` for the fused RoPE + cache-store kernel, or None where
    there are none or one is not a plain ``RMSNorm`` with the others' eps (then they run as modules)."""
    present = [n for n in (q_norm, k_norm, v_norm) if n is not None]
    if not present or any(not isinstance(n, RMSNorm) or n.eps != present[0].eps for n in present):
        return None

    def weight(n):
        return None if n is None else n.weight

    return kernels.HeadNorms(eps=present[0].eps, q=q_norm is not None, k=k_norm is not None, v=v_norm is not None,
                             q_weight=weight(q_norm), k_weight=weight(k_norm), v_weight=weight(v_norm))
