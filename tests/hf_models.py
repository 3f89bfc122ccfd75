"""Tiny transformers models built inside tests, saved as checkpoints: the oracle for adapters.

Every parameter and buffer that a checkpoint stores is randomised (norm weights
around 1, ``layer_scalar`` in [0.5, 1.5], router scales), so a test fails if any
of them is read wrongly or ignored. transformers is imported lazily: only tests
that compare against it need it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def transformers_or_skip():
    """Import transformers (skip the test without it).

    pytest puts the repository root on ``sys.path``, where our ``kernels/``
    source folder looks like the Hugging Face ``kernels`` package that
    transformers probes for; so import it, and run that (cached) probe, with
    the root left out.
    """
    import pytest

    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != REPO_ROOT]
    try:
        transformers = pytest.importorskip("transformers", minversion="5.23")
        from transformers.utils import import_utils

        import_utils.is_kernels_available()
    finally:
        sys.path[:] = saved
    return transformers


def randomise_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name or "embed_scale" in name:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or leaf in ("scale", "per_expert_scale"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif leaf == "layer_scalar":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


GEMMA4_TEXT_BASE = dict(
    vocab_size=320, hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
    sliding_window=7, layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
    final_logit_softcapping=30.0, tie_word_embeddings=True, hidden_size_per_layer_input=0,
    attention_k_eq_v=True, max_position_embeddings=512,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}},
)

GEMMA4_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=16, patch_size=16, pooling_kernel_size=3)


def gemma4_model(directory: Path, *, seed: int = 0, causal_lm: bool = False, **text_overrides):
    """A random ``Gemma4ForConditionalGeneration`` (or ``Gemma4ForCausalLM``) saved to ``directory``.

    ``text_overrides`` may include ``global_head_dim`` and ``num_global_key_value_heads``
    (transformers turns them into ``per_layer_config``). Returns the model (fp32, eval).
    """
    transformers = transformers_or_skip()
    from transformers.models.gemma4 import Gemma4Config, Gemma4TextConfig

    text = dict(GEMMA4_TEXT_BASE, **text_overrides)
    torch.manual_seed(seed)
    if causal_lm:
        model = transformers.Gemma4ForCausalLM(Gemma4TextConfig(**text))
    else:
        cfg = Gemma4Config(text_config=text, vision_config=GEMMA4_VISION, audio_config=None,
                           tie_word_embeddings=text.get("tie_word_embeddings", True))
        model = transformers.Gemma4ForConditionalGeneration(cfg)
    model = model.float().eval()
    randomise_(model, seed)
    model.save_pretrained(directory)
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


DSV4_BASE = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
    partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    index_n_heads=2, index_head_dim=16, index_topk=64, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, moe_intermediate_size=32, routed_scaling_factor=1.5, swiglu_limit=10.0,
    hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, rope_theta=10000.0,
    compress_rope_theta=160000.0, max_position_embeddings=1024, tie_word_embeddings=False,
    # YaRN on the compress rope, with a short original context so that the ramp falls inside the 4 frequencies
    rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64,
                     "beta_fast": 32.0, "beta_slow": 1.0},
)


def deepseek_v4_model(directory: Path, *, seed: int = 0, **overrides):
    """A random ``DeepseekV4ForCausalLM`` saved to ``directory`` (transformers' naming); returns it (fp32, eval).

    Besides ``randomise_``, the hash layers get a random token -> experts table (distinct experts per
    token) and the sink logits a wider spread, so that a misread table or a dropped sink shows.
    """
    transformers = transformers_or_skip()
    from transformers.models.deepseek_v4 import DeepseekV4Config

    torch.manual_seed(seed)
    cfg = DeepseekV4Config(**dict(DSV4_BASE, **overrides))
    model = transformers.DeepseekV4ForCausalLM(cfg).float().eval()
    randomise_(model, seed, std=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.mlp.is_hash:
                table = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok]
                                     for _ in range(cfg.vocab_size)])
                layer.mlp.gate.tid2eid.copy_(table)
            layer.self_attn.sinks.copy_(torch.randn(cfg.num_attention_heads, generator=g))
    model.save_pretrained(directory)
    return model
