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
