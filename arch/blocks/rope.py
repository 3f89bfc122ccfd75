"""Rotary position embeddings: frequency tables and the two rotation layouts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config_reader import ConfigReader

ROPE_TYPES = ("default", "linear", "llama3", "proportional")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    partial_rotary_factor: float = 1.0  # "proportional" (Gemma 4 full layers): share of dims that rotate

    @staticmethod
    def from_hf(reader: ConfigReader, params: ConfigReader | None = None,
                default_theta: float = 10000.0) -> "RopeConfig":
        """Reads ``rope_parameters`` (transformers >= 5) or ``rope_theta`` + ``rope_scaling``.

        ``params``: an explicit parameter section (Gemma 4 has one per layer type).
        """
        if params is None:
            if reader.has("rope_parameters"):
                params = reader.section("rope_parameters")
            else:
                params = reader.section("rope_scaling") if reader.has("rope_scaling") else None
        theta = reader.get("rope_theta", float, default_theta)
        if params is None:
            return RopeConfig(theta=theta)
        rope_type = params.get("rope_type", str, None) or params.get("type", str, "default")
        params.require("rope_type", ROPE_TYPES, rope_type)
        return RopeConfig(
            theta=params.get("rope_theta", float, theta),
            rope_type=rope_type,
            factor=params.get("factor", float, 1.0),
            low_freq_factor=params.get("low_freq_factor", float, 1.0),
            high_freq_factor=params.get("high_freq_factor", float, 4.0),
            original_max_position_embeddings=params.get("original_max_position_embeddings", int, 8192),
            partial_rotary_factor=params.get("partial_rotary_factor", float, 1.0),
        )


def inverse_frequencies(cfg: RopeConfig, rotary_dim: int) -> torch.Tensor:
    """``1 / theta^(2i/d)`` for i < d/2, adjusted by the scaling type (fp32)."""
    if cfg.rope_type == "proportional":
        return proportional_inverse_frequencies(cfg, rotary_dim)
    # fp32 throughout, as transformers computes it, so that logits match closely.
    inv = 1.0 / (cfg.theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if cfg.rope_type == "linear":
        inv = inv / cfg.factor
    elif cfg.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend between.
        low_wavelen = cfg.original_max_position_embeddings / cfg.low_freq_factor
        high_wavelen = cfg.original_max_position_embeddings / cfg.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (cfg.original_max_position_embeddings / wavelen - cfg.low_freq_factor) / (
            cfg.high_freq_factor - cfg.low_freq_factor
        )
        blended = (1 - smooth) * inv / cfg.factor + smooth * inv
        inv = torch.where(wavelen > low_wavelen, inv / cfg.factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = torch.where(mid, blended, inv)
    return inv


def proportional_inverse_frequencies(cfg: RopeConfig, head_dim: int) -> torch.Tensor:
    """Gemma 4's "proportional" RoPE over a whole head (architectures.md 1.4).

    The first ``int(partial_rotary_factor * head_dim // 2)`` frequencies are
    ``theta^(-2i/head_dim)`` (the divisor is the full head, not the rotated
    part); the rest are zero, so those dimension pairs pass through unrotated.
    Used as a plain NEOX rotation over ``head_dim``, which is exact.
    """
    angles = int(cfg.partial_rotary_factor * head_dim // 2)
    rotated = 1.0 / (cfg.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
    inv = torch.cat([rotated, torch.zeros(head_dim // 2 - angles)])
    return inv / cfg.factor


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for given positions, ``[..., rotary_dim]`` in the NEOX (half-split) layout."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float())
        self.attention_scaling = attention_scaling

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def fold_sin(sin: torch.Tensor) -> torch.Tensor:
    """NEOX ``sin [..., D]`` with the sign of ``rotate_half`` folded in: ``[-sin_lo, sin_hi]``."""
    lo, hi = sin.chunk(2, dim=-1)
    return torch.cat([-lo, hi], dim=-1)


def rotate_neox_folded(x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``sin_folded = fold_sin(sin)``: the same values
    (negating is exact either side of the product) in four kernels instead of five.
    ``out_dtype``: the sum rounded to it as it is stored (a cast without its own kernel)."""
    a, b = x * cos, x.roll(x.shape[-1] // 2, dims=-1) * sin_folded
    if out_dtype is None:
        return a + b
    return torch.add(a, b, out=a.new_empty(torch.broadcast_shapes(a.shape, b.shape), dtype=out_dtype))


def apply_rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` with ``cos``/``sin [B, T, D]`` (pairs (i, i + D/2))."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def apply_rope_neox_flat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate packed tokens ``x [T, H, D]`` with ``cos``/``sin [T, D]``."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin
