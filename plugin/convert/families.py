"""Per-architecture conversion plans: which linears are quantized, how they share inputs, how they group.

A ``ConversionFamily`` tells the converter, for one model family:

* the quantized linears of each decoder layer (``LinearSpec``): module key,
  the *input group* of linears that read the same activations (they share one
  Hessian, as q/k/v and gate/up do), and the *bit group* that the allocator
  raises together (exl3-format.md 6.7);
* the output head's key (quantized at ``--head-bits``, or kept fp16);
* how to run the unquantized model one piece at a time for calibration
  (``CalibrationRunner``): embed, each decoder layer, the final norm.

Everything not listed as a quantized linear is copied as stored (embeddings,
norms, ... exl3-format.md 1.5). Adding Gemma 4 / DeepSeek-V4 / OpenPanguV2
means writing one more ``ConversionFamily`` subclass and registering its
architecture strings in ``FAMILIES``; the converter itself does not change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConversionError, UnsupportedArchitectureError


@dataclass(frozen=True)
class FusedSource:
    """A linear stored as a slice of a fused 3-D tensor: ``tensor[index, rows[0]:rows[1]]`` (``[out, in]``).

    Gemma 4 stores its experts as ``experts.gate_up_proj [E, 2I, H]`` and
    ``experts.down_proj [E, H, I]``; the EXL3 output has one linear per expert.
    """

    tensor: str
    index: int | None  # None: a 2-D tensor, ``tensor[rows[0]:rows[1]]`` (DeepSeek-V4's grouped wo_a)
    rows: tuple[int, int] | None = None  # None: all rows


@dataclass(frozen=True)
class LinearSpec:
    """One quantizable linear of the source model."""

    key: str  # module key; tensors are "<key>.weight" (+ ".bias") in the source, unless ``source`` says
    input_group: str  # linears with the same input share a Hessian
    bit_group: str  # raised together by the bit allocator
    priority: int  # higher is raised first (attention 2, MLP 0, as the reference)
    layer: int  # decoder layer index, -1 for the head
    source: FusedSource | None = None


@dataclass(frozen=True)
class ConversionPlan:
    layers: list[list[LinearSpec]]  # per decoder layer, in quantization order
    head_key: str  # output head module key
    tied_embeddings: bool  # the source has no separate head tensor: quantize a copy of the embedding
    embedding_key: str

    @property
    def body_linears(self) -> list[LinearSpec]:
        return [spec for layer in self.layers for spec in layer]


class CalibrationRunner:
    """Runs the unquantized model piece by piece. A family provides one built from its adapter."""

    vocab_size: int

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer(self, index: int) -> nn.Module:
        """The decoder layer module (its quantizable ``Linear``s are found inside it by key)."""
        raise NotImplementedError

    def run_layer(self, index: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the output head reads (after the final norm)."""
        raise NotImplementedError

    def head_module(self) -> nn.Module:
        raise NotImplementedError


class ConversionFamily:
    architectures: ClassVar[tuple[str, ...]] = ()
    # Module order inside one decoder layer, as the reference model graph lists it (the order of
    # quantization_config.json's tensor_storage); modules not listed follow in name order.
    layer_module_order: ClassVar[tuple[str, ...]] = ()

    def tensor_sort_key(self, name: str) -> tuple:
        """Embedding first, then layer by layer in ``layer_module_order``, other tensors, the head last."""
        m = re.match(r".*?\.layers\.(\d+)\.(.*)\.[^.]+$", name)
        if m:
            sub = m.group(2)
            rank = self.layer_module_order.index(sub) if sub in self.layer_module_order else len(self.layer_module_order)
            return (1, int(m.group(1)), rank, name)
        if "embed" in name:
            return (0, 0, 0, name)
        return (3 if name.startswith("lm_head") else 2, 0, 0, name)

    def plan(self, config: dict, has_tensor) -> ConversionPlan:
        raise NotImplementedError

    def runner(self, model) -> CalibrationRunner:
        """``model``: the ``exl3_triton.Model`` loaded from the unquantized source."""
        raise NotImplementedError


# ----------------------------------------------------------------- Llama


class _StackRunner(CalibrationRunner):
    """For adapters built on ``arch.base.DecoderStackLM`` (embed, layers, norm, lm_head)."""

    def __init__(self, network):
        self.net = network
        self.vocab_size = network.vocab_size

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net.embed(ids)

    def layer(self, index: int) -> nn.Module:
        return self.net.layers[index]

    def run_layer(self, index: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.net.layers[index](hidden, positions)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net.norm(hidden)

    def head_module(self) -> nn.Module:
        return self.net.lm_head


class LlamaFamily(ConversionFamily):
    """Llama 2/3 and Mistral (full attention): 4 attention + 3 MLP linears per layer."""

    architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    layer_module_order = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.o_proj", "post_attention_layernorm", "mlp.up_proj", "mlp.gate_proj",
                          "mlp.down_proj")

    def plan(self, config: dict, has_tensor) -> ConversionPlan:
        layers = []
        for i in range(int(config["num_hidden_layers"])):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            layers.append([
                LinearSpec(f"{attn}.q_proj", f"{attn}.input", f"{attn}.qkv", 2, i),
                LinearSpec(f"{attn}.k_proj", f"{attn}.input", f"{attn}.qkv", 2, i),
                LinearSpec(f"{attn}.v_proj", f"{attn}.input", f"{attn}.qkv", 2, i),
                LinearSpec(f"{attn}.o_proj", f"{attn}.o_input", f"{attn}.o", 2, i),
                LinearSpec(f"{mlp}.up_proj", f"{mlp}.input", f"{mlp}.gu", 0, i),
                LinearSpec(f"{mlp}.gate_proj", f"{mlp}.input", f"{mlp}.gu", 0, i),
                LinearSpec(f"{mlp}.down_proj", f"{mlp}.down_input", f"{mlp}.d", 0, i),
            ])
        return ConversionPlan(
            layers=layers,
            head_key="lm_head",
            tied_embeddings=not has_tensor("lm_head.weight"),
            embedding_key="model.embed_tokens",
        )

    def runner(self, model) -> CalibrationRunner:
        return _StackRunner(model.network)


# ----------------------------------------------------------------- Gemma 4


class Gemma4Family(ConversionFamily):
    """Gemma 4 text models (architectures.md 1.7): attention and MLP linears, routed experts of the MoE
    variants (one EXL3 linear per expert, cut from the fused source tensors), the head quantized from the
    tied embedding. Norms, ``layer_scalar``, the router and the vision/audio towers stay as stored."""

    architectures = ("Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration", "Gemma4ForCausalLM")
    layer_module_order = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.q_norm", "self_attn.k_norm", "self_attn.o_proj", "post_attention_layernorm",
                          "pre_feedforward_layernorm", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj",
                          "post_feedforward_layernorm_1", "router.proj", "router", "pre_feedforward_layernorm_2",
                          "experts", "post_feedforward_layernorm_2", "post_feedforward_layernorm", "")

    def plan(self, config: dict, has_tensor) -> ConversionPlan:
        from ..arch.gemma4 import Gemma4Config

        cfg = Gemma4Config.from_model_config(config, "config.json")
        layers = []
        for i, lc in enumerate(cfg.layers):
            p = f"{cfg.prefix}.layers.{i}"
            attn, mlp = f"{p}.self_attn", f"{p}.mlp"
            specs = [LinearSpec(f"{attn}.q_proj", f"{attn}.input", f"{attn}.qkv", 2, i),
                     LinearSpec(f"{attn}.k_proj", f"{attn}.input", f"{attn}.qkv", 2, i)]
            if not lc.k_eq_v:
                specs.append(LinearSpec(f"{attn}.v_proj", f"{attn}.input", f"{attn}.qkv", 2, i))
            specs += [LinearSpec(f"{attn}.o_proj", f"{attn}.o_input", f"{attn}.o", 2, i),
                      LinearSpec(f"{mlp}.up_proj", f"{mlp}.input", f"{mlp}.gu", 0, i),
                      LinearSpec(f"{mlp}.gate_proj", f"{mlp}.input", f"{mlp}.gu", 0, i),
                      LinearSpec(f"{mlp}.down_proj", f"{mlp}.down_input", f"{mlp}.d", 0, i)]
            if cfg.enable_moe_block:
                specs += self._expert_specs(f"{p}.experts", i, cfg.num_experts, cfg.moe_intermediate_size, has_tensor)
            layers.append(specs)
        return ConversionPlan(layers=layers, head_key="lm_head", tied_embeddings=not has_tensor("lm_head.weight"),
                              embedding_key=f"{cfg.prefix}.embed_tokens")

    @staticmethod
    def _expert_specs(x: str, layer: int, num_experts: int, inter: int, has_tensor) -> list[LinearSpec]:
        # every expert reads the same normed residual and, calibrated on all tokens, shares its Hessian
        fused = has_tensor(f"{x}.gate_up_proj")
        specs = []
        for e in range(num_experts):
            parts = (("up_proj", (inter, 2 * inter)), ("gate_proj", (0, inter)))
            for name, rows in parts:
                src = FusedSource(f"{x}.gate_up_proj", e, rows) if fused else None
                specs.append(LinearSpec(f"{x}.{e}.{name}", f"{x}.input", f"{x}.gu", 0, layer, src))
            src = FusedSource(f"{x}.down_proj", e) if fused else None
            specs.append(LinearSpec(f"{x}.{e}.down_proj", f"{x}.{e}.down_input", f"{x}.d", 0, layer, src))
        return specs

    def runner(self, model) -> CalibrationRunner:
        return _StackRunner(model.network)


# ----------------------------------------------------------------- OpenPanguV2


class _PanguRunner(CalibrationRunner):
    """The trunk of ``arch.openpangu_v2`` piece by piece: the hidden state between layers is the
    4-stream mHC residual ``[B, T, N, D]``; the head reads ``model.norm(merge(streams))``."""

    def __init__(self, network):
        from ..arch.blocks.mhc import expand

        self.net, self.expand = network, expand
        self.vocab_size = network.vocab_size

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.expand(self.net.embed(ids), self.net.config.streams)

    def layer(self, index: int) -> nn.Module:
        return self.net.layers[index]

    def run_layer(self, index: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        layer = self.net.layers[index]
        return torch.stack([layer(x, p) for x, p in zip(hidden, positions)])  # each row a whole sequence

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        lead = hidden.shape[:-2]
        return self.net.norm(self.net.merge(hidden.flatten(0, -3))).unflatten(0, lead)

    def head_module(self) -> nn.Module:
        return self.net.lm_head


class OpenPanguV2Family(ConversionFamily):
    """openPangu-2.0 (architectures.md 3.8, the choices of the ExLlamaV3 fork that made the published
    EXL3): ``q_b_proj``, ``o_proj``, the dense MLP, the routed and shared experts and the head are
    quantized. ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``kv_b_proj`` (read raw by the absorbed
    attention), the indexer, mHC, MoME convs, sinks, norms, router and embedding stay as stored.
    The MTP layers are not calibrated here (their input is the trunk's output plus the next token),
    so they are copied as stored as well."""

    architectures = ("OpenPanguV2ForCausalLM",)
    layer_module_order = ("attn_mhc_module.phi", "attn_mhc_module", "input_layernorm", "self_attn.q_a_proj",
                          "self_attn.qa_conv", "self_attn.q_a_layernorm", "self_attn.q_b_proj",
                          "self_attn.kv_a_proj_with_mqa", "self_attn.compresskv_conv", "self_attn.kv_a_layernorm",
                          "self_attn.kv_b_proj", "self_attn", "self_attn.indexer.wq_b", "self_attn.indexer.wk",
                          "self_attn.indexer.k_norm", "self_attn.indexer.weights_proj", "self_attn.o_conv",
                          "self_attn.o_proj", "post_attention_layernorm", "mlp_mhc_module.phi", "mlp_mhc_module",
                          "pre_mlp_layernorm", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj", "mlp.gate", "mlp",
                          "mlp.shared_experts.up_proj", "mlp.shared_experts.gate_proj",
                          "mlp.shared_experts.down_proj", "post_mlp_layernorm", "block_post_layernorm")

    def plan(self, config: dict, has_tensor) -> ConversionPlan:
        from ..arch.openpangu_v2 import OpenPanguV2Config

        cfg = OpenPanguV2Config.from_hf(config, "config.json")
        layers = []
        for i, lc in enumerate(cfg.layers[:cfg.num_layers]):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            specs = [LinearSpec(f"{attn}.q_b_proj", f"{attn}.q_lora", f"{attn}.qb", 2, i),
                     LinearSpec(f"{attn}.o_proj", f"{attn}.o_input", f"{attn}.o", 2, i)]
            if lc.moe:
                # routed experts (calibrated on all tokens) and the shared expert read the same input
                x = f"{mlp}.experts"
                for e in range(cfg.num_experts):
                    specs += [LinearSpec(f"{x}.{e}.up_proj", f"{mlp}.input", f"{x}.gu", 0, i),
                              LinearSpec(f"{x}.{e}.gate_proj", f"{mlp}.input", f"{x}.gu", 0, i),
                              LinearSpec(f"{x}.{e}.down_proj", f"{x}.{e}.down_input", f"{x}.d", 0, i)]
                if cfg.num_shared_experts:
                    s = f"{mlp}.shared_experts"
                    specs += [LinearSpec(f"{s}.up_proj", f"{mlp}.input", f"{s}.gu", 0, i),
                              LinearSpec(f"{s}.gate_proj", f"{mlp}.input", f"{s}.gu", 0, i),
                              LinearSpec(f"{s}.down_proj", f"{s}.down_input", f"{s}.d", 0, i)]
            else:
                specs += [LinearSpec(f"{mlp}.up_proj", f"{mlp}.input", f"{mlp}.gu", 0, i),
                          LinearSpec(f"{mlp}.gate_proj", f"{mlp}.input", f"{mlp}.gu", 0, i),
                          LinearSpec(f"{mlp}.down_proj", f"{mlp}.down_input", f"{mlp}.d", 0, i)]
            layers.append(specs)
        return ConversionPlan(layers=layers, head_key="lm_head", tied_embeddings=not has_tensor("lm_head.weight"),
                              embedding_key="model.embed_tokens")

    def runner(self, model) -> CalibrationRunner:
        return _PanguRunner(model.network)


FAMILIES: dict[str, type[ConversionFamily]] = {arch: family for family in (LlamaFamily, Gemma4Family,
                                                                            OpenPanguV2Family)
                                               for arch in family.architectures}


def family_for(architecture: str, config_path=None) -> ConversionFamily:
    try:
        return FAMILIES[architecture]()
    except KeyError:
        raise UnsupportedArchitectureError(
            f"the converter does not support architecture {architecture!r} yet; "
            f"supported: {', '.join(sorted(FAMILIES))}",
            path=config_path,
        ) from None


# ----------------------------------------------------------------- DeepSeek-V4


class _DeepseekV4Runner(CalibrationRunner):
    """Calibration for DeepSeek-V4: the hidden state is the 4-stream residual ``[B, T, N, D]`` plus one
    extra "stream" carrying each row's token id (exact in fp32), because the hash-routed layers choose
    their experts by token id and the converter hands layers only hidden states (and saves them to resume)."""

    def __init__(self, network):
        self.net = network
        self.vocab_size = network.vocab_size
        self.streams = network.config.hc_mult
        self.drafter = network.block_drafter  # DSpark: units after the trunk's layers, see run_layer

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        streams = self.net.embed(ids)
        tag = torch.zeros_like(streams[..., :1, :])
        tag[..., 0, 0] = ids.to(streams.device).float()
        return torch.cat([streams, tag], dim=-2)

    def layer(self, index: int) -> nn.Module:
        n = len(self.net.layers)
        if index < n:
            return self.net.layers[index]
        # unit 0 holds main_proj too: the whole drafter, so that the quantized main_proj lands in it
        return self.drafter if index == n else self.drafter.blocks[index - n]

    def run_layer(self, index: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden rows: the trunk's streams, the token-id tag, then (with a DSpark drafter) the taps of its
        target layers as they pass, and after the trunk the drafter's own streams (the trunk's stay for
        the head). Drafter unit ``k`` runs block ``k`` over the sequences cut into draft blocks
        (``DSparkDrafter.calibration_forward``); unit 0 also feeds ``main_proj`` its taps."""
        n, ns = len(self.net.layers), self.streams
        streams, tag, extra = hidden[..., :ns, :].float(), hidden[..., ns:ns + 1, :], hidden[..., ns + 1:, :]
        ids = tag[..., 0, 0].round().long()
        if index < n:
            out = self.net.layers[index](streams, positions, None, ids)
            if self.drafter is not None and index in self.drafter.cfg.target_layers:
                extra = torch.cat([extra, out.mean(dim=-2, keepdim=True).to(extra.dtype)], dim=-2)
            return torch.cat([out, tag.to(out.dtype), extra.to(out.dtype)], dim=-2)
        d, taps = self.drafter, len(self.drafter.cfg.target_layers)
        main_x = d.main_norm(d.main_proj(extra[..., :taps, :].flatten(-2).to(d.dtype)))
        block_ids = d.block_ids(ids)
        x = self.net.embed(block_ids) if index == n else extra[..., taps:, :].float()
        out = d.calibration_forward(index - n, x, block_ids, main_x)
        return torch.cat([streams, tag.float(), extra[..., :taps, :].float(), out], dim=-2)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        streams = hidden[..., :self.streams, :].float()
        flat = self.net.hc_head(streams.reshape(-1, *streams.shape[-2:]))
        return self.net.norm(flat).view(*streams.shape[:-2], -1)

    def head_module(self) -> nn.Module:
        return self.net.lm_head


class DeepseekV4Family(ConversionFamily):
    """DeepSeek-V4 (architectures.md 2.6, as ExLlamaV3 quantizes it): attention ``wq_a``, ``wq_b``, ``wkv``,
    ``wo_a`` cut into one linear per output group (``wo_a.{g}``, each reads its own head group), ``wo_b``;
    the compressors' and the indexer's ``wkv``/``wgate`` and the indexer's ``wq_b``; routed and shared
    experts; the head. Stay as stored: the indexer's ``weights_proj`` (a router-like scoring head), the
    router and its bias, ``tid2eid``, sinks, ``ape``, norms, mHC tensors, the embedding, MTP depths.

    A DSpark block drafter (``mtp.*`` with ``main_proj``) is quantized as the reference does: ``main_proj``
    and each block's attention and experts (one unit per block after the trunk's layers, calibrated
    through the drafter: the trunk's taps and the calibration text cut into draft blocks of a seed and
    noise tokens); its ``markov_w1/w2`` and ``confidence_head`` stay as stored. The reference quantizes
    the drafter at its own ``mtp_bits`` (4); here the bit allocator treats it like the trunk's layers.

    Sources with DeepSeek's native names or transformers' ``save_pretrained`` layout (per-expert
    ``w1``/``w2``/``w3``) are supported; the converted model keeps the source's spelling."""

    architectures = ("DeepseekV4ForCausalLM",)

    def tensor_sort_key(self, name: str) -> tuple:
        m = re.match(r"(?:.*\.)?layers\.(\d+)\.", name)
        if m and not name.startswith("mtp."):
            return (1, int(m.group(1)), 0, name)
        if "embed" in name:
            return (0, 0, 0, name)
        return (3 if re.match(r"(lm_)?head\.", name) else 2, 0, 0, name)

    def plan(self, config: dict, has_tensor) -> ConversionPlan:
        from ..arch.deepseek_v4 import DeepseekV4Config, TensorNames

        cfg = DeepseekV4Config.from_hf(config, "config.json")

        def key(native: str) -> str:
            found = TensorNames.resolve(native, has_tensor)
            if found is None:
                raise ConversionError(f"the source model has no tensor for '{native}' (nor its transformers "
                                      "spellings)")
            return found

        layers = [self._block(cfg, key, f"layers.{i}", i, cfg.compress_ratios[i]) for i in range(cfg.num_layers)]
        if cfg.dspark is not None and has_tensor("mtp.0.main_proj.weight"):
            k = 0
            while has_tensor(f"mtp.{k}.attn.wkv.weight"):
                layers.append(self._block(cfg, key, f"mtp.{k}", cfg.num_layers + k, 0))
                k += 1
            unit = cfg.num_layers
            main = key("mtp.0.main_proj")
            layers[unit].insert(0, LinearSpec(main, f"{main}.input", main, 1, unit))
        return ConversionPlan(layers=layers, head_key=key("head"), tied_embeddings=False,
                              embedding_key=key("embed.weight").rsplit(".", 1)[0])

    @staticmethod
    def _block(cfg, key, p: str, i: int, ratio: int) -> list[LinearSpec]:
        """A V4 block's linears: trunk layer ``layers.{i}`` or DSpark block ``mtp.{k}`` (unit ``i``)."""
        a, f = f"{p}.attn", f"{p}.ffn"
        A = key(f"{a}.wq_a").rsplit(".", 1)[0]  # the layer's attention prefix as the source spells it
        kind = cfg.kind_of(ratio)

        def attn(name: str, group: str, bits: str = "attn") -> LinearSpec:
            return LinearSpec(key(f"{a}.{name}"), f"{A}.{group}", f"{A}.{bits}", 2, i)

        specs = [attn("wq_a", "input"), attn("wkv", "input")]
        if ratio:
            specs += [attn("compressor.wkv", "input", "compressor"), attn("compressor.wgate", "input", "compressor")]
        if kind == "csa":
            specs += [attn("indexer.compressor.wkv", "input", "indexer"),
                      attn("indexer.compressor.wgate", "input", "indexer")]
        specs.append(attn("wq_b", "q_lora"))
        if kind == "csa":
            specs.append(attn("indexer.wq_b", "q_lora", "indexer"))
        rank = cfg.o_lora_rank
        wo_a = key(f"{a}.wo_a")
        specs += [LinearSpec(f"{wo_a}.{g}", f"{wo_a}.{g}.input", f"{A}.o", 2, i,
                             FusedSource(f"{wo_a}.weight", None, (g * rank, (g + 1) * rank)))
                  for g in range(cfg.o_groups)]
        specs.append(attn("wo_b", "wo_b_input", "o"))
        experts = key(f"{f}.experts.0.w1")
        if experts is None or experts.endswith("gate_up_proj"):
            raise ConversionError("convert DeepSeek-V4 from per-expert w1/w2/w3 tensors")
        x = experts.rsplit(".", 2)[0]
        for e in range(cfg.num_experts):  # all experts read the normed residual; calibrated on all tokens
            specs += [LinearSpec(f"{x}.{e}.w3", f"{x}.input", f"{x}.gu", 0, i),
                      LinearSpec(f"{x}.{e}.w1", f"{x}.input", f"{x}.gu", 0, i),
                      LinearSpec(f"{x}.{e}.w2", f"{x}.{e}.down_input", f"{x}.d", 0, i)]
        if cfg.n_shared_experts:
            s = key(f"{f}.shared_experts.w1").rsplit(".", 1)[0]
            specs += [LinearSpec(f"{s}.w3", f"{x}.input", f"{s}.gu", 1, i),
                      LinearSpec(f"{s}.w1", f"{x}.input", f"{s}.gu", 1, i),
                      LinearSpec(f"{s}.w2", f"{s}.down_input", f"{s}.d", 1, i)]
        return specs

    def runner(self, model) -> CalibrationRunner:
        return _DeepseekV4Runner(model.network)


FAMILIES.update({arch: DeepseekV4Family for arch in DeepseekV4Family.architectures})
