"""OpenPanguV2 (openPangu-2.0-Flash), EXL3 or unquantized, with its MTP draft layers.

The math is architectures.md §3, following Huawei's pure-torch reference (HW-CALIB
``PanguTorchDecoderLayer._forward_full_layer``) wherever the sources disagree:

* 4-stream mHC residual (``blocks.mhc``, with ``norm_gamma``); per layer an attention
  site and an MLP site, each with sandwich norms (input/post-attention,
  pre-/post-MLP); on layers in ``block_post_layernorm_idx`` an RMSNorm over all
  ``4 * hidden`` values of the streams afterwards;
* MLA attention (``blocks.mla``) with MoME short convolutions, 128 learned sink
  entries, and either a sliding window (``swa_layers`` / ``sliding_window_list``) or,
  on ``dsa_layers``, the lightning indexer's top-k;
* ``first_k_dense_replace`` dense SwiGLU layers, then MoE: sigmoid router with
  selection bias, normalised top-k times ``routed_scaling_factor``, plus the shared
  expert;
* exit: ``merge_mhc_module`` collapses the streams, ``model.norm``, ``lm_head``
  (untied).

MTP layers ``num_hidden_layers .. + num_nextn_predict_layers - 1``: plain-residual
(no mHC) sandwich-norm blocks with MLA (MoME and sinks on, window from
``sliding_window_list``, no indexer) and MoE, entered through
``eh_proj(cat(enorm(embed(next)), hnorm(h)))`` and left through their own
``shared_head.norm`` and the trunk's head. Their ``embed_tokens`` / ``shared_head.head``
copies equal the trunk's in the released checkpoint, so the trunk's are borrowed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import CheckpointError, ConfigError
from ..kernels import exl3_full_weight
from ..kernels.weights import Exl3Weight
from ..options import RuntimeOptions
from .base import CausalLM
from .batch import ForwardBatch, running
from .blocks.lightning_indexer import LightningIndexer
from .blocks.linear import Linear
from .blocks.mhc import HyperHead, HyperSite, expand, run_sites
from .blocks.mla import MLAAttention
from .blocks.mlp import GatedMLP
from .blocks.moe import RoutedExperts, load_routed_experts
from .blocks.norm import RMSNorm
from .blocks.rope import RopeConfig, RotaryEmbedding, inverse_frequencies
from .blocks.routing import SigmoidBiasRouter
from .blocks.short_conv import ShortConv
from .cache_spec import LayerCacheSpec
from .config_reader import ConfigReader

log = logging.getLogger(__name__)

# mHC epsilons of the reference: 1e-6 at the layer sites (RMS, pre, Sinkhorn); the merge
# module normalises with rms_norm_eps and also adds 1e-6 to its pre weights (architectures.md §0.6)
MHC_EPS = 1e-6


@dataclass(frozen=True)
class PanguLayerConfig:
    dsa: bool  # global attention through the lightning indexer
    window: int | None  # sliding-window layers
    moe: bool
    block_post_norm: bool
    mtp: bool


@dataclass(frozen=True)
class OpenPanguV2Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_mtp_layers: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    rope: RopeConfig
    rms_norm_eps: float
    layers: tuple[PanguLayerConfig, ...]  # trunk then MTP layers
    index_topk: int
    index_heads: int
    index_head_dim: int
    sink_number: int
    sink_with_value: bool
    use_mome: bool
    mome_width: int
    streams: int
    sinkhorn_iters: int
    use_gamma: bool
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    num_shared_experts: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    expert_bias: bool
    hidden_act: str

    @staticmethod
    def from_hf(cfg: dict, path) -> "OpenPanguV2Config":
        r = ConfigReader(cfg, path)
        n = r.get("num_hidden_layers", int)
        n_mtp = r.get("num_nextn_predict_layers", int, 0)
        total = n + n_mtp
        dsa = r.get("dsa_layers", list, [])
        swa = r.get("swa_layers", list, [])
        windows = r.get("sliding_window_list", list, None)
        if windows is None:
            windows = [r.get("sliding_window", int)] * len(swa)
        if len(windows) != len(swa):
            raise ConfigError(f"key 'sliding_window_list' has {len(windows)} entries but 'swa_layers' has {len(swa)}",
                              path=path)
        for key, idx in (("dsa_layers", dsa), ("swa_layers", swa)):
            bad = [i for i in idx if not isinstance(i, int) or not 0 <= i < total]
            if bad:
                raise ConfigError(f"key '{key}' names layer {bad[0]!r}; the model has {total} layers "
                                  f"(num_hidden_layers + num_nextn_predict_layers)", path=path)
        both = set(dsa) & set(swa)
        if both:
            raise ConfigError(f"layer {min(both)} is in both 'dsa_layers' and 'swa_layers'", path=path)
        if any(i >= n for i in dsa):
            raise ConfigError("key 'dsa_layers' names an MTP layer; MTP layers have no indexer", path=path)
        for flag, why in (("use_mhc", "the trunk's 4-stream residual"), ("sandwich_norm", "the four norms per layer"),
                          ("use_mla", "MLA attention")):
            r.require(flag, (True,), r.get(flag, bool, True), f"this adapter implements {why} only")
        if r.get("rope_interleave", bool, False) or r.get("rope_interleaved", bool, False):
            raise ConfigError("key 'rope_interleave' = true (GPT-J pairing) is not supported; Huawei's reference "
                              "rotates NEOX halves", path=path)
        for key in ("n_group", "topk_group"):
            r.require(key, (1,), r.get(key, int, 1), "group-limited routing is not implemented")
        act = r.get("hidden_act", str, "silu")
        r.require("hidden_act", ("silu",), act)
        rope = RopeConfig.from_hf(r)
        r.require("rope_parameters.rope_type", ("default",), rope.rope_type)
        dense = r.get("first_k_dense_replace", int, 0)
        post_idx = set(r.get("block_post_layernorm_idx", list, []))
        layers = []
        for i in range(total):
            window = windows[swa.index(i)] if i in swa else None
            if window is not None and window < 1:
                raise ConfigError(f"key 'sliding_window_list' gives layer {i} a window of {window}", path=path)
            layers.append(PanguLayerConfig(dsa=i in dsa, window=window, moe=i >= n or i >= dense,
                                           block_post_norm=i < n and i in post_idx, mtp=i >= n))
        experts = r.get("n_routed_experts", int)
        top_k = r.get("num_experts_per_tok", int)
        if not 0 < top_k <= experts:
            raise ConfigError(f"key 'num_experts_per_tok' = {top_k} must be in [1, n_routed_experts={experts}]",
                              path=path)
        return OpenPanguV2Config(
            vocab_size=r.get("vocab_size", int), hidden_size=r.get("hidden_size", int), num_layers=n,
            num_mtp_layers=n_mtp, num_heads=r.get("num_attention_heads", int),
            q_lora_rank=r.get("q_lora_rank", int), kv_lora_rank=r.get("kv_lora_rank", int),
            nope_dim=r.get("qk_nope_head_dim", int), rope_dim=r.get("qk_rope_head_dim", int),
            v_dim=r.get("v_head_dim", int), rope=rope, rms_norm_eps=r.get("rms_norm_eps", float, 1e-5),
            layers=tuple(layers), index_topk=r.get("index_topk", int, 2048), index_heads=r.get("index_n_heads", int, 0),
            index_head_dim=r.get("index_head_dim", int, 0), sink_number=r.get("param_sink_number", int, 0),
            sink_with_value=r.get("param_sink_with_value", bool, True), use_mome=r.get("use_mome", bool, False),
            mome_width=r.get("router_sliding_window", int, 3), streams=r.get("mhc_num_stream", int, 4),
            sinkhorn_iters=r.get("mhc_recur_norm", int, 20), use_gamma=r.get("mhc_use_gamma", bool, True),
            intermediate_size=r.get("intermediate_size", int),
            moe_intermediate_size=r.get("moe_intermediate_size", int), num_experts=experts, top_k=top_k,
            num_shared_experts=r.get("n_shared_experts", int, 0),
            norm_topk_prob=r.get("norm_topk_prob", bool, True),
            routed_scaling_factor=r.get("routed_scaling_factor", float, 1.0),
            expert_bias=r.get("router_enable_expert_bias", bool, True), hidden_act=act,
        )


# ------------------------------------------------------------------ blocks


class PanguMoE(nn.Module):
    """Routed experts (sigmoid + bias router) plus the shared expert, added unscaled."""

    def __init__(self, router: SigmoidBiasRouter, experts: RoutedExperts, shared: GatedMLP | None):
        super().__init__()
        self.router, self.experts, self.shared = router, experts, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.router(x)
        # the shared expert first: the routed down projection adds it to its weighted sum (one launch fewer)
        return self.experts(x, ids, weights, base=None if self.shared is None else self.shared(x))


class PanguDecoderLayer(nn.Module):
    """A trunk layer on the mHC streams ``x [n, N, D]`` (fp32)."""

    def __init__(self, attn: MLAAttention, mlp: nn.Module, norms: dict[str, RMSNorm], attn_site: HyperSite,
                 mlp_site: HyperSite, block_post_norm: RMSNorm | None, dtype: torch.dtype):
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm = norms["input_layernorm"]
        self.post_attention_layernorm = norms["post_attention_layernorm"]
        self.pre_mlp_layernorm = norms["pre_mlp_layernorm"]
        self.post_mlp_layernorm = norms["post_mlp_layernorm"]
        self.attn_site, self.mlp_site, self.block_post_norm = attn_site, mlp_site, block_post_norm
        self.dtype = dtype

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        # the branch outputs' norms read them in the model's dtype and give fp32 (one kernel on CUDA)
        def attention(h):  # h: input_layernorm(collapsed streams) in the model's dtype
            return self.post_attention_layernorm(self.self_attn(h, positions, batch), torch.float32)

        def mlp(h):
            return self.post_mlp_layernorm(self.mlp(h), torch.float32)

        # on CUDA the sites' Triton kernels apply the input norms (mhc.run_sites)
        x = run_sites(x, (self.attn_site, attention, self.input_layernorm, self.dtype),
                      (self.mlp_site, mlp, self.pre_mlp_layernorm, self.dtype))
        if self.block_post_norm is not None:
            x = self.block_post_norm(x.flatten(-2)).view_as(x)
        return x


class PanguMTPLayer(nn.Module):
    """One MTP depth: ``eh_proj(cat(enorm(e), hnorm(h)))``, a plain-residual block, its head norm."""

    def __init__(self, enorm: RMSNorm, hnorm: RMSNorm, eh_proj: Linear, attn: MLAAttention, mlp: nn.Module,
                 norms: dict[str, RMSNorm], head_norm: RMSNorm, dtype: torch.dtype):
        super().__init__()
        self.enorm, self.hnorm, self.eh_proj = enorm, hnorm, eh_proj
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm = norms["input_layernorm"]
        self.post_attention_layernorm = norms["post_attention_layernorm"]
        self.pre_mlp_layernorm = norms["pre_mlp_layernorm"]
        self.post_mlp_layernorm = norms["post_mlp_layernorm"]
        self.head_norm = head_norm
        self.dtype = dtype

    def forward(self, embedded: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                batch: ForwardBatch | None = None) -> torch.Tensor:
        """-> the block output ``[n, D]`` fp32 before ``shared_head.norm`` (it seeds the next depth)."""
        # each norm writes the dtype its consumer reads (casting commutes with the concatenation)
        e, h = self.enorm(embedded, self.dtype), self.hnorm(hidden, self.dtype)
        x = self.eh_proj(torch.cat([e, h], dim=-1)).float()
        a = self.self_attn(self.input_layernorm(x, self.dtype), positions, batch)
        x = x + self.post_attention_layernorm(a, torch.float32)
        m = self.mlp(self.pre_mlp_layernorm(x, self.dtype))
        return x + self.post_mlp_layernorm(m, torch.float32)


# ------------------------------------------------------------------ model


class OpenPanguV2ForCausalLM(CausalLM):
    architectures = ("OpenPanguV2ForCausalLM",)
    has_mtp = True
    # MLA's decode path stores every row's state before any row reads (blocks/mla.py), mHC and MoE
    # are per row: drafted tokens verify as decode rows, in CUDA graphs
    verify_as_decode_rows = True

    def __init__(self, config: OpenPanguV2Config, options: RuntimeOptions, embed_tokens: torch.Tensor,
                 layers: list[PanguDecoderLayer], mtp_layers: list[PanguMTPLayer], merge: HyperHead, norm: RMSNorm,
                 lm_head: Linear):
        super().__init__(config, options)
        self.register_buffer("embed_tokens", embed_tokens)
        self.layers = nn.ModuleList(layers)
        self.mtp_layers = nn.ModuleList(mtp_layers)
        self.merge, self.norm, self.lm_head = merge, norm, lm_head
        # below index_topk no DSA row has more candidates than the indexer keeps: its decode step skips the
        # index scores and the top-k (blocks/mla.py); fixed at load, asked for every step
        has_indexer = any(layer.self_attn.indexer is not None for layer in [*self.layers, *self.mtp_layers])
        self._context_buckets = (config.index_topk,) if has_indexer else ()

    def decode_context_buckets(self) -> tuple[int, ...]:
        return self._context_buckets

    @classmethod
    def config_from_checkpoint(cls, checkpoint: Checkpoint) -> OpenPanguV2Config:
        return OpenPanguV2Config.from_hf(checkpoint.config, checkpoint.config_path)

    # ------------------------------------------------------------- loading

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, options: RuntimeOptions,
                        progress=None) -> "OpenPanguV2ForCausalLM":
        cfg = cls.config_from_checkpoint(checkpoint)
        loader = _Loader(checkpoint, cfg)
        dt, hidden = options.dtype, cfg.hidden_size
        embed = loader.dense("model.embed_tokens.weight", (cfg.vocab_size, hidden), options.for_embedding(), dt)
        ropes: dict[str, RotaryEmbedding] = {}
        trunk, mtp = [], []
        total = len(cfg.layers)
        for i, lc in enumerate(cfg.layers):
            o = cls._layer_options(options, cfg, i)
            if str(o.device) not in ropes:
                ropes[str(o.device)] = RotaryEmbedding(inverse_frequencies(cfg.rope, cfg.rope_dim)).to(o.device)
            p = f"model.layers.{i}"
            attn = loader.attention(p, i, lc, o, ropes[str(o.device)])
            mlp = loader.moe(p, o) if lc.moe else loader.mlp(f"{p}.mlp", cfg.intermediate_size, o)
            norms = {name: loader.norm(f"{p}.{name}.weight", o) for name in
                     ("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm")}
            if lc.mtp:
                mtp.append(PanguMTPLayer(loader.norm(f"{p}.enorm.weight", o), loader.norm(f"{p}.hnorm.weight", o),
                                         loader.linear(f"{p}.eh_proj", 2 * hidden, hidden, o), attn, mlp, norms,
                                         loader.norm(f"{p}.shared_head.norm.weight", o), dt))
            else:
                block_post = None
                if lc.block_post_norm:
                    block_post = loader.norm(f"{p}.block_post_layernorm.weight", o, cfg.streams * hidden)
                trunk.append(PanguDecoderLayer(attn, mlp, norms, loader.hyper_site(f"{p}.attn_mhc_module", o),
                                               loader.hyper_site(f"{p}.mlp_mhc_module", o), block_post, dt))
            if progress is not None:
                progress(i + 1, total + 1)
        head = options.for_head()
        lm_head = loader.linear("lm_head", hidden, cfg.vocab_size, head)
        model = cls(cfg, options, embed, trunk, mtp, loader.hyper_head("model.merge_mhc_module", head),
                    loader.norm("model.norm.weight", head), lm_head)
        if progress is not None:
            progress(total + 1, total + 1)
        return model

    @staticmethod
    def _layer_options(options: RuntimeOptions, cfg: OpenPanguV2Config, index: int) -> RuntimeOptions:
        """A multi-GPU plan places the trunk's ``num_layers`` layers; MTP layers go with the last one
        (they read its output)."""
        return options.for_layer(min(index, cfg.num_layers - 1))

    # ------------------------------------------------------------- state

    def cache_spec(self) -> list[LayerCacheSpec]:
        """Trunk layers, then the MTP layers (same positions; see ``mtp_forward``)."""
        layers = list(self.layers) + list(self.mtp_layers)
        return [layer.self_attn.cache_spec(self.options.dtype, self._layer_options(self.options, self.config, i).device)
                for i, layer in enumerate(layers)]

    # ------------------------------------------------------------- forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[input_ids.to(self.embed_tokens.device)]

    def _trunk(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch | None) -> torch.Tensor:
        """Token ids ``[n]`` -> the merged streams before ``model.norm``, ``[n, D]`` fp32."""
        x = expand(self.embed(input_ids), self.config.streams)
        for layer in self.layers:
            dev = layer.input_layernorm.weight.device
            on_dev = None if batch is None else batch.on(dev)
            x = layer(x.to(dev), positions.to(dev) if batch is None else on_dev.positions, on_dev)
        return self.merge(x.to(self.norm.weight.device))

    def head(self, hidden: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        norm = self.norm if norm is None else norm
        return self.lm_head(norm(hidden, self.options.dtype)).float()

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` ids -> the pre-norm hidden state ``[B, T, D]`` (what seeds MTP depth 1)."""
        if positions is None:
            positions = self.default_positions(input_ids)
        return torch.stack([self._trunk(ids, pos, None) for ids, pos in zip(input_ids, positions)])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` ids, each row a whole sequence from position 0 -> fp32 logits ``[B, T, V]``."""
        return self.head(self.forward_hidden(input_ids, positions))

    def forward_batch(self, input_ids: torch.Tensor, batch: ForwardBatch, logits_rows: torch.Tensor | None = None,
                      return_hidden: bool = False):
        # values memoised for this step only: a CUDA graph's warm-up runs must not leave tensors
        # that the captured run would then read as constants
        batch.memo.clear()
        with running(batch):
            hidden = self._trunk(input_ids, batch.positions, batch)
            rows = hidden if logits_rows is None else hidden[logits_rows.to(hidden.device)]
            logits = self.head(rows)
        return (logits, hidden) if return_hidden else logits

    # ------------------------------------------------------------- MTP

    @property
    def mtp_depth(self) -> int:
        return len(self.mtp_layers)

    def mtp_forward(self, depth: int, hidden: torch.Tensor, next_ids: torch.Tensor, batch: ForwardBatch | None,
                    logits_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth ``depth`` (1-based) at ``batch.positions``; without ``batch``, the rows are one
        sequence from position 0 (teacher forcing). Returns ``(logits, hidden)``."""
        if not 1 <= depth <= self.mtp_depth:
            raise ValueError(f"MTP depth {depth} is not loaded (this model has {self.mtp_depth})")
        layer = self.mtp_layers[depth - 1]
        dev = layer.input_layernorm.weight.device
        if batch is None:
            positions, on_dev = torch.arange(hidden.shape[0], device=dev), None
        else:
            on_dev = batch.on(dev)
            positions = on_dev.positions
        if batch is not None:
            batch.memo.clear()
        with running(batch):
            out = layer(self.embed(next_ids).to(dev), hidden.to(dev), positions, on_dev)
            rows = out if logits_rows is None else out[logits_rows.to(dev)]
            logits = self.head(rows.to(self.norm.weight.device), layer.head_norm)
        return logits, out


class _Loader:
    """Reads one OpenPanguV2 checkpoint's tensors with shape checks that name the tensor."""

    def __init__(self, checkpoint: Checkpoint, cfg: OpenPanguV2Config):
        self.ck, self.cfg = checkpoint, cfg

    def dense(self, key: str, shape: tuple[int, ...], o: RuntimeOptions, dtype: torch.dtype | None = None):
        t = self.ck.tensor(key, dtype=dtype, device=o.device)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"shape {list(t.shape)}, expected {list(shape)} from config.json",
                                  path=self.ck.info(key).file, tensor=key)
        return t

    def norm(self, key: str, o: RuntimeOptions, size: int | None = None) -> RMSNorm:
        return RMSNorm(self.dense(key, (size or self.cfg.hidden_size,), o), self.cfg.rms_norm_eps)

    def linear(self, key: str, n_in: int, n_out: int, o: RuntimeOptions) -> Linear:
        return Linear(self.ck.linear(key, in_features=n_in, out_features=n_out), n_in, n_out, o)

    def matrix(self, key: str, n_in: int, n_out: int, o: RuntimeOptions) -> torch.Tensor:
        """A linear's weight as a dense ``[out, in]`` tensor, decoding it if stored as EXL3."""
        w = self.ck.linear(key, in_features=n_in, out_features=n_out, device=o.device)
        if isinstance(w, Exl3Weight):
            return exl3_full_weight(w)[:n_in, :n_out].T.contiguous()
        return w.weight

    def mlp(self, p: str, inter: int, o: RuntimeOptions) -> GatedMLP:
        h = self.cfg.hidden_size
        return GatedMLP(self.linear(f"{p}.gate_proj", h, inter, o), self.linear(f"{p}.up_proj", h, inter, o),
                        self.linear(f"{p}.down_proj", inter, h, o), self.cfg.hidden_act)

    def moe(self, p: str, o: RuntimeOptions) -> PanguMoE:
        c, h = self.cfg, self.cfg.hidden_size
        bias = None
        if c.expert_bias:
            bias = self.dense(f"{p}.mlp.e_score_correction_bias", (c.num_experts,), o)
        router = SigmoidBiasRouter(self.dense(f"{p}.mlp.gate.weight", (c.num_experts, h), o), bias, c.top_k,
                                   scaling=c.routed_scaling_factor, normalise=c.norm_topk_prob)
        experts = load_routed_experts(self.ck, f"{p}.mlp.experts", num_experts=c.num_experts, hidden_size=h,
                                      intermediate_size=c.moe_intermediate_size, activation=c.hidden_act, options=o)
        shared = None
        if c.num_shared_experts:
            shared = self.mlp(f"{p}.mlp.shared_experts", c.moe_intermediate_size * c.num_shared_experts, o)
        return PanguMoE(router, experts, shared)

    def hyper_site(self, p: str, o: RuntimeOptions) -> HyperSite:
        c = self.cfg
        n, width = c.streams, c.streams * c.hidden_size
        gamma = self.dense(f"{p}.norm_gamma", (width,), o) if c.use_gamma else None
        return HyperSite(self.dense(f"{p}.phi.weight", ((2 + n) * n, width), o),
                         self.dense(f"{p}.branch_alpha", (3,), o), self.dense(f"{p}.branch_beta", ((2 + n) * n,), o),
                         n, gamma=gamma, eps=MHC_EPS, pre_eps=MHC_EPS, sinkhorn_iters=c.sinkhorn_iters,
                         sinkhorn_eps=MHC_EPS)

    def hyper_head(self, p: str, o: RuntimeOptions) -> HyperHead:
        c = self.cfg
        n, width = c.streams, c.streams * c.hidden_size
        gamma = self.dense(f"{p}.norm_gamma", (width,), o) if c.use_gamma else None
        return HyperHead(self.dense(f"{p}.phi.weight", (n, width), o), self.dense(f"{p}.branch_alpha_pre", (1,), o),
                         self.dense(f"{p}.branch_beta_pre", (n,), o), n, gamma=gamma, eps=c.rms_norm_eps,
                         pre_eps=MHC_EPS)

    def attention(self, p: str, index: int, lc: PanguLayerConfig, o: RuntimeOptions,
                  rope: RotaryEmbedding) -> MLAAttention:
        c, h = self.cfg, self.cfg.hidden_size
        a = f"{p}.self_attn"
        heads, qk = c.num_heads, c.nope_dim + c.rope_dim
        sink_c = sink_pe = None
        if c.sink_number:
            sink_pe = self.dense(f"{a}.param_sink_k_pe", (c.sink_number, c.rope_dim), o)
            key = f"{a}.param_sink_compressed_kv"
            if c.sink_with_value or self.ck.has_tensor(key):
                sink_c = self.dense(key, (c.sink_number, c.kv_lora_rank), o)
            else:  # HW-NPU: without param_sink_with_value the sink latent is zero
                sink_c = torch.zeros(c.sink_number, c.kv_lora_rank, device=o.device)
        convs = None
        if c.use_mome:
            convs = tuple(ShortConv(self.dense(f"{a}.{name}.weight", (size, 1, c.mome_width), o))
                          for name, size in (("qa_conv", c.q_lora_rank), ("compresskv_conv", c.kv_lora_rank),
                                             ("o_conv", heads * c.v_dim)))
        indexer = None
        if lc.dsa:
            ix = f"{a}.indexer"
            indexer = LightningIndexer(
                self.linear(f"{ix}.wq_b", c.q_lora_rank, c.index_heads * c.index_head_dim, o),
                self.linear(f"{ix}.wk", h, c.index_head_dim, o),
                self.norm(f"{ix}.k_norm.weight", o, c.index_head_dim),
                self.linear(f"{ix}.weights_proj", h, c.index_heads, o),
                num_heads=c.index_heads, head_dim=c.index_head_dim, top_k=c.index_topk)
        return MLAAttention(
            q_a_proj=self.linear(f"{a}.q_a_proj", h, c.q_lora_rank, o),
            q_a_norm=self.norm(f"{a}.q_a_layernorm.weight", o, c.q_lora_rank),
            q_b_proj=self.linear(f"{a}.q_b_proj", c.q_lora_rank, heads * qk, o),
            kv_a_proj=self.linear(f"{a}.kv_a_proj_with_mqa", h, c.kv_lora_rank + c.rope_dim, o),
            kv_a_norm=self.norm(f"{a}.kv_a_layernorm.weight", o, c.kv_lora_rank),
            kv_b=self.matrix(f"{a}.kv_b_proj", c.kv_lora_rank, heads * (c.nope_dim + c.v_dim), o),
            o_proj=self.linear(f"{a}.o_proj", heads * c.v_dim, h, o),
            num_heads=heads, nope_dim=c.nope_dim, rope_dim=c.rope_dim, v_dim=c.v_dim, rope=rope,
            window=lc.window, ring=lc.window is not None, sink_latent=sink_c, sink_k_pe=sink_pe, convs=convs,
            indexer=indexer, layer_idx=index)
