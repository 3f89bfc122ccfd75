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
}


class SyntheticCheckpoint:
    def __init__(self, name: str, *, bits: float = 4, head_bits: float = 6, codebook=Codebook.MCG,
                 device="cuda", dtype=torch.float16, seed: int = 0):
        if name not in CONFIGS:
            raise KeyError(f"unknown synthetic model {name!r}; known: {', '.join(CONFIGS)}")
        self.config = dict(CONFIGS[name])
        self.config_path = f"<synthetic {name}>"
        self.architecture = self.config["architectures"][0]
        self.bits, self.head_bits, self.codebook = bits, head_bits, Codebook(codebook)
        self.device, self.dtype = torch.device(device), dtype
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.weight_bytes = 0  # EXL3 bytes handed out so far (what one decode step reads)

    def linear_format(self, key: str) -> str:
        return "exl3"

    def has_tensor(self, name: str) -> bool:
        return True

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
        h, v = self.config["hidden_size"], self.config["vocab_size"]
        if name.endswith("embed_tokens.weight"):
            return torch.randn(v, h, generator=self.gen, device=self.device).to(dtype or self.dtype) * 0.02
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            return torch.ones(h, device=self.device, dtype=dtype or torch.float32)
        raise CheckpointError("the synthetic checkpoint has no such tensor", tensor=name)

    def info(self, name: str):
        raise CheckpointError("synthetic checkpoints have no files", tensor=name)
