"""Interleaved (GPT-J) RoPE on the trailing dims of a head, and YaRN frequencies (DeepSeek-V4).

DeepSeek-V4 lays each head out as ``[nope | rope]`` and rotates the trailing
``rope_dim`` channels in consecutive pairs ``(2i, 2i + 1)`` (architectures.md
§0.2). Its compressed layers use YaRN-blended frequencies with the magnitude
factor forced to 1 (transformers injects ``attention_factor=1.0``, ds4 cancels
the mscale by hand, ExLlamaV3 passes ``attn_factor 1.0``), so only the
frequencies change, never the cos/sin amplitude.
"""

from __future__ import annotations

import math

import torch


def default_inverse_frequencies(theta: float, rope_dim: int) -> torch.Tensor:
    """``theta^(-2i/d)`` for ``i < d/2`` (fp32, as transformers computes it)."""
    return 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.int64).float() / rope_dim))


def yarn_inverse_frequencies(theta: float, rope_dim: int, *, factor: float, original_max_position_embeddings: int,
                             beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """YaRN: interpolate (divide by ``factor``) the low frequencies, keep the high ones, ramp between.

    The correction range is truncated to whole dims, as transformers does by default.
    """
    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency
    pos_freqs = theta ** (torch.arange(0, rope_dim, 2).float() / rope_dim)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[..., rope_dim / 2]`` (one entry per rotated pair) for ``positions`` (fp32)."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    return freqs.cos(), freqs.sin()


def rotate_tail_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing ``2 * cos.shape[-1]`` channels of ``x [*lead, ..., D]`` in pairs ``(2i, 2i+1)``.

    ``cos``/``sin [*lead, rope_dim / 2]`` (one angle per token) broadcast over the dims between the
    token dims and the channels (heads). Pass ``-sin`` for the inverse rotation (V4 de-rotates the
    attention output, whose values carry the keys' rope). Runs in fp32, cast back to ``x``'s dtype.
    """
    half = cos.shape[-1]
    shape = cos.shape[:-1] + (1,) * (x.dim() - cos.dim()) + (half,)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    nope, rope = x[..., : -2 * half], x[..., -2 * half:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)
