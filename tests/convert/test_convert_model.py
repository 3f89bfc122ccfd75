"""The whole converter on tiny random Llama models: output format, round trip, logits, resume, errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import exl3_triton
from exl3_triton.checkpoint import Checkpoint
from exl3_triton.cli import main
from exl3_triton.convert import ConvertOptions, convert_model
from exl3_triton.errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    InvalidArgumentError,
    UnsupportedArchitectureError,
)
from exl3_triton.kernels import exl3_full_weight

from ..conftest import rel_err

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def make_tiny_llama(d: Path, *, hidden=128, inter=128, layers=2, vocab=128, heads=4, kv=2, tied=False, seed=0):
    """A random bf16 Llama (hidden 128) with a few side files, written like a Hugging Face checkpoint."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    hd = hidden // heads
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
           "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": tied, "max_position_embeddings": 256}

    def lin(n_out, n_in):  # uneven column scales, like real weights
        return (torch.randn(n_out, n_in, generator=g) * (0.5 + torch.rand(n_in, generator=g)) / n_in**0.5).bfloat16()

    t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16(),
         "model.norm.weight": (1 + 0.1 * torch.randn(hidden, generator=g)).bfloat16()}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes = {"self_attn.q_proj": (heads * hd, hidden), "self_attn.k_proj": (kv * hd, hidden),
                  "self_attn.v_proj": (kv * hd, hidden), "self_attn.o_proj": (hidden, heads * hd),
                  "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
        for name, shape in shapes.items():
            t[f"{p}.{name}.weight"] = lin(*shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"{p}.{norm}.weight"] = (1 + 0.1 * torch.randn(hidden, generator=g)).bfloat16()
    if not tied:
        t["lm_head.weight"] = lin(vocab, hidden) * 4
    save_file(t, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text('{"do_sample": false}')
    (d / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (d / "pytorch_model.bin").write_bytes(b"pickled weights the converter must not copy")
    return d


FAST = dict(cal_rows=8, cal_cols=32, scale_search="fast")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("src") / "llama")


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """The uninterrupted conversion, and a copy of its ``.work`` as it stood when layer 1 started: what
    a conversion interrupted there leaves behind (the resume test starts from it, so that layer 0 is
    quantized once per session, not twice)."""
    out = tmp_path_factory.mktemp("out") / "k4"
    work_after_layer_0 = tmp_path_factory.mktemp("work_after_layer_0") / ".work"

    def snapshot_when_layer_1_starts(event):
        if event.stage == "layer" and event.done == 1:
            shutil.copytree(out / ".work", work_after_layer_0)

    result = convert_model(tiny, out, ConvertOptions(bits=4, head_bits=4, codebook="mcg", **FAST),
                           progress=snapshot_when_layer_1_starts)
    assert work_after_layer_0.is_dir()
    return out, result, work_after_layer_0


def test_output_directory_matches_the_reference_layout(tiny, converted, golden):
    out, result, _ = converted
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "conversion_report.json", "generation_config.json", "model.safetensors",
                     "quantization_config.json", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    ref_cfg = json.loads((golden / "exl3" / "llama_k4_mcg" / "config.json").read_text())
    block = cfg["quantization_config"]
    assert set(ref_cfg["quantization_config"]) <= set(block)
    assert block["quant_method"] == "exl3" and block["bits"] == 4.0 and block["head_bits"] == 4
    assert block["codebook"] == "mcg" and block["calibration"] == {"rows": 8, "cols": 32}
    assert cfg["tie_word_embeddings"] is False and cfg["hidden_size"] == 128

    qcfg = json.loads((out / "quantization_config.json").read_text())
    ref_q = json.loads((golden / "exl3" / "llama_k4_mcg" / "quantization_config.json").read_text())
    assert list(qcfg["tensor_storage"]) == list(ref_q["tensor_storage"])  # same module keys, same order
    for key, entry in ref_q["tensor_storage"].items():
        ours = qcfg["tensor_storage"][key]
        assert set(ours) == set(entry), key
        assert [n for n in ours["stored_tensors"]] == [n for n in entry["stored_tensors"]], key
        for name, info in ours["stored_tensors"].items():
            assert info["dtype"] == entry["stored_tensors"][name]["dtype"], name
    q = qcfg["tensor_storage"]["model.layers.1.mlp.down_proj"]
    assert q["bits_per_weight"] == 4 and q["mcg_multiplier"] == 3417055213
    assert q["stored_tensors"]["model.layers.1.mlp.down_proj.trellis"] == {
        "shape": [8, 8, 64], "n_bytes": 8 * 8 * 64 * 2, "dtype": "torch.int16"}


def test_every_tensor_decodes_to_the_error_the_converter_predicted(tiny, converted):
    out, result, _ = converted
    src, ckpt = Checkpoint(tiny), Checkpoint(out)
    keys = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS] + ["lm_head"]
    assert sorted(ckpt.exl3_linear_keys()) == sorted(keys) == sorted(result.records)
    for key in keys:
        w = ckpt.exl3_linear(key)
        assert w.bits == 4 and w.codebook.label == "MCG"
        ref = src.tensor(f"{key}.weight").float()
        full = exl3_full_weight(w)[: ref.shape[1], : ref.shape[0]].T
        err = rel_err(full, ref)
        assert abs(err - result.records[key].predicted_error) < 1e-6, key
        assert err < 0.12, key  # ~0.07 expected at 4 bits
        assert result.records[key].proxy_error is not None
    # unquantized tensors are copied as stored: bf16 stays bf16, bit for bit
    for name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"]:
        assert ckpt.info(name).dtype == "BF16"
        assert torch.equal(ckpt.tensor(name), src.tensor(name))


def test_converted_model_tracks_the_unquantized_one(tiny, converted):
    out, _, _ = converted
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    base = exl3_triton.load(tiny).forward(ids)
    quant = exl3_triton.load(out).forward(ids)
    top1 = (base.argmax(-1) == quant.argmax(-1)).float().mean().item()
    assert rel_err(quant, base) < 0.15  # measured ~0.06
    assert top1 > 0.8  # chance is 1/128


def test_interrupted_conversion_resumes_and_gives_the_same_model(tiny, converted, tmp_path):
    """Resumed twice: from the work directory left after layer 0 (the fixture's copy), up to an
    interruption before the head, then to the end; the result equals the uninterrupted conversion."""
    out_ref, _, work_after_layer_0 = converted
    assert (work_after_layer_0 / "layer_0.json").exists() and not (work_after_layer_0 / "layer_1.json").exists()
    out = tmp_path / "resumed"
    shutil.copytree(work_after_layer_0, out / ".work")
    opts = ConvertOptions(bits=4, head_bits=4, codebook="mcg", **FAST)

    with pytest.raises(ConversionError, match="different options"):
        convert_model(tiny, out, ConvertOptions(bits=3, head_bits=4, codebook="mcg", **FAST))

    def stop_before_the_head(event):
        if event.stage == "head":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # quantizes layer 1 (on layer 0's saved hidden states), then stops
        convert_model(tiny, out, opts, progress=stop_before_the_head)
    assert (out / ".work" / "layer_1.json").exists() and not (out / ".work" / "head.json").exists()
    assert not (out / "model.safetensors").exists()

    result = convert_model(tiny, out, opts)
    assert result.resumed_units == ["layer_0", "layer_1"]
    assert not (out / ".work").exists()
    a, b = Checkpoint(out), Checkpoint(out_ref)
    assert a.tensor_names() == b.tensor_names()
    for name in a.tensor_names():
        assert torch.equal(a.tensor(name), b.tensor(name)), name


def test_uncalibrated_tied_model_with_fp16_head(tmp_path):
    src = make_tiny_llama(tmp_path / "src", layers=1, tied=True, seed=1)
    out = tmp_path / "out"
    result = convert_model(src, out, ConvertOptions(bits=3.5, head_bits=16, codebook="mul1", calibrate=False,
                                                    scale_search="none"))
    ckpt = Checkpoint(out)
    assert all(ckpt.exl3_linear(k).bits == 3.5 for k in ckpt.exl3_linear_keys())
    assert "lm_head" not in result.records
    head = ckpt.tensor("lm_head.weight")
    assert head.dtype == torch.float16 and torch.equal(head, Checkpoint(src).tensor("model.embed_tokens.weight").half())
    assert json.loads((out / "config.json").read_text())["quantization_config"]["head_bits"] == 16
    for key, rec in result.records.items():
        w = ckpt.exl3_linear(key)
        ref = Checkpoint(src).tensor(f"{key}.weight").float()
        assert abs(rel_err(exl3_full_weight(w)[: ref.shape[1], : ref.shape[0]].T, ref) - rec.predicted_error) < 1e-6
        assert rec.proxy_error is None
    logits = exl3_triton.load(out).forward(torch.arange(16))
    assert torch.isfinite(logits).all()


def test_writer_shards_by_top_level_module(tmp_path):
    from exl3_triton.convert.writer import write_tensors

    tensors = {"model.embed_tokens.weight": torch.randn(64, 64).bfloat16(),
               "model.layers.0.a.weight": torch.randn(64, 64).half(), "model.layers.0.b.trellis":
                   torch.zeros(4, 4, 64, dtype=torch.int16),
               "model.layers.1.a.weight": torch.randn(64, 64).half(), "lm_head.weight": torch.randn(8, 64).half()}
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    files = write_tensors(tensors, tmp_path, shard_size_bytes=10_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert files == sorted(set(index["weight_map"].values())) and len(files) == 3
    assert index["weight_map"]["model.layers.0.a.weight"] == index["weight_map"]["model.layers.0.b.trellis"]
    ckpt = Checkpoint(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(ckpt.tensor(name), t)


# ------------------------------------------------------------------ errors and the CLI

def test_bad_options_are_refused_by_name():
    with pytest.raises(InvalidArgumentError, match="--bits 9"):
        ConvertOptions(bits=9)
    with pytest.raises(InvalidArgumentError, match="--head-bits 2.5.*MUL1"):
        ConvertOptions(bits=4, head_bits=2.5, codebook="mcg")
    with pytest.raises(InvalidArgumentError, match="--codebook"):
        ConvertOptions(bits=4, codebook="qtip")
    with pytest.raises(InvalidArgumentError, match="--head-bits 12"):
        ConvertOptions(bits=4, head_bits=12)
    ConvertOptions(bits=3.5, codebook="mcg", head_bits=16)  # a fractional average is a mix of integer rates


def test_bad_inputs_are_refused_by_name(tiny, tmp_path, golden):
    opts = ConvertOptions(bits=4, calibrate=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_model(tmp_path / "nope", tmp_path / "o1", opts)
    with pytest.raises(ConversionError, match="already EXL3"):
        convert_model(golden / "exl3" / "llama_k4_mcg", tmp_path / "o2", opts)
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["FalconMambaForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="FalconMambaForCausalLM"):
        convert_model(other, tmp_path / "o3", opts)
    cfg["architectures"] = ["Gemma4ForCausalLM"]  # a supported family whose config lacks its keys
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="sliding_window"):
        convert_model(other, tmp_path / "o3", opts)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        convert_model(tiny, busy, opts)


def test_cli_convert(tmp_path, capsys):
    src = make_tiny_llama(tmp_path / "src", layers=1, seed=2)
    out = tmp_path / "cli"
    code = main(["convert", str(src), str(out), "--bits", "4", "--head-bits", "16", "--codebook", "3inst",
                 "--no-calibration", "--scale-search", "none", "--quiet"])
    assert code == 0
    assert "15" not in capsys.readouterr().err
    assert Checkpoint(out).exl3_linear("model.layers.0.mlp.up_proj").codebook.label == "3INST"
    assert main(["convert", str(src), str(tmp_path / "x"), "--bits", "0.5"]) == 2
    assert "--bits 0.5" in capsys.readouterr().err
