"""Prefill attention on CUDA through PyTorch's fused ``scaled_dot_product_attention``.

Same contract as ``kernels.reference.attention.attention_ref`` (position-based
causal / sliding-window mask, grouped-query heads), but computed by a fused
kernel in the activation dtype instead of materialising fp32 score matrices:
a 2048-token prefill of a 32-head model would otherwise build a 512 MB score
tensor per layer.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .reference.attention import attention_mask


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, *,
                   scale: float, window: int | None = None) -> torch.Tensor:
    """q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, v ``[B, Hkv, Tk, Dv]`` -> ``[B, Hq, Tq, Dv]``."""
    mask = attention_mask(q_pos, k_pos, window)[:, None]  # [B, 1, Tq, Tk], broadcast over heads
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
