"""The converter on DeepSeek-V4: which tensors become EXL3 (the plan of a CSA layer, checked without
quantizing), and a tiny one-layer model converted for real: wo_a cut per output group, the hash layer
calibrated with its token ids, the converted model equal to the source with decoded weights; a DSpark
block drafter quantized (main_proj, attention, experts) with its markov and confidence heads as stored.

The converted model is kept small for the CPU Viterbi (about 0.1 s per 16x16 tile here): one HCA layer,
two experts and no shared expert, so 14 linears and the head."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import exl3_triton
from exl3_triton.checkpoint import Checkpoint
from exl3_triton.convert import ConvertOptions, convert_model
from exl3_triton.kernels import exl3_full_weight

from ..conftest import rel_err
from ..hf_models import deepseek_v4_model

FAST = dict(cal_rows=8, cal_cols=128, scale_search="fast")


def test_plan_of_a_csa_layer(golden):
    """Golden native model: layer 2 is CSA (compressor, indexer), layer 0 sliding; 8 experts + shared."""
    from exl3_triton.convert.families import family_for

    ck = Checkpoint(golden / "hf" / "dsv4_native")
    plan = family_for("DeepseekV4ForCausalLM").plan(ck.config, ck.has_tensor)
    keys = [s.key for s in plan.layers[2]]
    attn = ["wq_a", "wkv", "compressor.wkv", "compressor.wgate", "indexer.compressor.wkv",
            "indexer.compressor.wgate", "wq_b", "indexer.wq_b", "wo_a.0", "wo_a.1", "wo_b"]
    assert keys[:11] == [f"layers.2.attn.{m}" for m in attn]
    assert len(keys) == 11 + 3 * 8 + 3 and "layers.2.ffn.shared_experts.w2" in keys
    assert [s.key for s in plan.layers[0]][:3] == ["layers.0.attn.wq_a", "layers.0.attn.wkv", "layers.0.attn.wq_b"]
    by_key = {s.key: s for s in plan.layers[2]}
    assert by_key["layers.2.attn.wo_a.1"].source.rows == (64, 128)  # o_lora_rank 64, second group
    assert by_key["layers.2.attn.wq_b"].input_group == by_key["layers.2.attn.indexer.wq_b"].input_group
    # never quantized: router, indexer scoring head, everything not a linear of the plan
    quantized = {s.key for layer in plan.layers for s in layer}
    assert not any(k.endswith((".gate", ".weights_proj")) for k in quantized)
    assert plan.head_key == "head" and plan.embedding_key == "embed"


def _add_dspark(tensors: dict, cfg: dict) -> None:
    """A one-block DSpark drafter (native ``mtp.*`` names, bf16): the layer's attention without its
    compressor and its experts as the block, taps at layer 0, markov rank 8, block of 2."""
    g = torch.Generator().manual_seed(3)
    for name in [n for n in tensors if n.startswith("model.layers.0.")]:
        rest = name[len("model.layers.0."):]
        if "compressor" in rest or "tid2eid" in rest:
            continue
        rest = rest.replace("attn.norm.", "attn.kv_norm.")
        tensors[f"mtp.0.{rest}"] = (tensors[name] * (1 + 0.1 * torch.randn(tensors[name].shape, generator=g))).bfloat16()
    for name, shape in (("mtp.0.main_proj.weight", (64, 64)), ("mtp.0.hc_head_fn", (4, 256)),
                        ("mtp.0.hc_head_base", (4,)), ("mtp.0.markov_head.markov_w1.weight", (128, 8)),
                        ("mtp.0.markov_head.markov_w2.weight", (128, 8)),
                        ("mtp.0.confidence_head.proj.weight", (1, 72)), ("mtp.0.confidence_head.proj.bias", (1,))):
        tensors[name] = (0.1 * torch.randn(shape, generator=g)).bfloat16()
    for name in ("mtp.0.main_norm.weight", "mtp.0.norm.weight", "mtp.0.hc_head_scale"):
        tensors[name] = torch.ones(1 if name.endswith("scale") else 64).bfloat16()
    cfg.update(dspark_block_size=2, dspark_noise_token_id=127, dspark_markov_rank=8, dspark_target_layer_ids=[0])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src = tmp_path_factory.mktemp("dsv4") / "src"
    deepseek_v4_model(src, num_hidden_layers=1, layer_types=["heavily_compressed_attention"],
                      mlp_layer_types=["hash_moe"], n_routed_experts=2, num_experts_per_tok=1)
    tensors = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if "shared_experts" not in k}
    cfg = json.loads((src / "config.json").read_text())
    cfg["n_shared_experts"] = 0
    _add_dspark(tensors, cfg)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(cfg))
    out = src.parent / "q4"
    result = convert_model(src, out, ConvertOptions(bits=4, head_bits=6, codebook="mcg", **FAST))
    return src, out, result


def test_tensor_formats(converted):
    src, out, _ = converted
    ck, source = Checkpoint(out), Checkpoint(src)
    a, f = "model.layers.0.attn", "model.layers.0.ffn"
    attention = ("wq_a", "wq_b", "wkv", "wo_a.0", "wo_a.1", "wo_b")
    experts = {f"{x}.{w}" for x in ("experts.0", "experts.1") for w in ("w1", "w2", "w3")}
    expected = {"head"} | {f"{a}.{m}" for m in attention + ("compressor.wkv", "compressor.wgate")} | {
        f"{f}.{e}" for e in experts} | {"mtp.0.main_proj"} | {f"mtp.0.attn.{m}" for m in attention} | {
        f"mtp.0.ffn.{e}" for e in experts}
    assert set(ck.exl3_linear_keys()) == expected
    assert not ck.has_tensor(f"{a}.wo_a.weight") and not ck.has_tensor("mtp.0.attn.wo_a.weight")
    assert any(n.startswith("mtp.0.") for n in source.tensor_names())
    # router, tid2eid, weights_proj, sinks, ape, norms, mHC, the DSpark markov and confidence heads: as stored
    for name in source.tensor_names():
        if name.rpartition(".")[0] not in expected and not name.endswith("wo_a.weight"):
            assert ck.info(name).dtype == source.info(name).dtype, name
            assert torch.equal(ck.tensor(name), source.tensor(name)), name
    wo_a = source.tensor(f"{a}.wo_a.weight").float()
    for g in range(2):  # each group slice quantized on its own: rows [16 g, 16 (g+1))
        w = exl3_full_weight(ck.exl3_linear(f"{a}.wo_a.{g}")).T[:16, :64]
        assert rel_err(w, wo_a[16 * g:16 * (g + 1)]) < 0.15


def test_converted_model_equals_source_with_decoded_weights_and_tracks_it(converted, tmp_path):
    src, out, result = converted
    ck = Checkpoint(out)
    decoded = load_file(str(src / "model.safetensors"))
    for key in ck.exl3_linear_keys():
        w = exl3_full_weight(ck.exl3_linear(key)).T
        if ".wo_a." in key:
            continue
        rows, cols = decoded[f"{key}.weight"].shape  # EXL3 tensors are padded to 128s
        decoded[f"{key}.weight"] = w[:rows, :cols].contiguous()
    for a in ("model.layers.0.attn", "mtp.0.attn"):
        decoded[f"{a}.wo_a.weight"] = torch.cat([exl3_full_weight(ck.exl3_linear(f"{a}.wo_a.{g}")).T[:16, :64]
                                                 for g in range(2)]).contiguous()
    (tmp_path / "decoded").mkdir()
    shutil.copy(src / "config.json", tmp_path / "decoded" / "config.json")
    save_file(decoded, str(tmp_path / "decoded" / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    q_model, d_model = exl3_triton.load(out), exl3_triton.load(tmp_path / "decoded")
    quantized = q_model.forward(ids)
    assert rel_err(quantized, d_model.forward(ids)) < 1e-4
    # the quantized DSpark drafter drafts like its decoded weights do
    from ..test_dspark import _draft, _prefill

    drafts = [_draft(m, *_prefill(m, [ids.tolist()]), [5]).logits for m in (q_model, d_model)]
    assert rel_err(drafts[0], drafts[1]) < 1e-4
    source = exl3_triton.load(src).forward(ids)
    assert rel_err(quantized, source) < 0.2
    for key, rec in result.records.items():
        assert rec.predicted_error < (0.03 if key == "head" else 0.12), key


def test_dspark_drafter_loads_back_quantized_and_drafts(converted):
    """The converted model runs its DSpark drafter (EXL3 linears, 16-bit markov and confidence heads) over
    its EXL3 trunk: greedy output with block drafting equals greedy output without."""
    from exl3_triton import Generator, Job
    from exl3_triton.arch.blocks.linear import Linear
    from exl3_triton.runtime.drafting_options import DraftOptions

    _, out, _ = converted
    model = exl3_triton.load(out)
    drafter = model.network.block_drafter
    assert drafter is not None and model.network.layers[0].attn.wq_a.is_exl3
    linears = [m for m in drafter.modules() if isinstance(m, Linear)]
    # main_proj; wq_a, wq_b, wkv, wo_a per group (2), wo_b; the 2 experts' 6 linears are EXL3 too (fused)
    assert len(linears) == 1 + 6 and all(lin.is_exl3 for lin in linears)
    assert drafter.blocks[0].moe.experts.quantized
    assert drafter.markov_w1.shape == (128, 8) and drafter.confidence_bias is not None
    prompt = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    outputs = []
    for draft in (None, DraftOptions(mode="mtp", num_tokens=2, confidence_threshold=0.0)):
        gen = Generator(model, max_batch_size=1, max_seq_len=64, page_size=128, draft=draft)
        job = gen.enqueue(Job(prompt, max_new_tokens=10, stop_tokens=[]))
        list(gen.iterate())
        outputs.append(job.output_ids)
    assert outputs[0] == outputs[1] and gen.draft_stats.steps > 0
