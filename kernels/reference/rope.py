"""Reference rotary embedding (NEOX layout) fused with the cache write."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .norm import rms_norm_ref


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
    if callable(tables):
        tables = tables()
    cos, sin = tables if tables is not None else rope_tables(positions, inv_freq, scaling)
    q, k = rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)
    return q


@dataclass(frozen=True)
class HeadNorms:
    """Per-head RMSNorms applied to the raw q/k/v projections before the rotation and the cache
    write: ``q``/``k``/``v`` switch each on, a weight of None is a norm without a learned scale."""

    eps: float
    q: bool = False
    k: bool = False
    v: bool = False
    q_weight: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    v_weight: torch.Tensor | None = None


def apply_head_norms(q, k, v, norms: HeadNorms):
    """The norms as separate modules compute them: fp32, rounded back to the input dtype."""
    def norm(t, w):
        return rms_norm_ref(t.float(), w, norms.eps).to(t.dtype)

    return (norm(q, norms.q_weight) if norms.q else q, norm(k, norms.k_weight) if norms.k else k,
            norm(v, norms.v_weight) if norms.v else v)


def norm_rope_store_kv_ref(q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache, norms: HeadNorms,
                           scaling: float = 1.0, tables=None):
    """``apply_head_norms`` then ``rope_store_kv_ref``; returns the normed, rotated q."""
    q, k, v = apply_head_norms(q, k, v, norms)
    return rope_store_kv_ref(q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache, scaling, tables)
