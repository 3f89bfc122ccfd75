"""Reference rotary embedding (NEOX layout) fused with the cache write."""

from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
    """cos/sin ``[T, D]`` for the NEOX (half-split) layout, in fp32 as transformers computes them."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]`` rotated in pairs (i, i + D/2) by ``cos``/``sin [T, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None].to(x.dtype) + rotated * sin[:, None].to(x.dtype)


def rope_store_kv_ref(q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache, scaling: float = 1.0,
                      tables=None):
    """Rotate q and k; write rotated k and v into the caches at ``slot_mapping``. Returns rotated q."""
    cos, sin = tables if tables is not None else rope_tables(positions, inv_freq, scaling)
    q, k = rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)
    return q
