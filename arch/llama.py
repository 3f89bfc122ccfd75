"""Llama-class decoder (Llama 2/3, Mistral with or without its sliding window).

RMSNorm, RoPE (default / linear / llama3 scaling), grouped-query attention,
SwiGLU MLP, untied (or tied) output head. Serves the golden EXL3 test models and
unquantized checkpoints of the same architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from ..kernels.weights import DenseWeight
from ..options import RuntimeOptions
from .base import DecoderStackLM
from .batch import ForwardBatch
from .blocks.attention import GQAAttention
from .blocks.linear import Linear
from .blocks.mlp import GatedMLP
from .blocks.norm import RMSNorm
from .blocks.rope import RopeConfig, RotaryEmbedding, inverse_frequencies
from .cache_spec import LayerCacheSpec, kv_spec
from .config_reader import ConfigReader


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: keys with q_pos - k_pos < window

    @staticmethod
    def from_hf(cfg: dict, path) -> "LlamaConfig":
        r = ConfigReader(cfg, path)
        hidden = r.get("hidden_size", int)
        heads = r.get("num_attention_heads", int)
        act = r.get("hidden_act", str, "silu")
        r.require("hidden_act", ("silu",), act)
        window = r.get("sliding_window", int, None) if cfg.get("use_sliding_window", True) else None
        if window is not None and window < 1:
            r.require("sliding_window", ("a positive integer", None), window)
        return LlamaConfig(
            vocab_size=r.get("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=r.get("intermediate_size", int),
            num_layers=r.get("num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=r.get("num_key_value_heads", int, heads),
            head_dim=r.get("head_dim", int, hidden // heads),
            rms_norm_eps=r.get("rms_norm_eps", float, 1e-6),
            rope=RopeConfig.from_hf(r),
            hidden_act=act,
            tie_word_embeddings=r.get("tie_word_embeddings", bool, False),
            attention_bias=r.get("attention_bias", bool, False),
            mlp_bias=r.get("mlp_bias", bool, False),
            sliding_window=window,
        )


class LlamaDecoderLayer(nn.Module):
    def __init__(self, attn: GQAAttention, mlp: GatedMLP, input_norm: RMSNorm, post_attn_norm: RMSNorm):
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_norm, post_attn_norm

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(DecoderStackLM):
    architectures = ("LlamaForCausalLM", "MistralForCausalLM")

    @classmethod
    def config_from_checkpoint(cls, checkpoint: Checkpoint) -> LlamaConfig:
        return LlamaConfig.from_hf(checkpoint.config, checkpoint.config_path)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, options: RuntimeOptions, progress=None) -> "LlamaForCausalLM":
        cfg = cls.config_from_checkpoint(checkpoint)
        dt = options.dtype

        def linear(key: str, n_in: int, n_out: int, opts: RuntimeOptions) -> Linear:
            return Linear(checkpoint.linear(key, in_features=n_in, out_features=n_out), n_in, n_out, opts)

        def norm(key: str, opts: RuntimeOptions) -> RMSNorm:
            return RMSNorm(checkpoint.tensor(key, device=opts.device), cfg.rms_norm_eps)

        embed = checkpoint.tensor("model.embed_tokens.weight", dtype=dt, device=options.for_embedding().device)
        if tuple(embed.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise CheckpointError(
                f"shape {list(embed.shape)} does not match vocab_size x hidden_size "
                f"[{cfg.vocab_size}, {cfg.hidden_size}] from config.json",
                path=checkpoint.info("model.embed_tokens.weight").file, tensor="model.embed_tokens.weight")
        inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

        layers = []
        for i in range(cfg.num_layers):
            p, o = f"model.layers.{i}", options.for_layer(i)
            attn = GQAAttention(
                linear(f"{p}.self_attn.q_proj", cfg.hidden_size, q_size, o),
                linear(f"{p}.self_attn.k_proj", cfg.hidden_size, kv_size, o),
                linear(f"{p}.self_attn.v_proj", cfg.hidden_size, kv_size, o),
                linear(f"{p}.self_attn.o_proj", q_size, cfg.hidden_size, o),
                num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                rope=RotaryEmbedding(inv_freq).to(o.device), layer_idx=i, window=cfg.sliding_window,
            )
            mlp = GatedMLP(
                linear(f"{p}.mlp.gate_proj", cfg.hidden_size, cfg.intermediate_size, o),
                linear(f"{p}.mlp.up_proj", cfg.hidden_size, cfg.intermediate_size, o),
                linear(f"{p}.mlp.down_proj", cfg.intermediate_size, cfg.hidden_size, o),
                cfg.hidden_act,
            )
            layers.append(LlamaDecoderLayer(attn, mlp, norm(f"{p}.input_layernorm.weight", o),
                                            norm(f"{p}.post_attention_layernorm.weight", o)))
            if progress is not None:
                progress(i + 1, cfg.num_layers + 1)

        # EXL3 converters always write a separate (quantized) lm_head, even for
        # tied models (exl3-format.md 1.2), so look for it before tying.
        head = options.for_head()
        if checkpoint.linear_format("lm_head") is not None or not cfg.tie_word_embeddings:
            lm_head = linear("lm_head", cfg.hidden_size, cfg.vocab_size, head)
        else:
            lm_head = Linear(DenseWeight(embed, key="model.embed_tokens"), cfg.hidden_size, cfg.vocab_size, head)
        model = cls(cfg, options, embed, layers, norm("model.norm.weight", head), lm_head)
        if progress is not None:
            progress(cfg.num_layers + 1, cfg.num_layers + 1)
        return model

    def cache_spec(self) -> list[LayerCacheSpec]:
        cfg = self.config
        return [kv_spec(cfg.num_kv_heads, cfg.head_dim, self.options.dtype, self.options.for_layer(i).device,
                        window=cfg.sliding_window) for i in range(cfg.num_layers)]
