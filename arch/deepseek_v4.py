"""DeepSeek-V4 (``DeepseekV4ForCausalLM``, e.g. DeepSeek-V4-Flash), EXL3 or unquantized.

The math is architectures.md §2 (transformers ``modeling_deepseek_v4`` is the oracle in the tests):

* the residual is 4 mHC streams (``arch.blocks.mhc``): embedding copied into every stream, a
  ``HyperSite`` around attention and around the MoE, ``HyperHead`` collapse before the final norm;
* attention (``arch.blocks.dsv4_attention``): q low-rank path, shared K = V head, partial
  interleaved RoPE on the trailing dims with de-rotation of the output, per-head sinks, grouped
  low-rank output; layer kinds by compress ratio: 0 sliding only, 4 CSA (overlapping compressor +
  lightning indexer), 128 HCA (non-overlapping compressor);
* MoE (``arch.blocks.routing_dsv4``): sqrt-softplus scores, bias-steered top-k or hash routing on
  the first ``num_hash_layers`` layers, routed scaling, shared expert, SwiGLU clamp.

Checkpoints come with DeepSeek's native tensor names (``layers.N.attn.wq_a``, ``embed.weight``,
``hc_head_fn``...) and config keys (``compress_ratios``, ``num_hash_layers``,
``qk_rope_head_dim``, ``rope_scaling``), or as transformers writes them (``model.`` prefix,
``layer_types``/``mlp_layer_types``, ``rope_parameters`` per rope type). ``TensorNames`` maps the
native names onto whatever the checkpoint has, in one place; the adapter asks for native names.

Where the references disagree (architectures.md §2.8), this adapter follows:

* indexer: transformers/ds4 semantics (top-k over the visible entries); ExLlamaV3 skips the
  indexer while every entry fits in top-k, which is the same function. We always score but keep
  everything when top-k covers all entries.
* causality: transformers' forward is not prefix-consistent once the indexer becomes selective
  (golden README caveat); ours is causal by construction: the indexer of query ``t`` only ever
  sees entries whose windows closed by ``t``, and prefill/full forward/decode share one function.
* precision: like transformers, mHC, norms, routers, sinks, the compressor softmax and the
  attention softmax run in fp32; projections run in the compute dtype (fp16 on GPU, like
  ExLlamaV3).
* YaRN on the compress rope only, magnitude factor 1 (all three references agree).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import CheckpointError, ConfigError
from ..options import RuntimeOptions
from .base import CausalLM
from .batch import ForwardBatch, running
from .blocks.compressor import KVCompressor
from .blocks.dspark import BlockDraft, DSparkConfig, DSparkDrafter
from .blocks.dsv4_attention import DSV4Attention, GroupedOutput, LightningIndexer
from .blocks.linear import Linear
from .blocks.mhc import HyperHead, HyperSite, expand, run_sites
from .blocks.mlp import GatedMLP
from .blocks.moe import load_routed_experts
from .blocks.norm import RMSNorm
from .blocks.routing_dsv4 import SharedExpertMoE, SqrtSoftplusRouter
from .blocks.rope_interleaved import default_inverse_frequencies, yarn_inverse_frequencies
from .cache_spec import LayerCacheSpec, PagedTensorSpec
from .config_reader import ConfigReader

log = logging.getLogger(__name__)

SLIDING, CSA, HCA = 0, 4, 128  # kinds by role; the actual ratios come from the config
_TF_LAYER_TYPES = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
                   "heavily_compressed_attention": "hca"}


@dataclass(frozen=True)
class YarnConfig:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class DeepseekV4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]  # per layer: 0 (sliding only), the CSA ratio, or the HCA ratio
    csa_ratio: int
    hash_layers: tuple[bool, ...]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    num_experts: int
    top_k: int
    n_shared_experts: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    swiglu_limit: float | None
    rms_norm_eps: float
    rope_theta: float
    compress_rope_theta: float
    compress_yarn: YarnConfig | None
    tie_word_embeddings: bool = False
    mtp_compress_ratios: tuple[int, ...] = ()  # ``compress_ratios`` entries past the trunk (MTP blocks)
    dspark: DSparkConfig | None = None  # the ``dspark_*`` keys of checkpoints with a DSpark block drafter

    def main_inverse_frequencies(self) -> torch.Tensor:
        return default_inverse_frequencies(self.rope_theta, self.rope_dim)

    def compress_inverse_frequencies(self) -> torch.Tensor:
        if self.compress_yarn is None:
            return default_inverse_frequencies(self.compress_rope_theta, self.rope_dim)
        y = self.compress_yarn
        return yarn_inverse_frequencies(self.compress_rope_theta, self.rope_dim, factor=y.factor,
                                        original_max_position_embeddings=y.original_max_position_embeddings,
                                        beta_fast=y.beta_fast, beta_slow=y.beta_slow)

    @staticmethod
    def from_hf(cfg: dict, path) -> "DeepseekV4Config":
        r = ConfigReader(cfg, path)
        n = r.get("num_hidden_layers", int)
        heads = r.get("num_attention_heads", int)
        head_dim = r.get("head_dim", int)
        r.require("num_key_value_heads", (1,), r.get("num_key_value_heads", int, 1),
                  "DeepSeek-V4 has one shared K = V head")
        r.require("scoring_func", ("sqrtsoftplus",), r.get("scoring_func", str, "sqrtsoftplus"))
        r.require("hidden_act", ("silu",), r.get("hidden_act", str, "silu"))
        r.require("norm_topk_prob", (True,), r.get("norm_topk_prob", bool, True))
        shared = r.get("n_shared_experts", int, 1)
        r.require("n_shared_experts", (0, 1), shared)

        # compress rates: native compress_rate_csa/hca, transformers compress_rates
        rates = {"csa": 4, "hca": 128}
        if r.has("compress_rates"):
            sec = r.section("compress_rates")
            rates = {"csa": sec.get("compressed_sparse_attention", int, 4),
                     "hca": sec.get("heavily_compressed_attention", int, 128)}
        rates["csa"] = r.get("compress_rate_csa", int, rates["csa"])
        rates["hca"] = r.get("compress_rate_hca", int, rates["hca"])

        # per-layer kind: native compress_ratios (may run past the trunk to describe MTP blocks) or layer_types
        if r.has("compress_ratios"):
            ratios = list(r.get("compress_ratios", list))
            if len(ratios) < n:
                raise ConfigError(f"key 'compress_ratios' has {len(ratios)} entries, the model has {n} layers",
                                  path=path)
            for v in ratios:
                r.require("compress_ratios", (0, rates["csa"], rates["hca"]), v)
            ratios, mtp_ratios = ratios[:n], ratios[n:]
        elif r.has("layer_types"):
            types = r.get("layer_types", list)
            if len(types) != n:
                raise ConfigError(f"key 'layer_types' has {len(types)} entries, the model has {n} layers", path=path)
            for v in types:
                r.require("layer_types", tuple(_TF_LAYER_TYPES), v)
            ratios = [{"sliding": 0, "csa": rates["csa"], "hca": rates["hca"]}[_TF_LAYER_TYPES[v]] for v in types]
            mtp_ratios = []
        else:
            raise ConfigError("neither 'compress_ratios' (DeepSeek) nor 'layer_types' (transformers) says which "
                              "layers compress their KV", path=path)

        if r.has("mlp_layer_types") and not r.has("num_hash_layers"):
            kinds = r.get("mlp_layer_types", list)
            if len(kinds) != n:
                raise ConfigError(f"key 'mlp_layer_types' has {len(kinds)} entries, the model has {n} layers",
                                  path=path)
            for v in kinds:
                r.require("mlp_layer_types", ("hash_moe", "moe"), v)
            hashed = [v == "hash_moe" for v in kinds]
        else:
            n_hash = r.get("num_hash_layers", int, 3)
            hashed = [i < n_hash for i in range(n)]

        if r.has("qk_rope_head_dim"):
            rope_dim = r.get("qk_rope_head_dim", int)
        else:
            rope_dim = int(head_dim * r.get("partial_rotary_factor", float, 64 / 512))
        if rope_dim % 2 or not 0 < rope_dim <= head_dim:
            raise ConfigError(f"rope dims {rope_dim} (key 'qk_rope_head_dim' or 'partial_rotary_factor') must be "
                              f"even and at most head_dim {head_dim}", path=path)

        rope_theta = r.get("rope_theta", float, 10000.0)
        compress_theta = r.get("compress_rope_theta", float, 160000.0)
        yarn = None
        params = r.section("rope_parameters") if r.has("rope_parameters") else None
        if params is not None and params.has("main") and params.has("compress"):
            main, comp = params.section("main"), params.section("compress")
            rope_theta = main.get("rope_theta", float, rope_theta)
            main.require("rope_type", ("default",), main.get("rope_type", str, "default"))
            compress_theta = comp.get("rope_theta", float, compress_theta)
            yarn = _yarn(comp)
        else:
            scaling = params if params is not None else (r.section("rope_scaling") if r.has("rope_scaling") else None)
            if scaling is not None:
                yarn = _yarn(scaling)

        o_groups = r.get("o_groups", int, 8)
        if heads % o_groups:
            raise ConfigError(f"num_attention_heads {heads} is not a multiple of 'o_groups' {o_groups}", path=path)
        limit = r.get("swiglu_limit", float, 10.0)
        dspark = _dspark_config(r, n, r.get("vocab_size", int), path)
        return DeepseekV4Config(
            vocab_size=r.get("vocab_size", int), hidden_size=r.get("hidden_size", int), num_layers=n,
            num_heads=heads, head_dim=head_dim, rope_dim=rope_dim, q_lora_rank=r.get("q_lora_rank", int),
            o_groups=o_groups, o_lora_rank=r.get("o_lora_rank", int), sliding_window=r.get("sliding_window", int),
            compress_ratios=tuple(ratios), csa_ratio=rates["csa"], hash_layers=tuple(hashed),
            index_n_heads=r.get("index_n_heads", int, 64), index_head_dim=r.get("index_head_dim", int, 128),
            index_topk=r.get("index_topk", int, 512), hc_mult=r.get("hc_mult", int, 4),
            hc_sinkhorn_iters=r.get("hc_sinkhorn_iters", int, 20), hc_eps=r.get("hc_eps", float, 1e-6),
            num_experts=r.get("n_routed_experts", int), top_k=r.get("num_experts_per_tok", int),
            n_shared_experts=shared, moe_intermediate_size=r.get("moe_intermediate_size", int),
            routed_scaling_factor=r.get("routed_scaling_factor", float, 1.0),
            swiglu_limit=limit if limit and limit > 0 else None, rms_norm_eps=r.get("rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta, compress_rope_theta=compress_theta, compress_yarn=yarn,
            tie_word_embeddings=r.get("tie_word_embeddings", bool, False), mtp_compress_ratios=tuple(mtp_ratios),
            dspark=dspark,
        )

    def kind(self, layer: int) -> str:
        return self.kind_of(self.compress_ratios[layer])

    def kind_of(self, ratio: int) -> str:
        return "sliding" if ratio == 0 else ("csa" if ratio == self.csa_ratio else "hca")


def _dspark_config(r: ConfigReader, num_layers: int, vocab: int, path) -> DSparkConfig | None:
    """The DSpark drafter's keys (ExLlamaV3 ``DeepseekV4Config``); None when the config has none."""
    if not r.has("dspark_target_layer_ids"):
        return None
    targets = [int(t) for t in r.get("dspark_target_layer_ids", list)]
    if not targets or any(not 0 <= t < num_layers for t in targets) or len(set(targets)) != len(targets):
        raise ConfigError(f"key 'dspark_target_layer_ids' is {targets}: need distinct trunk layer ids in "
                          f"[0, {num_layers})", path=path)
    block = r.get("dspark_block_size", int, 0)
    if block < 1:
        raise ConfigError(f"key 'dspark_block_size' is {block}: a DSpark drafter needs a block of at least "
                          "one token", path=path)
    noise = r.get("dspark_noise_token_id", int, 0)
    if not 0 <= noise < vocab:
        raise ConfigError(f"key 'dspark_noise_token_id' is {noise}, outside the vocabulary [0, {vocab})", path=path)
    rank = r.get("dspark_markov_rank", int, 256)
    if rank < 1:
        raise ConfigError(f"key 'dspark_markov_rank' is {rank}; must be >= 1", path=path)
    # taps are concatenated in layer order, as ExLlamaV3 collects them while the trunk runs
    return DSparkConfig(block_size=block, noise_token_id=noise, markov_rank=rank, target_layers=tuple(sorted(targets)))


def _yarn(params: ConfigReader) -> YarnConfig | None:
    kind = params.get("rope_type", str, None) or params.get("type", str, "default")
    params.require("rope_type", ("default", "yarn"), kind)
    if kind != "yarn":
        return None
    return YarnConfig(factor=params.get("factor", float),
                      original_max_position_embeddings=params.get("original_max_position_embeddings", int),
                      beta_fast=params.get("beta_fast", float, 32.0), beta_slow=params.get("beta_slow", float, 1.0))


# ---------------------------------------------------------------- tensor names

# transformers' in-memory names, from DeepSeek's (its conversion_mapping "deepseek_v4", in order)
_TO_TRANSFORMERS = [
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight", "embed_tokens.weight"), (r"^hc_head_fn", "hc_head.hc_fn"),
    (r"^hc_head_base", "hc_head.hc_base"), (r"^hc_head_scale", "hc_head.hc_scale"),
    (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_fn", ".attn_hc.fn"), (r"\.hc_attn_base", ".attn_hc.base"), (r"\.hc_attn_scale", ".attn_hc.scale"),
    (r"\.hc_ffn_fn", ".ffn_hc.fn"), (r"\.hc_ffn_base", ".ffn_hc.base"), (r"\.hc_ffn_scale", ".ffn_hc.scale"),
    (r"\.attn_sink", ".sinks"), (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."),
    (r"\.ape", ".position_bias"), (r"\.wq_a\.", ".q_a_proj."), (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."), (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."), (r"\.gate\.bias", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."), (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]


class TensorNames:
    """Native DeepSeek-V4 tensor names -> the names this checkpoint uses.

    Three spellings are accepted: DeepSeek's own (``embed.weight``, ``layers.0.attn.kv_norm``,
    ``hc_head_fn``; some exports write ``hc_head.hc_fn``), what transformers' ``save_pretrained``
    writes (the native names under ``model.``, with ``embed_tokens``, ``hc_head.hc_fn`` and
    ``attn.norm`` for the kv norm; ``head.weight`` stays at the top), and transformers'
    in-memory names (``model.layers.0.self_attn.q_a_proj``...).
    """

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    def _exists(self, name: str) -> bool:
        ck = self.checkpoint
        if name.endswith((".weight", ".bias")) or ck.has_tensor(name):
            return ck.has_tensor(name)
        return ck.linear_format(name) is not None

    @staticmethod
    def resolve(native: str, has_tensor) -> str | None:
        """The spelling of a module key (``native`` without ``.weight``) or tensor among ``has_tensor``'s names."""
        for name in TensorNames.candidates(native):
            if has_tensor(name) or has_tensor(f"{name}.weight"):
                return name
        return None

    @staticmethod
    def candidates(native: str) -> list[str]:
        out = [native, re.sub(r"(^|\.)hc_head_(fn|base|scale)$", r"\1hc_head.hc_\2", native)]
        saved = native
        if native == "embed.weight":
            saved = "model.embed_tokens.weight"
        elif native.startswith("hc_head_"):
            saved = "model.hc_head.hc_" + native[len("hc_head_"):]
        elif not native.startswith("head"):
            saved = "model." + re.sub(r"\.attn\.kv_norm(\.|$)", r".attn.norm\1", native)
        out.append(saved)
        # the patterns expect a trailing ".weight" (linear keys are named without it)
        suffixed = native.endswith((".weight", ".bias"))
        memory = native if suffixed else native + ".weight"
        for pattern, repl in _TO_TRANSFORMERS:
            memory = re.sub(pattern, repl, memory)
        memory = memory if suffixed else memory[: -len(".weight")]
        out.append(memory if memory.startswith("lm_head") or native == "head" else "model." + memory)
        if native == "head":
            out.append("lm_head")
        return list(dict.fromkeys(out))

    def __call__(self, native: str, required: bool = True) -> str | None:
        for name in self.candidates(native):
            if self._exists(name):
                return name
        if required:
            raise CheckpointError(f"missing; looked for {', '.join(self.candidates(native))}",
                                  path=self.checkpoint.model_dir, tensor=native)
        return None


# ---------------------------------------------------------------- model


class DSV4DecoderLayer(nn.Module):
    """Two mHC sites: attention (with ``attn_norm``) and MoE (with ``ffn_norm``)."""

    def __init__(self, attn_site: HyperSite, attn_norm: RMSNorm, attn: DSV4Attention, ffn_site: HyperSite,
                 ffn_norm: RMSNorm, moe: SharedExpertMoE, dtype: torch.dtype):
        super().__init__()
        self.attn_site, self.input_layernorm, self.attn = attn_site, attn_norm, attn
        self.ffn_site, self.ffn_norm, self.moe = ffn_site, ffn_norm, moe
        self.dtype = dtype

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch | None,
                input_ids: torch.Tensor) -> torch.Tensor:
        """``x [T, N, D]`` fp32 streams of packed tokens (with a batch) or ``[B, T, N, D]`` (without)."""
        if batch is None:  # whole sequences: attention per sequence, the rest on all rows
            b, t = x.shape[:2]
            flat = x.reshape(b * t, *x.shape[2:])

            def attend(y):
                return self.attn(y.view(b, t, -1), positions, None).reshape(b * t, -1)
            flat = self.sites(flat, attend, input_ids.reshape(-1))
            return flat.view(x.shape)
        return self.sites(x, lambda y: self.attn(y, positions, batch), input_ids)

    def sites(self, x: torch.Tensor, attend, ids: torch.Tensor) -> torch.Tensor:
        """Both mHC sites on flat rows ``x [R, N, D]``; ``attend`` maps the normed attention input to its output
        (the trunk attends causally, the DSpark drafter over its main-kv and block)."""
        return run_sites(x, (self.attn_site, lambda h: attend(h).float(), self.input_layernorm, self.dtype),
                         (self.ffn_site, lambda h: self.moe(h, ids).float(), self.ffn_norm, self.dtype))


class DSV4MtpBlock(nn.Module):
    """Classic DeepSeek MTP depth (architectures.md §2.7, ds4 ``mtp.0.*``).

    Input streams ``e + h_i`` with ``e = e_proj(enorm(embed[next token]))`` (the same in every
    stream) and ``h_i = h_proj(hnorm(X_i))`` from the previous depth's 4-stream state ``X``
    (depth 1: the trunk's, before ``hc_head``); then one V4 block; output ``head(norm(hc_head(X')))``
    with the trunk's head. ``X'`` seeds the next depth.
    """

    def __init__(self, e_proj: Linear, h_proj: Linear, enorm: RMSNorm, hnorm: RMSNorm, layer: DSV4DecoderLayer,
                 hc_head: HyperHead, norm: RMSNorm):
        super().__init__()
        self.e_proj, self.h_proj, self.enorm, self.hnorm = e_proj, h_proj, enorm, hnorm
        self.layer, self.hc_head, self.norm = layer, hc_head, norm

    def streams(self, embedded: torch.Tensor, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``embedded [T, D]`` (next tokens), ``hidden [T, N, D]`` -> the block's input streams (fp32)."""
        e = self.e_proj(self.enorm(embedded).to(dtype)).float()
        h = self.h_proj(self.hnorm(hidden.float()).to(dtype)).float()
        return e[:, None, :] + h


class DeepseekV4ForCausalLM(CausalLM):
    architectures = ("DeepseekV4ForCausalLM",)
    has_mtp = True

    def __init__(self, config: DeepseekV4Config, options: RuntimeOptions, embed: torch.Tensor,
                 layers: list[DSV4DecoderLayer], hc_head: HyperHead, norm: RMSNorm, lm_head: Linear,
                 mtp: list[DSV4MtpBlock] = (), dspark: DSparkDrafter | None = None):
        super().__init__(config, options)
        self.register_buffer("embed_tokens", embed)
        self.layers = nn.ModuleList(layers)
        self.hc_head, self.norm, self.lm_head = hc_head, norm, lm_head
        self.mtp = nn.ModuleList(mtp)
        self.dspark = dspark

    @property
    def mtp_depth(self) -> int:
        return len(self.mtp)

    @property
    def block_drafter(self) -> DSparkDrafter | None:
        return self.dspark

    @classmethod
    def config_from_checkpoint(cls, checkpoint: Checkpoint) -> DeepseekV4Config:
        return DeepseekV4Config.from_hf(checkpoint.config, checkpoint.config_path)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, options: RuntimeOptions, progress=None):
        cfg = cls.config_from_checkpoint(checkpoint)
        loader = _Loader(checkpoint, cfg, options)
        layers = []
        for i in range(cfg.num_layers):
            layers.append(loader.layer(i))
            if progress is not None:
                progress(i + 1, cfg.num_layers + 1)
        embed, hc_head, norm, lm_head = loader.top()
        model = cls(cfg, options, embed, layers, hc_head, norm, lm_head, loader.mtp_blocks(), loader.dspark())
        if progress is not None:
            progress(cfg.num_layers + 1, cfg.num_layers + 1)
        return model

    # ------------------------------------------------------------- forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return expand(self.embed_tokens[input_ids.to(self.embed_tokens.device)], self.config.hc_mult)

    def head(self, streams: torch.Tensor, hc_head: HyperHead | None = None, norm: RMSNorm | None = None) -> torch.Tensor:
        """Streams ``[..., N, D]`` -> fp32 logits ``[..., vocab]`` (an MTP depth passes its own collapse and norm)."""
        hc_head, norm = hc_head or self.hc_head, norm or self.norm
        y = hc_head(streams.reshape(-1, *streams.shape[-2:])).view(*streams.shape[:-2], streams.shape[-1])
        return self.lm_head(norm(y).to(self.options.dtype)).float()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = self.default_positions(input_ids)
        x = self.embed(input_ids)
        for layer in self.layers:
            dev = layer.input_layernorm.weight.device
            x = layer(x.to(dev), positions.to(dev), None, input_ids.to(dev))
        return self.head(x.to(self.norm.weight.device))

    def forward_batch(self, input_ids: torch.Tensor, batch: ForwardBatch,
                      logits_rows: torch.Tensor | None = None, return_hidden: bool = False):
        """Logits of ``logits_rows``; with ``return_hidden`` also every row's final 4-stream state
        ``[T, N, D]`` (before ``hc_head``), which seeds MTP depth 1."""
        targets = self.dspark.cfg.target_layers if self.dspark is not None else ()
        taps = []
        with running(batch):
            x = self.embed(input_ids)
            for i, layer in enumerate(self.layers):
                dev = layer.input_layernorm.weight.device
                on_dev = batch.on(dev)
                x = layer(x.to(dev), on_dev.positions, on_dev, input_ids.to(dev))
                if i in targets:  # the DSpark taps: stream means after the layer
                    taps.append(x.mean(dim=-2).to(self.dspark.device))
            if taps:
                self.dspark.write_main_kv(torch.cat(taps, dim=-1), batch)
            logits = self._rows_head(x, logits_rows)
            return (logits, x) if return_hidden else logits

    def _rows_head(self, x, logits_rows, hc_head=None, norm=None):
        head_dev = self.norm.weight.device
        x = x.to(head_dev)
        if logits_rows is not None:
            x = x[logits_rows.to(head_dev)]
        return self.head(x, hc_head, norm)

    def mtp_forward(self, depth: int, hidden: torch.Tensor, next_ids: torch.Tensor, batch: ForwardBatch,
                    logits_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not 1 <= depth <= self.mtp_depth:
            raise ValueError(f"MTP depth {depth} requested; this checkpoint has {self.mtp_depth}")
        block = self.mtp[depth - 1]
        dev = block.layer.input_layernorm.weight.device
        with running(batch):
            on_dev = batch.on(dev)
            x = block.streams(self.embed_tokens[next_ids.to(self.embed_tokens.device)].to(dev), hidden.to(dev),
                              self.options.dtype)
            x = block.layer(x, on_dev.positions, on_dev, next_ids.to(dev))
            return self._rows_head(x, logits_rows, block.hc_head, block.norm), x

    def draft_block(self, seeds: torch.Tensor, starts: torch.Tensor, ring_bases: torch.Tensor, cache) -> BlockDraft:
        if self.dspark is None:
            raise NotImplementedError(f"{type(self).__name__}: this checkpoint has no DSpark block drafter")

        def embed(ids):
            return self.embed_tokens[ids.to(self.embed_tokens.device)]

        return self.dspark.draft(seeds, starts, ring_bases, cache, embed, self.lm_head)

    def cache_spec(self) -> list[LayerCacheSpec]:
        """One ring per layer (kv rows and compressor rows per position), then the compressed
        pools of the CSA/HCA layers in shared pages, in layer order (``DSV4Attention.pool_idx``);
        then the same for the MTP depths; then the DSpark drafter's main-kv rings."""
        trunk = self._specs([(layer, self.options.for_layer(i).device) for i, layer in enumerate(self.layers)])
        mtp = self._specs([(b.layer, b.layer.input_layernorm.weight.device) for b in self.mtp])
        return trunk + mtp + (self.dspark.cache_specs() if self.dspark is not None else [])

    def _specs(self, layers) -> list[LayerCacheSpec]:
        dt, cfg = self.options.dtype, self.config
        rings, pools = [], []
        for layer, dev in layers:
            attn = layer.attn
            tensors = [PagedTensorSpec("kv", (cfg.head_dim,), dt)]
            entries = []
            if attn.compressor is not None:
                c = attn.compressor
                tensors += [PagedTensorSpec("comp_kv", (c.width,), dt),
                            PagedTensorSpec("comp_gate", (c.width,), torch.float32)]
                entries.append(PagedTensorSpec("pool", (c.head_dim,), dt, tokens_per_entry=c.ratio))
            if attn.indexer is not None:
                c = attn.indexer.compressor
                tensors += [PagedTensorSpec("idx_kv", (c.width,), dt),
                            PagedTensorSpec("idx_gate", (c.width,), torch.float32)]
                entries.append(PagedTensorSpec("idx_pool", (c.head_dim,), dt, tokens_per_entry=c.ratio))
            rings.append(LayerCacheSpec(paged=tuple(tensors), window=attn.ring_window, device=torch.device(dev),
                                        ring=True))
            if entries:
                pools.append(LayerCacheSpec(paged=tuple(entries), device=torch.device(dev)))
        return rings + pools


class _Loader:
    """Reads one layer at a time by native names (``TensorNames`` finds the checkpoint's spelling)."""

    def __init__(self, checkpoint: Checkpoint, cfg: DeepseekV4Config, options: RuntimeOptions):
        self.ck, self.cfg, self.options = checkpoint, cfg, options
        self.names = TensorNames(checkpoint)
        self.main_freq = cfg.main_inverse_frequencies()
        self.compress_freq = cfg.compress_inverse_frequencies()
        # cache entries: trunk rings, trunk pools, MTP rings, MTP pools (``cache_spec`` order)
        self.next_pool = cfg.num_layers
        self.mtp_keys = self._mtp_depths()
        self.first_mtp = cfg.num_layers + sum(1 for r in cfg.compress_ratios if r)
        self.next_mtp_pool = self.first_mtp + len(self.mtp_keys)
        self.dspark_blocks = self._dspark_blocks() if not self.mtp_keys else 0

    def _mtp_depths(self) -> list[str]:
        """Prefixes of the classic MTP depths present (``mtp.K.e_proj``)."""
        depths = []
        while self.names(f"mtp.{len(depths)}.e_proj", required=False) is not None:
            depths.append(f"mtp.{len(depths)}")
        return depths

    def _dspark_blocks(self) -> int:
        """How many DSpark drafter blocks (``mtp.K.attn.wkv``) follow ``mtp.0.main_proj``; 0 without a drafter,
        or (with a warning) when the config lacks the ``dspark_*`` keys that say how to run it."""
        if self.names("mtp.0.main_proj", required=False) is None:
            return 0
        if self.cfg.dspark is None:
            log.warning("%s: this checkpoint ships a DSpark block drafter (mtp.0.main_proj) but config.json has no "
                        "'dspark_target_layer_ids'; the drafter is ignored (MTP drafting unavailable)",
                        self.ck.model_dir)
            return 0
        n = 0
        while self.names(f"mtp.{n}.attn.wkv", required=False) is not None:
            n += 1
        if n == 0:
            raise CheckpointError("a DSpark drafter (mtp.0.main_proj) without blocks", path=self.ck.model_dir,
                                  tensor="mtp.0.attn.wkv")
        for k, ratio in enumerate(self.cfg.mtp_compress_ratios[:n]):
            if ratio:  # ExLlamaV3 asserts the same: the drafter's attention has no compressor
                raise ConfigError(f"key 'compress_ratios' gives DSpark block {k} ratio {ratio}; DSpark blocks are "
                                  "sliding-only (ratio 0)", path=self.ck.config_path)
        return n

    def tensor(self, native: str, shape: tuple[int, ...], opts: RuntimeOptions, dtype=None) -> torch.Tensor:
        name = self.names(native)
        t = self.ck.tensor(name, device=opts.device, dtype=dtype)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"shape {list(t.shape)}, expected {list(shape)} from config.json",
                                  path=self.ck.info(name).file, tensor=name)
        return t

    def linear(self, native: str, n_in: int, n_out: int, opts: RuntimeOptions) -> Linear:
        key = self.names(native)
        return Linear(self.ck.linear(key, in_features=n_in, out_features=n_out), n_in, n_out, opts)

    def norm(self, native: str, size: int, opts: RuntimeOptions) -> RMSNorm:
        return RMSNorm(self.tensor(native, (size,), opts), self.cfg.rms_norm_eps)

    def site(self, prefix: str, opts: RuntimeOptions) -> HyperSite:
        n, h = self.cfg.hc_mult, self.cfg.hidden_size
        m = (2 + n) * n
        return HyperSite(self.tensor(f"{prefix}_fn", (m, n * h), opts), self.tensor(f"{prefix}_scale", (3,), opts),
                         self.tensor(f"{prefix}_base", (m,), opts), n, eps=self.cfg.rms_norm_eps,
                         pre_eps=self.cfg.hc_eps, sinkhorn_iters=self.cfg.hc_sinkhorn_iters,
                         sinkhorn_eps=self.cfg.hc_eps)

    def compressor(self, p: str, ratio: int, head_dim: int, overlap: bool, opts: RuntimeOptions) -> KVCompressor:
        width = (2 if overlap else 1) * head_dim
        h = self.cfg.hidden_size
        return KVCompressor(self.linear(f"{p}.wkv", h, width, opts), self.linear(f"{p}.wgate", h, width, opts),
                            self.tensor(f"{p}.ape", (ratio, width), opts), self.norm(f"{p}.norm.weight", head_dim, opts),
                            ratio=ratio, head_dim=head_dim, overlap=overlap, inv_freq=self.compress_freq)

    def grouped_output(self, a: str, opts: RuntimeOptions) -> GroupedOutput:
        cfg = self.cfg
        g, rank = cfg.o_groups, cfg.o_lora_rank
        per_group = cfg.num_heads * cfg.head_dim // g
        first = self.names(f"{a}.wo_a.0", required=False)
        if first is not None:  # EXL3 (the converter's layout): one quantized linear per group, wo_a.{k}
            base = first[: -len(".0")]
            wo_a = [Linear(self.ck.linear(f"{base}.{k}", in_features=per_group, out_features=rank), per_group,
                           rank, opts) for k in range(g)]
        else:
            from ..kernels.weights import DenseWeight

            name = self.names(f"{a}.wo_a.weight")
            w = self.ck.tensor(name, device=opts.device)
            if tuple(w.shape) != (g * rank, per_group):
                raise CheckpointError(f"shape {list(w.shape)}, expected [{g * rank}, {per_group}] "
                                      "(o_groups * o_lora_rank, heads * head_dim / o_groups)",
                                      path=self.ck.info(name).file, tensor=name)
            # group k reads head group k and writes rows [k rank, (k+1) rank); keyed as the converter writes it
            base = name[: -len(".weight")]
            wo_a = [Linear(DenseWeight(w[k * rank:(k + 1) * rank], key=f"{base}.{k}"), per_group, rank, opts)
                    for k in range(g)]
        return GroupedOutput(wo_a, self.linear(f"{a}.wo_b", g * rank, cfg.hidden_size, opts))

    def attention(self, p: str, ratio: int, layer_idx: int, pool_idx: int | None, opts: RuntimeOptions) -> DSV4Attention:
        cfg, a = self.cfg, f"{p}.attn"
        h, hd = cfg.hidden_size, cfg.head_dim
        kind = cfg.kind_of(ratio)
        compressor = indexer = None
        if kind == "hca":
            compressor = self.compressor(f"{a}.compressor", ratio, hd, False, opts)
        elif kind == "csa":
            compressor = self.compressor(f"{a}.compressor", ratio, hd, True, opts)
            ih, idim = cfg.index_n_heads, cfg.index_head_dim
            indexer = LightningIndexer(
                self.linear(f"{a}.indexer.wq_b", cfg.q_lora_rank, ih * idim, opts),
                self.tensor(f"{a}.indexer.weights_proj.weight", (ih, h), opts),
                self.compressor(f"{a}.indexer.compressor", ratio, idim, True, opts),
                num_heads=ih, head_dim=idim, topk=cfg.index_topk, inv_freq=self.compress_freq)
        return DSV4Attention(
            wq_a=self.linear(f"{a}.wq_a", h, cfg.q_lora_rank, opts),
            q_norm=self.norm(f"{a}.q_norm.weight", cfg.q_lora_rank, opts),
            wq_b=self.linear(f"{a}.wq_b", cfg.q_lora_rank, cfg.num_heads * hd, opts),
            wkv=self.linear(f"{a}.wkv", h, hd, opts), kv_norm=self.norm(f"{a}.kv_norm.weight", hd, opts),
            output=self.grouped_output(a, opts), sink=self.tensor(f"{a}.attn_sink", (cfg.num_heads,), opts),
            num_heads=cfg.num_heads, head_dim=hd, window=cfg.sliding_window,
            inv_freq=self.main_freq if kind == "sliding" else self.compress_freq, eps=cfg.rms_norm_eps,
            layer_idx=layer_idx, compressor=compressor, indexer=indexer, pool_idx=pool_idx)

    def moe(self, p: str, hashed: bool, opts: RuntimeOptions) -> SharedExpertMoE:
        cfg, f = self.cfg, f"{p}.ffn"
        h, e = cfg.hidden_size, cfg.num_experts
        weight = self.tensor(f"{f}.gate.weight", (e, h), opts)
        if hashed:
            table = self.tensor(f"{f}.gate.tid2eid", (cfg.vocab_size, cfg.top_k), opts)
            if int(table.min()) < 0 or int(table.max()) >= e:
                raise CheckpointError(f"expert ids outside [0, {e})", path=self.ck.model_dir, tensor=f"{f}.gate.tid2eid")
            router = SqrtSoftplusRouter(weight, cfg.top_k, cfg.routed_scaling_factor, tid2eid=table)
        else:
            bias_name = self.names(f"{f}.gate.bias", required=False)
            bias = None if bias_name is None else self.tensor(f"{f}.gate.bias", (e,), opts)
            router = SqrtSoftplusRouter(weight, cfg.top_k, cfg.routed_scaling_factor, bias=bias)
        experts_prefix = self.names(f"{f}.experts.0.w1", required=False)
        if experts_prefix is not None:
            prefix, names = experts_prefix.rsplit(".", 2)[0], ("w1", "w3", "w2")
        else:  # transformers' fused experts.gate_up_proj / down_proj
            prefix = self.names(f"{f}.experts.gate_up_proj").rsplit(".", 1)[0]
            names = ("gate_proj", "up_proj", "down_proj")
        experts = load_routed_experts(self.ck, prefix, num_experts=e, hidden_size=h,
                                      intermediate_size=cfg.moe_intermediate_size, activation="silu", options=opts,
                                      names=names, limit=cfg.swiglu_limit)
        shared = None
        if cfg.n_shared_experts:
            s, inter = f"{f}.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts
            shared = GatedMLP(self.linear(f"{s}.w1", h, inter, opts), self.linear(f"{s}.w3", h, inter, opts),
                              self.linear(f"{s}.w2", inter, h, opts), "silu", cfg.swiglu_limit)
        return SharedExpertMoE(router, experts, shared)

    def layer(self, i: int) -> DSV4DecoderLayer:
        ratio = self.cfg.compress_ratios[i]
        pool = None
        if ratio:
            pool, self.next_pool = self.next_pool, self.next_pool + 1
        return self.block(f"layers.{i}", ratio, self.cfg.hash_layers[i], i, pool, self.options.for_layer(i))

    def block(self, p: str, ratio: int, hashed: bool, layer_idx: int, pool_idx: int | None,
              opts: RuntimeOptions) -> DSV4DecoderLayer:
        h = self.cfg.hidden_size
        return DSV4DecoderLayer(self.site(f"{p}.hc_attn", opts), self.norm(f"{p}.attn_norm.weight", h, opts),
                                self.attention(p, ratio, layer_idx, pool_idx, opts), self.site(f"{p}.hc_ffn", opts),
                                self.norm(f"{p}.ffn_norm.weight", h, opts), self.moe(p, hashed, opts),
                                self.options.dtype)

    def mtp_blocks(self) -> list[DSV4MtpBlock]:
        cfg, opts = self.cfg, self.options.for_head()
        h, n = cfg.hidden_size, cfg.hc_mult
        blocks = []
        for k, p in enumerate(self.mtp_keys):
            ratio = cfg.mtp_compress_ratios[k] if k < len(cfg.mtp_compress_ratios) else 0
            pool = None
            if ratio:
                pool, self.next_mtp_pool = self.next_mtp_pool, self.next_mtp_pool + 1
            layer = self.block(p, ratio, False, self.first_mtp + k, pool, opts)
            hc_head = HyperHead(self.tensor(f"{p}.hc_head_fn", (n, n * h), opts),
                                self.tensor(f"{p}.hc_head_scale", (1,), opts),
                                self.tensor(f"{p}.hc_head_base", (n,), opts), n, eps=cfg.rms_norm_eps,
                                pre_eps=cfg.hc_eps)
            blocks.append(DSV4MtpBlock(self.linear(f"{p}.e_proj", h, h, opts), self.linear(f"{p}.h_proj", h, h, opts),
                                       self.norm(f"{p}.enorm.weight", h, opts), self.norm(f"{p}.hnorm.weight", h, opts),
                                       layer, hc_head, self.norm(f"{p}.norm.weight", h, opts)))
        return blocks

    def dspark(self) -> DSparkDrafter | None:
        n = self.dspark_blocks
        if n == 0:
            return None
        cfg, opts, dc = self.cfg, self.options.for_head(), self.cfg.dspark
        h, hc, rank = cfg.hidden_size, cfg.hc_mult, dc.markov_rank
        first = self.first_mtp  # no classic depths alongside: the drafter's rings follow the trunk's entries
        blocks = [self.block(f"mtp.{k}", 0, False, first + k, None, opts) for k in range(n)]
        last = f"mtp.{n - 1}"
        hc_head = HyperHead(self.tensor(f"{last}.hc_head_fn", (hc, hc * h), opts),
                            self.tensor(f"{last}.hc_head_scale", (1,), opts),
                            self.tensor(f"{last}.hc_head_base", (hc,), opts), hc, eps=cfg.rms_norm_eps,
                            pre_eps=cfg.hc_eps)
        bias = None
        if self.names(f"{last}.confidence_head.proj.bias", required=False) is not None:
            bias = self.tensor(f"{last}.confidence_head.proj.bias", (1,), opts)
        return DSparkDrafter(
            dc, main_proj=self.linear("mtp.0.main_proj", len(dc.target_layers) * h, h, opts),
            main_norm=self.norm("mtp.0.main_norm.weight", h, opts), blocks=blocks, hc_head=hc_head,
            norm=self.norm(f"{last}.norm.weight", h, opts),
            markov_w1=self.tensor(f"{last}.markov_head.markov_w1.weight", (cfg.vocab_size, rank), opts),
            markov_w2=self.tensor(f"{last}.markov_head.markov_w2.weight", (cfg.vocab_size, rank), opts),
            confidence_weight=self.tensor(f"{last}.confidence_head.proj.weight", (1, h + rank), opts),
            confidence_bias=bias, hc_mult=hc, window=cfg.sliding_window, dtype=self.options.dtype, first_entry=first)

    def top(self):
        cfg, head_opts = self.cfg, self.options.for_head()
        n, h = cfg.hc_mult, cfg.hidden_size
        embed = self.tensor("embed.weight", (cfg.vocab_size, h), self.options.for_embedding(), dtype=self.options.dtype)
        hc_head = HyperHead(self.tensor("hc_head_fn", (n, n * h), head_opts),
                            self.tensor("hc_head_scale", (1,), head_opts), self.tensor("hc_head_base", (n,), head_opts),
                            n, eps=cfg.rms_norm_eps, pre_eps=cfg.hc_eps)
        norm = self.norm("norm.weight", h, head_opts)
        lm_head = self.linear("head", h, cfg.vocab_size, head_opts)
        return embed, hc_head, norm, lm_head
