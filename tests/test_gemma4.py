"""Gemma 4 adapter: golden logits, transformers on tiny configs, ring cache, EXL3 storage, config errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import exl3_triton
from exl3_triton.arch.blocks.rope import RopeConfig, inverse_frequencies
from exl3_triton.arch.gemma4 import Gemma4Config
from exl3_triton.errors import CheckpointError, ConfigError
from exl3_triton.kernels import exl3_full_weight
from exl3_triton.runtime import Generator, Job

from .conftest import random_exl3_tensors, rel_err, write_checkpoint
from .hf_models import gemma4_model, hf_logits
from .runtime_helpers import cached_logits


def _ids(n: int, vocab: int, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ------------------------------------------------------------------ golden


def test_golden_unquantized_matches_transformers(golden):
    ref = load_file(str(golden / "hf" / "gemma4_hf_logits.safetensors"))
    model = exl3_triton.load(golden / "hf" / "gemma4")
    assert rel_err(model.forward(ref["ids"]), ref["logits"]) < 1e-4


@pytest.mark.parametrize("chunks,page_size", [([96], 16), ([5, 40], 16), ([3, 11], 8), ([70], 32), ([], 16)])
def test_golden_prefill_and_decode_agree_beyond_the_window(golden, chunks, page_size):
    """96 tokens = 3x the window of 32: the ring cache wraps around several times."""
    model = exl3_triton.load(golden / "hf" / "gemma4")
    ids = json.loads((golden / "hf" / "gemma4_ids.json").read_text())
    full = model.forward(torch.tensor(ids))
    step = cached_logits(model, ids, chunks=chunks, page_size=page_size)
    assert rel_err(step, full) < 1e-4
    assert torch.equal(step.argmax(-1), full.argmax(-1))


def test_unified_variant_loads_the_same_text_tower(golden, tmp_path):
    shutil.copytree(golden / "hf" / "gemma4", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["Gemma4UnifiedForConditionalGeneration"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ids = torch.tensor(json.loads((golden / "hf" / "gemma4_ids.json").read_text())[:20])
    a = exl3_triton.load(golden / "hf" / "gemma4").forward(ids)
    assert torch.equal(exl3_triton.load(tmp_path / "m").forward(ids), a)


def test_vision_tower_is_skipped_with_a_notice(golden, caplog):
    with caplog.at_level("INFO", logger="exl3_triton.arch.gemma4"):
        exl3_triton.load(golden / "hf" / "gemma4")
    assert any("vision" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ transformers on tiny configs

# hidden sizes with an exact bf16 sqrt (64, 256): transformers scales fp32 embeddings by the
# exact sqrt(hidden), the model (and we) by its bf16 rounding; see test_embedding_scale_is_bf16_rounded
VARIANTS = {
    "k_eq_v": dict(hidden_size=64, sliding_window=7, global_head_dim=64, num_global_key_value_heads=1),
    "separate_v": dict(hidden_size=64, head_dim=16, sliding_window=12, attention_k_eq_v=False, global_head_dim=128,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    "moe": dict(hidden_size=256, sliding_window=9, global_head_dim=64, enable_moe_block=True, num_experts=4,
                top_k_experts=2, moe_intermediate_size=48),
    "causal_lm": dict(hidden_size=64, sliding_window=5, global_head_dim=32, final_logit_softcapping=None,
                      causal_lm=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_config_matches_transformers(tmp_path, variant):
    hf = gemma4_model(tmp_path / "m", **VARIANTS[variant])
    model = exl3_triton.load(tmp_path / "m")
    window = hf.config.get_text_config().sliding_window
    ids = _ids(3 * window + 5, hf.config.get_text_config().vocab_size)
    full = model.forward(torch.tensor(ids))
    assert rel_err(full, hf_logits(hf, ids)) < 1e-4
    step = cached_logits(model, ids, chunks=[window + 2], page_size=8)
    assert rel_err(step, full) < 1e-4


def test_window_really_limits_attention(tmp_path):
    """Oracle check that the tiny tests exercise the window: a wider one changes later logits only."""
    narrow = gemma4_model(tmp_path / "a", **VARIANTS["k_eq_v"])
    wide = gemma4_model(tmp_path / "b", **dict(VARIANTS["k_eq_v"], sliding_window=64))
    ids = _ids(30, 320)
    a, b = hf_logits(narrow, ids), hf_logits(wide, ids)
    assert rel_err(a[:7], b[:7]) < 1e-6 and rel_err(a[7:], b[7:]) > 1e-3
    assert rel_err(exl3_triton.load(tmp_path / "b").forward(torch.tensor(ids)), b) < 1e-4


def test_concurrent_jobs_match_single_runs(golden):
    """Several sequences with their own rings in one batch; each must equal its solo run."""
    model = exl3_triton.load(golden / "hf" / "gemma4")
    prompts = [_ids(n, 512, seed=n) for n in (40, 7, 50)]

    def run(prompt_list):
        gen = Generator(model, max_batch_size=4, max_seq_len=160, chunk_size=32)
        jobs = [gen.enqueue(Job(p, max_new_tokens=12, stop_tokens=[])) for p in prompt_list]
        list(gen.iterate())
        return [j.output_ids for j in jobs]

    together = run(prompts)
    for p, out in zip(prompts, together):
        assert run([p]) == [out]
    # greedy decoding from the cache equals the argmax of a full forward over the same tokens
    seq = prompts[0] + together[0]
    full = model.forward(torch.tensor(seq))
    assert full[len(prompts[0]) - 1:-1].argmax(-1).tolist() == together[0]


# ------------------------------------------------------------------ EXL3 storage


def _exl3_gemma4(tmp_path):
    """A random-trellis EXL3 Gemma 4 (MoE, k_eq_v full layer, separate quantized lm_head, vision
    tensors) and the same model with every weight decoded, as an unquantized checkpoint."""
    text = dict(vocab_size=320, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
                attention_k_eq_v=True, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                final_logit_softcapping=30.0, tie_word_embeddings=True, hidden_size_per_layer_input=0,
                enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=128,
                max_position_embeddings=512)
    hf = gemma4_model(tmp_path / "dense", **text)  # source of the unquantized tensors (norms, router, embedding)
    dense = load_file(str(tmp_path / "dense" / "model.safetensors"))
    pre = "model.language_model"
    exl3, decoded = {}, dict(dense)
    seed = [0]

    def quantize(key: str, n_in: int, n_out: int, bits: int):
        seed[0] += 1
        padded_out = -(-n_out // 128) * 128
        t = random_exl3_tensors(key, n_in, padded_out, bits, seed=seed[0])
        exl3.update(t)

    layer_linears = []
    for i, kind in enumerate(text["layer_types"]):
        hd = 64 if kind == "sliding_attention" else 128
        kv = 2 if kind == "sliding_attention" else 1
        a = f"{pre}.layers.{i}.self_attn"
        layer_linears += [(f"{a}.q_proj", 256, 4 * hd), (f"{a}.k_proj", 256, kv * hd), (f"{a}.o_proj", 4 * hd, 256)]
        if kind == "sliding_attention":
            layer_linears.append((f"{a}.v_proj", 256, kv * hd))
        m = f"{pre}.layers.{i}.mlp"
        layer_linears += [(f"{m}.gate_proj", 256, 256), (f"{m}.up_proj", 256, 256), (f"{m}.down_proj", 256, 256)]
        for e in range(4):
            x = f"{pre}.layers.{i}.experts.{e}"
            layer_linears += [(f"{x}.gate_proj", 256, 128), (f"{x}.up_proj", 256, 128), (f"{x}.down_proj", 128, 256)]
    for n, (key, n_in, n_out) in enumerate(layer_linears):
        quantize(key, n_in, n_out, bits=2 + n % 3)
    quantize("lm_head", 256, 320, bits=6)
    for key in [k for k in dense if k.endswith("_proj.weight") or k.endswith("experts.gate_up_proj")
                or k.endswith("experts.down_proj")]:
        if not key.startswith("model.vision"):
            del dense[key]
    tensors = {**dense, **exl3}
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "exl3", "version": "0.0.4", "bits": 3.0, "head_bits": 6,
                                  "calibration": {"rows": 8, "cols": 256}}
    qdir = write_checkpoint(tmp_path / "exl3", tensors, cfg)

    # the oracle: every EXL3 linear decoded by the reference decoder, written unquantized
    from exl3_triton.checkpoint import Checkpoint

    ck = Checkpoint(qdir)
    for key, n_in, n_out in layer_linears:
        decoded[f"{key}.weight"] = exl3_full_weight(ck.exl3_linear(key)).T[:n_out, :n_in].contiguous()
    for i in range(2):
        x = f"{pre}.layers.{i}.experts"
        gate = [decoded.pop(f"{x}.{e}.gate_proj.weight") for e in range(4)]
        up = [decoded.pop(f"{x}.{e}.up_proj.weight") for e in range(4)]
        decoded[f"{x}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        decoded[f"{x}.down_proj"] = torch.stack([decoded.pop(f"{x}.{e}.down_proj.weight") for e in range(4)])
    head = exl3_full_weight(ck.exl3_linear("lm_head")).T[:320].contiguous()
    hf.load_state_dict({k: v for k, v in decoded.items() if not k.startswith("lm_head")}, strict=False)
    hf.model.language_model.embed_tokens.weight.data.copy_(decoded[f"{pre}.embed_tokens.weight"])
    hf.lm_head = torch.nn.Linear(256, 320, bias=False)  # untie: the EXL3 head is its own tensor
    hf.lm_head.weight.data.copy_(head)
    return qdir, hf


def test_exl3_checkpoint_matches_transformers_on_decoded_weights(tmp_path):
    qdir, hf = _exl3_gemma4(tmp_path)
    model = exl3_triton.load(qdir)
    net = model.network
    assert not net.layers[1].self_attn.has_v_proj and net.lm_head.is_exl3
    assert net.layers[0].moe.experts.quantized
    ids = _ids(20, 320)
    ours = model.forward(torch.tensor(ids))
    assert rel_err(ours, hf_logits(hf, ids)) < 1e-4
    assert rel_err(cached_logits(model, ids, chunks=[4], page_size=4), ours) < 1e-4


# ------------------------------------------------------------------ config and small pieces


def test_embedding_scale_is_bf16_rounded():
    # architectures.md 1.3: sqrt(5376) = 73.32 rounds to 73.5 in bf16, as the model was trained
    cfg = Gemma4Config.from_hf(_text_config(hidden_size=5376), "config.json", text_tower=True)
    assert cfg.embed_scale == 73.5


def test_proportional_rope_frequencies():
    # head_dim 16, factor 0.25: int(0.25 * 16 // 2) = 2 rotated pairs with divisor 16, the rest zero
    inv = inverse_frequencies(RopeConfig(theta=10000.0, rope_type="proportional", partial_rotary_factor=0.25), 16)
    expected = torch.tensor([1.0, 10000.0 ** (-2 / 16), 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(inv, expected)


def _text_config(**overrides):
    text = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"])
    text.update(overrides)
    return {"architectures": ["Gemma4ForConditionalGeneration"], "text_config": text}


def test_full_layer_shape_from_global_keys():
    cfg = Gemma4Config.from_hf(_text_config(global_head_dim=64, num_global_key_value_heads=1, attention_k_eq_v=True),
                               "c", text_tower=True)
    assert [(lc.head_dim, lc.num_kv_heads, lc.k_eq_v) for lc in cfg.layers] == [(16, 2, False), (64, 1, True)]
    # without k_eq_v transformers ignores num_global_key_value_heads
    cfg = Gemma4Config.from_hf(_text_config(global_head_dim=64, num_global_key_value_heads=1), "c", text_tower=True)
    assert (cfg.layers[1].head_dim, cfg.layers[1].num_kv_heads) == (64, 2)


@pytest.mark.parametrize("overrides,key", [
    (dict(hidden_size_per_layer_input=16), "text_config.hidden_size_per_layer_input"),
    (dict(num_kv_shared_layers=1), "text_config.num_kv_shared_layers"),
    (dict(use_bidirectional_attention="all"), "text_config.use_bidirectional_attention"),
    (dict(per_layer_config={"0": {"head_dim": 32}}), "text_config.per_layer_config.0"),
    (dict(per_layer_config={"1": {"sliding_window": 3}}), "text_config.per_layer_config.1.sliding_window"),
    (dict(layer_types=["sliding_attention"]), "text_config.layer_types"),
    (dict(enable_moe_block=True, num_experts=4, top_k_experts=5, moe_intermediate_size=8), "text_config.top_k_experts"),
])
def test_unsupported_config_is_named(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Gemma4Config.from_hf(_text_config(**overrides), "config.json", text_tower=True)


def test_k_eq_v_with_a_stored_v_proj_is_rejected(golden, tmp_path):
    shutil.copytree(golden / "hf" / "gemma4", tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    k = tensors["model.language_model.layers.5.self_attn.k_proj.weight"]
    tensors["model.language_model.layers.5.self_attn.v_proj.weight"] = k.clone()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    write_checkpoint(tmp_path / "m", tensors, cfg)
    with pytest.raises(CheckpointError, match="layers.5.self_attn.v_proj"):
        exl3_triton.load(tmp_path / "m")
