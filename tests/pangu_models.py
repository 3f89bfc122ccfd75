"""Tiny random OpenPanguV2 checkpoints (real tensor names and config keys, architectures.md §3.1-3.2)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = dict(
    architectures=["OpenPanguV2ForCausalLM"], model_type="openpangu_v2", vocab_size=256, hidden_size=128,
    num_hidden_layers=2, num_nextn_predict_layers=1, num_attention_heads=2, q_lora_rank=64, kv_lora_rank=32,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, rope_theta=6400000.0, rope_interleave=False,
    max_position_embeddings=4096, rms_norm_eps=1e-5, dsa_layers=[0], swa_layers=[1, 2], sliding_window_list=[8, 16],
    sliding_window=8, index_topk=8, index_n_heads=4, index_head_dim=32, param_sink_number=4,
    param_sink_with_value=True, use_mome=True, router_sliding_window=3, use_mhc=True, mhc_num_stream=4,
    mhc_recur_norm=20, mhc_use_gamma=True, sandwich_norm=True, block_post_layernorm_idx=[0],
    first_k_dense_replace=1, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=2,
    num_experts_per_tok=1, n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
    routed_scaling_factor=2.5, router_enable_expert_bias=True, hidden_act="silu", tie_word_embeddings=False,
    use_mla=True, torch_dtype="bfloat16", bos_token_id=2, eos_token_id=1, pad_token_id=0,
)


def tiny_pangu(directory: Path, seed: int = 0, head_logit_std: float = 3.0, channel_spread: float = 0.0,
               **overrides) -> Path:
    """Write a random OpenPanguV2 model. ``head_logit_std``: the head is scaled so that logits have
    about this deviation (a confident output; see tests/convert/test_convert_gemma4.py for why).
    ``channel_spread``: embedding channels scaled by ``exp(spread * N(0, 1))``, the uneven channel
    sizes of trained models (isotropic activations leave a Hessian-aware quantizer nothing to use)."""
    cfg = dict(TINY, **overrides)
    g = torch.Generator().manual_seed(seed)
    h, n_streams, vocab = cfg["hidden_size"], cfg["mhc_num_stream"], cfg["vocab_size"]
    heads, rq, rkv = cfg["num_attention_heads"], cfg["q_lora_rank"], cfg["kv_lora_rank"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    t: dict[str, torch.Tensor] = {}

    def lin(name, n_out, n_in, gain=1.0):
        t[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g) * gain / n_in**0.5

    def norm(name, size):
        t[f"{name}.weight"] = 1 + 0.1 * torch.randn(size, generator=g)

    def mhc(name, rows, head=False):
        width = n_streams * h
        t[f"{name}.phi.weight"] = torch.randn(rows, width, generator=g) / width**0.5
        t[f"{name}.norm_gamma"] = 1 + 0.1 * torch.randn(width, generator=g)
        if head:
            t[f"{name}.branch_alpha_pre"] = torch.full((1,), 0.5)
            t[f"{name}.branch_beta_pre"] = 0.5 * torch.randn(rows, generator=g)
        else:
            t[f"{name}.branch_alpha"] = torch.tensor([0.5, 0.5, 1.0])
            t[f"{name}.branch_beta"] = 0.5 * torch.randn(rows, generator=g)

    def mlp(name, inter):
        lin(f"{name}.gate_proj", inter, h)
        lin(f"{name}.up_proj", inter, h)
        lin(f"{name}.down_proj", h, inter)

    n_layers = cfg["num_hidden_layers"]
    t["model.embed_tokens.weight"] = torch.randn(vocab, h, generator=g) * torch.exp(
        channel_spread * torch.randn(h, generator=g))
    for i in range(n_layers + cfg["num_nextn_predict_layers"]):
        p, mtp = f"model.layers.{i}", i >= n_layers
        for name in ("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm"):
            norm(f"{p}.{name}", h)
        a = f"{p}.self_attn"
        lin(f"{a}.q_a_proj", rq, h)
        norm(f"{a}.q_a_layernorm", rq)
        lin(f"{a}.q_b_proj", heads * (nope + rope), rq)
        lin(f"{a}.kv_a_proj_with_mqa", rkv + rope, h)
        norm(f"{a}.kv_a_layernorm", rkv)
        lin(f"{a}.kv_b_proj", heads * (nope + v), rkv)
        lin(f"{a}.o_proj", h, heads * v)
        for conv, ch in (("qa_conv", rq), ("compresskv_conv", rkv), ("o_conv", heads * v)):
            t[f"{a}.{conv}.weight"] = 0.3 * torch.randn(ch, 1, cfg["router_sliding_window"], generator=g)
        t[f"{a}.param_sink_compressed_kv"] = torch.randn(cfg["param_sink_number"], rkv, generator=g)
        t[f"{a}.param_sink_k_pe"] = torch.randn(cfg["param_sink_number"], rope, generator=g)
        if i in cfg["dsa_layers"]:
            x = f"{a}.indexer"
            lin(f"{x}.wq_b", cfg["index_n_heads"] * cfg["index_head_dim"], rq)
            lin(f"{x}.wk", cfg["index_head_dim"], h)
            norm(f"{x}.k_norm", cfg["index_head_dim"])
            lin(f"{x}.weights_proj", cfg["index_n_heads"], h)
        if i < cfg["first_k_dense_replace"]:
            mlp(f"{p}.mlp", cfg["intermediate_size"])
        else:
            e = cfg["n_routed_experts"]
            lin(f"{p}.mlp.gate", e, h)
            t[f"{p}.mlp.e_score_correction_bias"] = 0.1 * torch.randn(e, generator=g)
            for j in range(e):
                mlp(f"{p}.mlp.experts.{j}", cfg["moe_intermediate_size"])
            mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
        if mtp:
            norm(f"{p}.enorm", h)
            norm(f"{p}.hnorm", h)
            lin(f"{p}.eh_proj", h, 2 * h)
            norm(f"{p}.shared_head.norm", h)
        else:
            mhc(f"{p}.attn_mhc_module", (2 + n_streams) * n_streams)
            mhc(f"{p}.mlp_mhc_module", (2 + n_streams) * n_streams)
            if i in cfg["block_post_layernorm_idx"]:
                norm(f"{p}.block_post_layernorm", n_streams * h)
    mhc("model.merge_mhc_module", n_streams, head=True)
    norm("model.norm", h)
    lin("lm_head", vocab, h, gain=head_logit_std)
    for i in range(n_layers, n_layers + cfg["num_nextn_predict_layers"]):  # the per-depth copies
        t[f"model.layers.{i}.embed_tokens.weight"] = t["model.embed_tokens.weight"]
        t[f"model.layers.{i}.shared_head.head.weight"] = t["lm_head.weight"]
    tensors = {k: (w if k.endswith("e_score_correction_bias") else w.to(torch.bfloat16)).contiguous().clone()
               for k, w in t.items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
