"""Gemma 4 text model (gemma-4-31B and its MoE variants), EXL3 or unquantized.

The math is architectures.md section 1 and transformers' ``modeling_gemma4``:

* two kinds of layers: sliding-window ones (``head_dim``, ``num_key_value_heads``,
  default RoPE, window ``sliding_window`` including the token itself) and full
  ones (their own head_dim and KV-head count from ``per_layer_config`` or
  ``global_head_dim``/``num_global_key_value_heads``, "proportional" RoPE, and
  with ``attention_k_eq_v`` no ``v_proj``: the values are the raw keys);
* per-head q/k RMSNorm (weighted) and v RMSNorm (no weight), attention scale 1;
* four norms per layer (pre/post attention, pre/post feed-forward), then the
  residual is multiplied by ``layer_scalar``;
* embeddings times ``sqrt(hidden)`` rounded to bf16, as the model was trained;
* GELU-tanh gated MLP; with ``enable_moe_block`` a routed-experts branch beside it;
* final RMSNorm, tied (or separate, quantized in EXL3) head, logit softcap.

The residual stream stays in fp32 whatever the compute dtype, as in
ExLlamaV3: Gemma's activations are large enough that an fp16 residual loses
accuracy. Sliding layers keep a ring cache of their window (``arch.cache_spec``).

Checkpoints: ``Gemma4ForConditionalGeneration`` (and the unified variant) keep
the text tower under ``model.language_model.`` and read ``text_config``; the
vision/audio towers' tensors are skipped. ``Gemma4ForCausalLM`` is the text
model alone under ``model.``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import CheckpointError, ConfigError
from ..kernels.weights import DenseWeight
from ..options import RuntimeOptions
from .base import DecoderStackLM
from .batch import ForwardBatch
from .blocks.attention import GQAAttention
from .blocks.linear import Linear
from .blocks.mlp import ACTIVATIONS, GatedMLP
from .blocks.moe import RoutedExperts, load_routed_experts
from .blocks.norm import RMSNorm
from .blocks.residual_norm import residual_norm
from .blocks.rope import RopeConfig, RotaryEmbedding, inverse_frequencies
from .blocks.softcap import softcap
from .cache_spec import LayerCacheSpec, kv_spec
from .config_reader import ConfigReader

log = logging.getLogger(__name__)

SLIDING, FULL = "sliding_attention", "full_attention"
# tensors of the multimodal towers, which a text-only loader leaves alone
MULTIMODAL_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")


@dataclass(frozen=True)
class Gemma4LayerConfig:
    kind: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # no v_proj: values are the raw key projection
    rope: RopeConfig
    window: int | None  # sliding layers only


@dataclass(frozen=True)
class Gemma4Config:
    prefix: str  # tensor-name prefix of the text model
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layers: tuple[Gemma4LayerConfig, ...]
    rms_norm_eps: float
    hidden_act: str
    final_logit_softcapping: float | None
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    sliding_window: int
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0

    @functools.cached_property
    def embed_scale(self) -> float:
        # sqrt(hidden) rounded to bf16 (73.5 for 5376), as transformers applies it to bf16 weights
        return torch.tensor(self.hidden_size**0.5, dtype=torch.bfloat16).item()

    @staticmethod
    def from_model_config(cfg: dict, path) -> "Gemma4Config":
        """From a checkpoint's config.json: the text tower of a multimodal model, or a text model."""
        arch = (cfg.get("architectures") or ["Gemma4ForConditionalGeneration"])[0]
        return Gemma4Config.from_hf(cfg, path, text_tower=arch != "Gemma4ForCausalLM" and "text_config" in cfg)

    @staticmethod
    def from_hf(cfg: dict, path, *, text_tower: bool) -> "Gemma4Config":
        top = ConfigReader(cfg, path)
        r = top.section("text_config") if text_tower else top
        layer_types = list(r.get("layer_types", list, None) or [])
        n = r.get("num_hidden_layers", int)
        if not layer_types:  # transformers' default: every sixth layer is full
            layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
        if len(layer_types) != n:
            raise ConfigError(f"key '{r.prefix}layer_types' has {len(layer_types)} entries but "
                              f"'{r.prefix}num_hidden_layers' is {n}", path=path)
        for t in layer_types:
            r.require("layer_types", (SLIDING, FULL), t)
        if layer_types[-1] != FULL:  # transformers forces this too
            log.warning("%s: the last Gemma 4 layer must be full attention; treating it as such", path)
            layer_types[-1] = FULL

        for key, why in (("hidden_size_per_layer_input", "per-layer embeddings (Gemma 4 E2B/E4B)"),
                         ("num_kv_shared_layers", "KV sharing between layers (Gemma 4 E2B/E4B)")):
            if r.get(key, int, 0):
                raise ConfigError(f"key '{r.prefix}{key}' = {r.get(key, int)}: {why} is not supported", path=path)
        bidir = r.get("use_bidirectional_attention", str, None)
        r.require("use_bidirectional_attention", (None, "vision"), bidir,
                  "text generation needs causal attention; 'vision' only affects image tokens")
        act = r.get("hidden_activation", str, "gelu_pytorch_tanh")
        r.require("hidden_activation", tuple(ACTIVATIONS), act)

        heads = r.get("num_attention_heads", int)
        head_dim = r.get("head_dim", int)
        kv_heads = r.get("num_key_value_heads", int, heads)
        k_eq_v = r.get("attention_k_eq_v", bool, False)
        window = r.get("sliding_window", int)
        if window < 1:
            r.require("sliding_window", ("a positive integer",), window)
        full_head_dim, full_kv_heads = _full_layer_shape(r, head_dim, kv_heads, k_eq_v, layer_types, path)

        # one rope_parameters section per layer type; transformers' defaults where absent
        ropes = r.section("rope_parameters") if r.has("rope_parameters") else None
        rope_sliding = RopeConfig(theta=10000.0)
        rope_full = RopeConfig(theta=1_000_000.0, rope_type="proportional", partial_rotary_factor=0.25)
        if ropes is not None and ropes.has(SLIDING):
            rope_sliding = RopeConfig.from_hf(r, ropes.section(SLIDING), default_theta=10000.0)
        if ropes is not None and ropes.has(FULL):
            rope_full = RopeConfig.from_hf(r, ropes.section(FULL), default_theta=1_000_000.0)

        layers = []
        for i, kind in enumerate(layer_types):
            if kind == SLIDING:
                layers.append(Gemma4LayerConfig(SLIDING, head_dim, kv_heads, False, rope_sliding, window))
            else:
                hd, kv = full_head_dim.get(i, head_dim), full_kv_heads.get(i, kv_heads)
                layers.append(Gemma4LayerConfig(FULL, hd, kv, k_eq_v, rope_full, None))
        for i, layer in enumerate(layers):
            if heads % layer.num_kv_heads:
                raise ConfigError(f"layer {i}: num_attention_heads {heads} is not a multiple of its "
                                  f"{layer.num_kv_heads} KV heads", path=path)

        moe = r.get("enable_moe_block", bool, False)
        experts = top_k = moe_inter = 0
        if moe:
            experts = r.get("num_experts", int)
            top_k = r.get("top_k_experts", int)
            moe_inter = r.get("moe_intermediate_size", int)
            if not 0 < top_k <= experts:
                raise ConfigError(f"key '{r.prefix}top_k_experts' = {top_k} must be in [1, num_experts={experts}]",
                                  path=path)
        # transformers ties a multimodal model's head by the top-level flag, a text model's by its own
        tie = top.get("tie_word_embeddings", bool, None) if text_tower else None
        tie = r.get("tie_word_embeddings", bool, True) if tie is None else tie
        softcap = r.get("final_logit_softcapping", float, None)
        return Gemma4Config(
            prefix="model.language_model" if text_tower else "model",
            vocab_size=r.get("vocab_size", int),
            hidden_size=r.get("hidden_size", int),
            intermediate_size=r.get("intermediate_size", int),
            num_layers=n,
            num_heads=heads,
            layers=tuple(layers),
            rms_norm_eps=r.get("rms_norm_eps", float, 1e-6),
            hidden_act=act,
            final_logit_softcapping=softcap if softcap else None,
            tie_word_embeddings=tie,
            attention_bias=r.get("attention_bias", bool, False),
            max_position_embeddings=r.get("max_position_embeddings", int, 131072),
            sliding_window=window,
            enable_moe_block=moe,
            num_experts=experts,
            top_k_experts=top_k,
            moe_intermediate_size=moe_inter,
        )


def _full_layer_shape(r: ConfigReader, head_dim: int, kv_heads: int, k_eq_v: bool, layer_types, path):
    """Per-layer head_dim / KV heads of the full layers: ``per_layer_config`` if present, else
    ``global_head_dim`` (default 512) and, with k_eq_v, ``num_global_key_value_heads`` (as transformers)."""
    head_dims, kv = {}, {}
    if r.has("per_layer_config"):
        per_layer = r.get("per_layer_config", dict)
        for key, override in per_layer.items():
            try:
                idx = int(key)
            except ValueError:
                raise ConfigError(f"key '{r.prefix}per_layer_config' has a non-integer layer {key!r}", path=path) \
                    from None
            if not 0 <= idx < len(layer_types):
                raise ConfigError(f"key '{r.prefix}per_layer_config' names layer {idx}, the model has "
                                  f"{len(layer_types)}", path=path)
            sub = ConfigReader(override, path, prefix=f"{r.prefix}per_layer_config.{key}.")
            unknown = set(override) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ConfigError(f"key '{sub.prefix}{sorted(unknown)[0]}' is not supported (only head_dim and "
                                  "num_key_value_heads can differ per layer)", path=path)
            if layer_types[idx] == SLIDING:
                raise ConfigError(f"key '{r.prefix}per_layer_config.{key}' overrides a sliding layer; only full "
                                  "layers may differ", path=path)
            head_dims[idx] = sub.get("head_dim", int, head_dim)
            kv[idx] = sub.get("num_key_value_heads", int, kv_heads)
        return head_dims, kv
    global_dim = r.get("global_head_dim", int, 512)
    global_kv = r.get("num_global_key_value_heads", int, None) if k_eq_v else None
    for i, t in enumerate(layer_types):
        if t == FULL:
            head_dims[i] = global_dim
            kv[i] = global_kv if global_kv is not None else kv_heads
    return head_dims, kv


class Gemma4Router(nn.Module):
    """Softmax router: ``softmax(proj(rms(x) * scale / sqrt(H)))``, top-k renormalised, times per-expert scale."""

    def __init__(self, proj: torch.Tensor, scale: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int,
                 eps: float):
        super().__init__()
        self.register_buffer("proj", proj.float())
        self.register_buffer("scale", scale.float() * proj.shape[1] ** -0.5)
        self.register_buffer("per_expert_scale", per_expert_scale.float())
        self.norm = RMSNorm(None, eps)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` (the un-normed residual) -> expert ids ``[T, k]``, weights ``[T, k]`` (fp32)."""
        h = self.norm(x.float()) * self.scale
        probs = torch.softmax(nn.functional.linear(h, self.proj), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights * self.per_expert_scale[ids]


class Gemma4MoE(nn.Module):
    """The MoE branch of a layer: routed experts between their own pre and post norms."""

    def __init__(self, router: Gemma4Router, experts: RoutedExperts, pre_norm: RMSNorm, post_norm: RMSNorm):
        super().__init__()
        self.router, self.experts, self.pre_norm, self.post_norm = router, experts, pre_norm, post_norm

    def forward(self, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = residual.reshape(-1, residual.shape[-1])
        ids, weights = self.router(flat)
        y = self.experts(self.pre_norm(flat).to(dtype), ids, weights)
        return self.post_norm(y.float()).reshape(residual.shape)


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, attn: GQAAttention, mlp: GatedMLP, norms: dict[str, RMSNorm], layer_scalar: torch.Tensor,
                 moe: Gemma4MoE | None, dtype: torch.dtype):
        super().__init__()
        self.self_attn, self.mlp, self.moe = attn, mlp, moe
        self.input_layernorm = norms["input_layernorm"]
        self.post_attention_layernorm = norms["post_attention_layernorm"]
        self.pre_feedforward_layernorm = norms["pre_feedforward_layernorm"]
        self.post_feedforward_layernorm = norms["post_feedforward_layernorm"]
        self.post_feedforward_layernorm_1 = norms.get("post_feedforward_layernorm_1")
        self.register_buffer("layer_scalar", layer_scalar.float().reshape(()))
        self.dtype = dtype
        self._next_norm: tuple[RMSNorm, ...] = ()  # see link_next

    def link_next(self, following: "Gemma4DecoderLayer | None") -> None:
        """Let this layer's last kernel also compute the following layer's normed input (one
        kernel fewer per layer), where both run on one device with the same eps. A tuple, so that
        the following layer's norm is not registered as a submodule of this one too."""
        mine, theirs = self.input_layernorm, None if following is None else following.input_layernorm
        linked = theirs is not None and theirs.weight.device == mine.weight.device and theirs.eps == mine.eps
        self._next_norm = (theirs,) if linked else ()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        """``x``: the fp32 residual stream. Each residual add goes with the norms around it
        (``residual_norm``: one kernel on CUDA for the casts, norms, add and ``layer_scalar``)."""
        eps = self.input_layernorm.eps  # every norm of the model has the config's rms_norm_eps
        h = _take_normed_input(batch, self.input_layernorm, x)
        if h is None:
            _, h = residual_norm(x, None, None, eps=eps, out_weight=self.input_layernorm.weight,
                                 out_dtype=self.dtype)
        a = self.self_attn(h, positions, batch)
        x, h = residual_norm(x, a, self.post_attention_layernorm.weight, eps=eps,
                             out_weight=self.pre_feedforward_layernorm.weight, out_dtype=self.dtype)
        m = self.mlp(h)
        if self.moe is not None:
            m = self.post_feedforward_layernorm_1(m.float()) + self.moe(x, self.dtype)
        following = self._next_norm[0] if self._next_norm and batch is not None else None
        x, h = residual_norm(x, m, self.post_feedforward_layernorm.weight, eps=eps, scale=self.layer_scalar,
                             out_weight=None if following is None else following.weight, out_dtype=self.dtype,
                             norm_out=following is not None)
        if following is not None:
            batch.memo[("gemma4_normed_input", id(following))] = (x, h)
        return x


def _take_normed_input(batch: ForwardBatch | None, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor | None:
    """The normed input the previous layer computed for ``norm`` with its last kernel, if it was
    computed from this very ``x`` (taken out of the step's memo: one alive at a time)."""
    if batch is None:
        return None
    entry = batch.memo.pop(("gemma4_normed_input", id(norm)), None)
    return entry[1] if entry is not None and entry[0] is x else None


class Gemma4ForCausalLM(DecoderStackLM):
    architectures = ("Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration", "Gemma4ForCausalLM")

    @classmethod
    def config_from_checkpoint(cls, checkpoint: Checkpoint) -> Gemma4Config:
        return Gemma4Config.from_model_config(checkpoint.config, checkpoint.config_path)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, options: RuntimeOptions, progress=None) -> "Gemma4ForCausalLM":
        cfg = cls.config_from_checkpoint(checkpoint)
        dt, hidden, pre = options.dtype, cfg.hidden_size, cfg.prefix
        skipped = [n for n in checkpoint.tensor_names() if n.startswith(MULTIMODAL_PREFIXES)]
        if skipped:
            log.info("Gemma 4: text model only; skipping %d vision/audio tensors (%s...)", len(skipped), skipped[0])

        def linear(key: str, n_in: int, n_out: int, opts: RuntimeOptions) -> Linear:
            return Linear(checkpoint.linear(key, in_features=n_in, out_features=n_out), n_in, n_out, opts)

        def norm(key: str, opts: RuntimeOptions, size: int = hidden) -> RMSNorm:
            w = checkpoint.tensor(key, device=opts.device)
            if tuple(w.shape) != (size,):
                raise CheckpointError(f"shape {list(w.shape)}, expected [{size}]", path=checkpoint.info(key).file,
                                      tensor=key)
            return RMSNorm(w, cfg.rms_norm_eps)

        embed_key = f"{pre}.embed_tokens.weight"
        embed = checkpoint.tensor(embed_key, dtype=dt, device=options.for_embedding().device)
        if tuple(embed.shape) != (cfg.vocab_size, hidden):
            raise CheckpointError(f"shape {list(embed.shape)} does not match vocab_size x hidden_size "
                                  f"[{cfg.vocab_size}, {hidden}] from config.json",
                                  path=checkpoint.info(embed_key).file, tensor=embed_key)

        ropes: dict[tuple, RotaryEmbedding] = {}
        layers = []
        for i, lc in enumerate(cfg.layers):
            p, o = f"{pre}.layers.{i}", options.for_layer(i)
            rope_key = (lc.rope, lc.head_dim, str(o.device))
            if rope_key not in ropes:  # one table per kind of layer and device, shared by its layers
                ropes[rope_key] = RotaryEmbedding(inverse_frequencies(lc.rope, lc.head_dim)).to(o.device)
            q_size, kv_size = cfg.num_heads * lc.head_dim, lc.num_kv_heads * lc.head_dim
            a = f"{p}.self_attn"
            has_v = checkpoint.linear_format(f"{a}.v_proj") is not None
            if lc.k_eq_v and has_v:
                raise CheckpointError("attention_k_eq_v is set but this full layer stores a v_proj",
                                      path=checkpoint.model_dir, tensor=f"{a}.v_proj")
            attn = GQAAttention(
                linear(f"{a}.q_proj", hidden, q_size, o),
                linear(f"{a}.k_proj", hidden, kv_size, o),
                None if lc.k_eq_v else linear(f"{a}.v_proj", hidden, kv_size, o),
                linear(f"{a}.o_proj", q_size, hidden, o),
                num_heads=cfg.num_heads, num_kv_heads=lc.num_kv_heads, head_dim=lc.head_dim,
                rope=ropes[rope_key], scale=1.0, window=lc.window, ring=lc.window is not None,
                q_norm=norm(f"{a}.q_norm.weight", o, lc.head_dim), k_norm=norm(f"{a}.k_norm.weight", o, lc.head_dim),
                v_norm=RMSNorm(None, cfg.rms_norm_eps), layer_idx=i,
            )
            mlp = GatedMLP(
                linear(f"{p}.mlp.gate_proj", hidden, cfg.intermediate_size, o),
                linear(f"{p}.mlp.up_proj", hidden, cfg.intermediate_size, o),
                linear(f"{p}.mlp.down_proj", cfg.intermediate_size, hidden, o),
                cfg.hidden_act,
            )
            norm_names = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                          "post_feedforward_layernorm"]
            moe = None
            if cfg.enable_moe_block:
                norm_names.append("post_feedforward_layernorm_1")
                moe = cls._load_moe(checkpoint, cfg, p, o, norm)
            norms = {name: norm(f"{p}.{name}.weight", o) for name in norm_names}
            scalar_key = f"{p}.layer_scalar"
            scalar = checkpoint.tensor(scalar_key, device=o.device) if checkpoint.has_tensor(scalar_key) \
                else torch.ones((), device=o.device)
            if scalar.numel() != 1:
                raise CheckpointError(f"shape {list(scalar.shape)}, expected [1]", path=checkpoint.info(scalar_key).file,
                                      tensor=scalar_key)
            layers.append(Gemma4DecoderLayer(attn, mlp, norms, scalar, moe, dt))
            if progress is not None:
                progress(i + 1, cfg.num_layers + 1)

        # EXL3 converters always write a separate, quantized lm_head (quantized from the
        # tied embedding); unquantized checkpoints tie it to the embedding.
        head = options.for_head()
        if checkpoint.linear_format("lm_head") is not None or not cfg.tie_word_embeddings:
            lm_head = linear("lm_head", hidden, cfg.vocab_size, head)
        else:
            lm_head = Linear(DenseWeight(embed, key=f"{pre}.embed_tokens"), hidden, cfg.vocab_size, head)
        for layer, following in zip(layers, layers[1:] + [None]):
            layer.link_next(following)
        model = cls(cfg, options, embed, layers, norm(f"{pre}.norm.weight", head), lm_head)
        if progress is not None:
            progress(cfg.num_layers + 1, cfg.num_layers + 1)
        return model

    @staticmethod
    def _load_moe(checkpoint: Checkpoint, cfg: Gemma4Config, p: str, o: RuntimeOptions, norm) -> Gemma4MoE:
        def dense(key: str, shape: tuple[int, ...]) -> torch.Tensor:
            t = checkpoint.tensor(key, device=o.device)
            if tuple(t.shape) != shape:
                raise CheckpointError(f"shape {list(t.shape)}, expected {list(shape)}", path=checkpoint.info(key).file,
                                      tensor=key)
            return t

        e, h = cfg.num_experts, cfg.hidden_size
        router = Gemma4Router(dense(f"{p}.router.proj.weight", (e, h)), dense(f"{p}.router.scale", (h,)),
                              dense(f"{p}.router.per_expert_scale", (e,)), cfg.top_k_experts, cfg.rms_norm_eps)
        experts = load_routed_experts(checkpoint, f"{p}.experts", num_experts=e, hidden_size=h,
                                      intermediate_size=cfg.moe_intermediate_size, activation=cfg.hidden_act,
                                      options=o)
        return Gemma4MoE(router, experts, norm(f"{p}.pre_feedforward_layernorm_2.weight", o),
                         norm(f"{p}.post_feedforward_layernorm_2.weight", o))

    # ------------------------------------------------------------- forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The fp32 residual stream starts as the scaled embedding."""
        return self.embed_tokens[input_ids.to(self.embed_tokens.device)].float() * self.config.embed_scale

    def head(self, x: torch.Tensor) -> torch.Tensor:
        _, h = residual_norm(x, None, None, eps=self.norm.eps, out_weight=self.norm.weight,
                             out_dtype=self.options.dtype)
        return softcap(self.lm_head(h), self.config.final_logit_softcapping)

    def cache_spec(self) -> list[LayerCacheSpec]:
        return [kv_spec(lc.num_kv_heads, lc.head_dim, self.options.dtype, self.options.for_layer(i).device,
                        window=lc.window, ring=lc.window is not None)
                for i, lc in enumerate(self.config.layers)]
