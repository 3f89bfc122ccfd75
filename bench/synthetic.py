"""Synthetic EXL3 checkpoints of real model shapes, generated on the GPU.

``SyntheticCheckpoint`` answers the same questions an adapter asks a real
``Checkpoint`` (config, ``linear(key)``, ``tensor(name)``, ``linear_format(key)``)
with random tensors of the right shapes: a random trellis is a valid EXL3 weight
(any bit pattern decodes), so speed measurements need no download.
"""

from __future__ import annotations

import torch

from exl3_triton.errors import CheckpointError
from exl3_triton.kernels.weights import Codebook, DenseWeight, Exl3Weight

def _gemma4(text: dict) -> dict:
    base = {
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True, "hidden_size_per_layer_input": 0, "attention_k_eq_v": True,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                               "rope_theta": 1000000.0}},
    }
    return {"architectures": ["Gemma4ForConditionalGeneration"], "text_config": dict(base, **text)}


def _openpangu(**over) -> dict:
    """openPangu-2.0-Flash (architectures.md 3.1); ``over`` shrinks it for CPU checks."""
    base = {
        "architectures": ["OpenPanguV2ForCausalLM"], "model_type": "openpangu_v2", "vocab_size": 151552,
        "hidden_size": 2560, "num_hidden_layers": 46, "num_nextn_predict_layers": 3, "num_attention_heads": 48,
        "q_lora_rank": 1024, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "rope_theta": 6.4e6, "rope_interleave": False, "max_position_embeddings": 524288,
        "rms_norm_eps": 1e-5, "index_topk": 2048, "index_n_heads": 24, "index_head_dim": 128,
        "param_sink_number": 128, "param_sink_with_value": True, "use_mome": True, "router_sliding_window": 3,
        "use_mhc": True, "mhc_num_stream": 4, "mhc_recur_norm": 20, "mhc_use_gamma": True, "sandwich_norm": True,
        "block_post_layernorm_idx": [0, 4, 9, 14, 19, 24, 29, 34, 39], "first_k_dense_replace": 2,
        "intermediate_size": 9216, "moe_intermediate_size": 1024, "n_routed_experts": 256,
        "num_experts_per_tok": 8, "n_shared_experts": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "router_enable_expert_bias": True, "hidden_act": "silu", "tie_word_embeddings": False, "use_mla": True,
        "sliding_window": 512,
    }
    cfg = dict(base, **over)
    n, mtp = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    dsa = cfg.pop("dsa_every", 3)
    cfg["dsa_layers"] = list(range(0, n, dsa))
    cfg["swa_layers"] = [i for i in range(n) if i % dsa] + list(range(n, n + mtp))
    cfg["sliding_window_list"] = [cfg["sliding_window"]] * (len(cfg["swa_layers"]) - mtp) + \
        [cfg.pop("mtp_window", 2048)] * mtp
    return cfg


# OpenPanguV2 linears that the published EXL3 keeps 16-bit (architectures.md 3.8)
PANGU_DENSE_LINEARS = ("q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj", "indexer.wq_b", "indexer.wk",
                       "indexer.weights_proj")

CONFIGS = {
    "tiny": {  # for checking this file on a CPU
        "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "vocab_size": 1000, "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "tie_word_embeddings": False,
    },
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "tie_word_embeddings": False,
    },
    # gemma-4-31B-it (architectures.md 1.1)
    "gemma4-31b": _gemma4({
        "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 60, "num_attention_heads": 32,
        "num_key_value_heads": 16, "num_global_key_value_heads": 4, "head_dim": 256, "global_head_dim": 512,
        "sliding_window": 1024, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 10,
        "vocab_size": 262144, "max_position_embeddings": 262144,
    }),
    # the same layer kinds at a size that checks the ring cache and kernels quickly (window 64)
    "gemma4-tiny": _gemma4({
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_global_key_value_heads": 1, "head_dim": 64, "global_head_dim": 128,
        "sliding_window": 64, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "vocab_size": 1000, "max_position_embeddings": 4096,
    }),
    "openpangu-flash": _openpangu(),
    # every layer kind (DSA, sliding, MoE, MTP) at a size a CPU runs: window 16, indexer top-k 16;
    # 24 indexer heads as in Flash: with few heads many scores are exactly 0 and top-k ties decide
    "openpangu-tiny": _openpangu(
        vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, index_topk=16,
        index_n_heads=24, index_head_dim=32, param_sink_number=8, block_post_layernorm_idx=[0],
        first_k_dense_replace=1, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=8,
        num_experts_per_tok=2, sliding_window=16, mtp_window=32, max_position_embeddings=4096),
}


def _deepseek_v4(**shape) -> dict:
    """DeepSeek-V4 with DeepSeek's native config keys (architectures.md 2.1)."""
    base = {
        "architectures": ["DeepseekV4ForCausalLM"], "num_key_value_heads": 1, "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "rms_norm_eps": 1e-6,
        "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "n_shared_experts": 1, "hidden_act": "silu",
        "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "compress_rate_csa": 4, "compress_rate_hca": 128,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "tie_word_embeddings": False,
    }
    return dict(base, **shape)


def _dsv4_ratios(layers: int) -> list[int]:
    # layers 0, 1 sliding only; then CSA (ratio 4) on even, HCA (128) on odd layers (ds4 ds4_layer_compress_ratio)
    return [0 if i < 2 else (4 if i % 2 == 0 else 128) for i in range(layers)]


CONFIGS.update({
    # DeepSeek-V4-Flash (architectures.md 2.1): 43 layers, 256 experts of 2048, 64 heads of 512
    "deepseek_v4-flash": _deepseek_v4(
        vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128,
        compress_ratios=_dsv4_ratios(43), index_n_heads=64, index_head_dim=128, index_topk=512,
        n_routed_experts=256, num_experts_per_tok=6, moe_intermediate_size=2048, num_hash_layers=3,
        max_position_embeddings=1048576),
    # the same layer kinds at a size that runs anywhere (window 16, top-k 4: selective after 16 tokens)
    "deepseek_v4-tiny": _deepseek_v4(
        vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
        qk_rope_head_dim=32, q_lora_rank=128, o_groups=2, o_lora_rank=128, sliding_window=16,
        compress_ratios=_dsv4_ratios(4), index_n_heads=4, index_head_dim=64, index_topk=4,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_hash_layers=1,
        max_position_embeddings=4096),
})


class SyntheticCheckpoint:
    def __init__(self, name: str, *, bits: float = 4, head_bits: float = 6, codebook=Codebook.MCG,
                 device="cuda", dtype=torch.float16, seed: int = 0, expert_bits: float | None = None):
        if name not in CONFIGS:
            raise KeyError(f"unknown synthetic model {name!r}; known: {', '.join(CONFIGS)}")
        self.config = dict(CONFIGS[name])
        self.config_path = self.model_dir = f"<synthetic {name}>"
        self.text = self.config.get("text_config", self.config)
        self.architecture = self.config["architectures"][0]
        self.bits, self.head_bits, self.codebook = bits, head_bits, Codebook(codebook)
        self.expert_bits = bits if expert_bits is None else expert_bits  # routed experts (the ds4 recipe: 2)
        self.device, self.dtype = torch.device(device), dtype
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.weight_bytes = 0  # bytes of every quantized/dense linear handed out so far
        self._bytes_by_key: dict[str, int] = {}

    def _gemma4_full_layer(self, name: str) -> bool:
        layer = int(name.split(".layers.")[1].split(".")[0])
        return self.text["layer_types"][layer] == "full_attention"

    @property
    def _dsv4(self) -> bool:
        return self.architecture == "DeepseekV4ForCausalLM"

    def linear_format(self, key: str) -> str | None:
        if self._dsv4 and ("mtp." in key or key.endswith("wo_a")):
            return None  # no MTP depths; wo_a is stored per output group (wo_a.{g})
        if "gemma4" in self.architecture.lower() and key.endswith("v_proj") and self._gemma4_full_layer(key):
            return None  # attention_k_eq_v: full layers have no v_proj
        return "exl3"

    def has_tensor(self, name: str) -> bool:
        return not (self._dsv4 and "mtp." in name)

    def tensor_names(self) -> list[str]:
        return []

    def linear(self, key: str, *, in_features: int, out_features: int, device=None, dense_dtype=None):
        if self.architecture == "OpenPanguV2ForCausalLM" and key.endswith(PANGU_DENSE_LINEARS):
            w = torch.randn(out_features, in_features, generator=self.gen, device=self.device) * in_features**-0.5
            self._count(key, w.numel() * torch.finfo(self.dtype).bits // 8)
            return DenseWeight(w.to(self.dtype), key=key)
        k, n = -(-in_features // 128) * 128, -(-out_features // 128) * 128
        bits = self.head_bits if key in ("lm_head", "head") else self.bits
        if ".experts." in key:
            bits = self.expert_bits
        words = int(16 * bits)
        g, dev = self.gen, self.device
        trellis = torch.randint(-32768, 32768, (k // 16, n // 16, words), generator=g, device=dev,
                                dtype=torch.int32).to(torch.int16)
        suh = (torch.randn(k, generator=g, device=dev) * 0.02).half()
        svh = (torch.randn(n, generator=g, device=dev) * 0.02).half()
        w = Exl3Weight(trellis, suh, svh, bits, self.codebook, key=key)
        self._count(key, w.nbytes)
        return w

    def _count(self, key: str, nbytes: int) -> None:
        self.weight_bytes += nbytes
        self._bytes_by_key[key] = nbytes

    @property
    def active_bytes_per_token(self) -> float:
        """Weight bytes one token's decode step reads: every linear of the trunk, routed experts
        weighted by top-k / experts, MTP layers (past ``num_hidden_layers``) left out."""
        t = self.text
        layers = t.get("num_hidden_layers")
        experts = t.get("n_routed_experts") or t.get("num_experts")
        top_k = t.get("num_experts_per_tok") or t.get("top_k_experts")
        total = 0.0
        for key, nbytes in self._bytes_by_key.items():
            parts = key.split(".")
            if parts[0] == "mtp" or ("layers" in parts and layers is not None
                                     and int(parts[parts.index("layers") + 1]) >= layers):
                continue  # an MTP layer (DeepSeek-V4 names them mtp.K, OpenPanguV2 numbers them after the trunk)
            routed = ".experts." in key and ".shared_expert" not in key
            total += nbytes * (top_k / experts if routed and experts and top_k else 1.0)
        return total

    def tensor(self, name: str, *, dtype=None, device=None) -> torch.Tensor:
        if self.architecture == "OpenPanguV2ForCausalLM":
            return self._pangu_tensor(name, dtype)
        if self._dsv4:
            return self._dsv4_tensor(name, dtype)
        h, v = self.text["hidden_size"], self.text["vocab_size"]
        if name.endswith("embed_tokens.weight"):
            return torch.randn(v, h, generator=self.gen, device=self.device).to(dtype or self.dtype) * 0.02
        if name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):  # per-head norms
            full = "gemma4" in self.architecture.lower() and self._gemma4_full_layer(name)
            size = self.text["global_head_dim"] if full else self.text["head_dim"]
            # Gemma 4 attends with scale 1: trained q/k norm weights keep the scores moderate. With
            # weights of 1 the random model's scores have a deviation of sqrt(head_dim) and its
            # attention is so hard that fp16 rounding changes the output completely (measured:
            # 1e-3 input noise moves the logits by 40-70%); size^-1/4 each gives unit-variance scores.
            return torch.full((size,), size**-0.25, device=self.device, dtype=dtype or torch.float32)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            return torch.ones(h, device=self.device, dtype=dtype or torch.float32)
        if name.endswith("layer_scalar"):
            return torch.ones(1, device=self.device, dtype=dtype or torch.float32)
        raise CheckpointError("the synthetic checkpoint has no such tensor", tensor=name)

    def _pangu_tensor(self, name: str, dtype) -> torch.Tensor:
        """OpenPanguV2's unquantized tensors (architectures.md 3.2), random but of a sane size."""
        c = self.config
        h, streams = c["hidden_size"], c["mhc_num_stream"]
        width, mix = streams * h, (2 + streams) * streams
        g, dev = self.gen, self.device
        shapes = {
            "embed_tokens.weight": (c["vocab_size"], h), "phi.weight": (streams if "merge" in name else mix, width),
            "norm_gamma": (width,), "branch_alpha": (3,), "branch_beta": (mix,), "branch_alpha_pre": (1,),
            "branch_beta_pre": (streams,), "block_post_layernorm.weight": (width,),
            "q_a_layernorm.weight": (c["q_lora_rank"],), "kv_a_layernorm.weight": (c["kv_lora_rank"],),
            "k_norm.weight": (c["index_head_dim"],),
            "qa_conv.weight": (c["q_lora_rank"], 1, c["router_sliding_window"]),
            "compresskv_conv.weight": (c["kv_lora_rank"], 1, c["router_sliding_window"]),
            "o_conv.weight": (c["num_attention_heads"] * c["v_head_dim"], 1, c["router_sliding_window"]),
            "param_sink_compressed_kv": (c["param_sink_number"], c["kv_lora_rank"]),
            "param_sink_k_pe": (c["param_sink_number"], c["qk_rope_head_dim"]),
            "mlp.gate.weight": (c["n_routed_experts"], h), "e_score_correction_bias": (c["n_routed_experts"],),
        }
        shape = next((v for k, v in shapes.items() if name.endswith(k)), None)
        if shape is None and name.endswith("norm.weight"):
            shape = (h,)
        if shape is None:
            raise CheckpointError("the synthetic checkpoint has no such tensor", tensor=name)
        if name.endswith("norm.weight") or name.endswith("norm_gamma"):
            t = torch.ones(shape, device=dev)
        elif name.endswith("embed_tokens.weight"):
            return (torch.randn(shape, generator=g, device=dev) * 0.02).to(dtype or self.dtype)
        elif name.endswith("e_score_correction_bias"):
            t = torch.zeros(shape, device=dev)
        else:  # projections scaled to keep activations O(1); convs, sinks and mHC offsets small
            fan_in = shape[-1] if len(shape) == 2 else 1
            t = torch.randn(shape, generator=g, device=dev) * (fan_in**-0.5 if len(shape) == 2 else 0.1)
        return t.to(dtype or torch.float32)

    def info(self, name: str):
        raise CheckpointError("synthetic checkpoints have no files", tensor=name)

    def _dsv4_tensor(self, name: str, dtype) -> torch.Tensor:
        """DeepSeek-V4's unquantized tensors (native names): embedding, norms, mHC, sinks, ape, routers."""
        c, g, dev = self.config, self.gen, self.device
        h, n, e = c["hidden_size"], c["hc_mult"], c["n_routed_experts"]
        m = (2 + n) * n

        def rand(*shape, std=0.02):
            return (torch.randn(*shape, generator=g, device=dev) * std).to(dtype or torch.float32)

        def ones(size):
            return torch.ones(size, device=dev, dtype=dtype or torch.float32)

        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        ratio = c["compress_ratios"][layer] if layer >= 0 else 0
        indexer = ".indexer." in name
        width = c["index_head_dim"] if indexer else c["head_dim"]
        if name == "embed.weight":
            return rand(c["vocab_size"], h).to(dtype or self.dtype)
        if name.endswith(("attn_norm.weight", "ffn_norm.weight")) or name == "norm.weight":
            return ones(h)
        if name.endswith("q_norm.weight"):
            return ones(c["q_lora_rank"])
        if name.endswith(("kv_norm.weight", "compressor.norm.weight")):
            return ones(width)
        if name.endswith(("hc_attn_fn", "hc_ffn_fn")):
            return rand(m, n * h)
        if name.endswith(("hc_attn_base", "hc_ffn_base")):
            return rand(m)
        if name.endswith(("hc_attn_scale", "hc_ffn_scale")):
            return ones(3)
        if name == "hc_head_fn":
            return rand(n, n * h)
        if name == "hc_head_base":
            return rand(n)
        if name == "hc_head_scale":
            return ones(1)
        if name.endswith("attn_sink"):
            return rand(c["num_attention_heads"], std=1.0)
        if name.endswith("compressor.ape"):
            return rand(ratio, (2 if ratio == c["compress_rate_csa"] else 1) * width)
        if name.endswith("indexer.weights_proj.weight"):
            return rand(c["index_n_heads"], h)
        if name.endswith("gate.weight"):
            return rand(e, h)
        if name.endswith("gate.bias"):
            return rand(e, std=0.01)
        if name.endswith("gate.tid2eid"):
            k = c["num_experts_per_tok"]
            return torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(i))[:k]
                                for i in range(c["vocab_size"])]).to(dev)
        raise CheckpointError("the synthetic checkpoint has no such tensor", tensor=name)
