"""Synthetic EXL3 checkpoints of real model shapes, generated on the GPU.

``SyntheticCheckpoint`` answers the same questions an adapter asks a real
``Checkpoint`` (config, ``linear(key)``, ``tensor(name)``, ``linear_format(key)``)
with random tensors of the right shapes: a random trellis is a valid EXL3 weight
(any bit pattern decodes), so speed measurements need no download.
"""

from __future__ import annotations

import torch

from exl3_triton.errors import CheckpointError
from exl3_triton.kernels.weights import Codebook, Exl3Weight

def _gemma4(text: dict) -> dict:
    base = {
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True, "hidden_size_per_layer_input": 0, "attention_k_eq_v": True,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                               "rope_theta": 1000000.0}},
    }
    return {"architectures": ["Gemma4ForConditionalGeneration"], "text_config": dict(base, **text)}


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
}


class SyntheticCheckpoint:
    def __init__(self, name: str, *, bits: float = 4, head_bits: float = 6, codebook=Codebook.MCG,
                 device="cuda", dtype=torch.float16, seed: int = 0):
        if name not in CONFIGS:
            raise KeyError(f"unknown synthetic model {name!r}; known: {', '.join(CONFIGS)}")
        self.config = dict(CONFIGS[name])
        self.config_path = self.model_dir = f"<synthetic {name}>"
        self.text = self.config.get("text_config", self.config)
        self.architecture = self.config["architectures"][0]
        self.bits, self.head_bits, self.codebook = bits, head_bits, Codebook(codebook)
        self.device, self.dtype = torch.device(device), dtype
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.weight_bytes = 0  # EXL3 bytes handed out so far (what one decode step reads)

    def _gemma4_full_layer(self, name: str) -> bool:
        layer = int(name.split(".layers.")[1].split(".")[0])
        return self.text["layer_types"][layer] == "full_attention"

    def linear_format(self, key: str) -> str | None:
        if "gemma4" in self.architecture.lower() and key.endswith("v_proj") and self._gemma4_full_layer(key):
            return None  # attention_k_eq_v: full layers have no v_proj
        return "exl3"

    def has_tensor(self, name: str) -> bool:
        return True

    def tensor_names(self) -> list[str]:
        return []

    def linear(self, key: str, *, in_features: int, out_features: int, device=None, dense_dtype=None) -> Exl3Weight:
        k, n = -(-in_features // 128) * 128, -(-out_features // 128) * 128
        bits = self.head_bits if key == "lm_head" else self.bits
        words = int(16 * bits)
        g, dev = self.gen, self.device
        trellis = torch.randint(-32768, 32768, (k // 16, n // 16, words), generator=g, device=dev,
                                dtype=torch.int32).to(torch.int16)
        suh = (torch.randn(k, generator=g, device=dev) * 0.02).half()
        svh = (torch.randn(n, generator=g, device=dev) * 0.02).half()
        w = Exl3Weight(trellis, suh, svh, bits, self.codebook, key=key)
        self.weight_bytes += w.nbytes
        return w

    def tensor(self, name: str, *, dtype=None, device=None) -> torch.Tensor:
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

    def info(self, name: str):
        raise CheckpointError("synthetic checkpoints have no files", tensor=name)
