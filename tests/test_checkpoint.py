"""The checkpoint reader: layouts it accepts, records it yields, and errors on bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from exl3_triton import CheckpointError, ConfigError, UnsupportedArchitectureError
from exl3_triton.checkpoint import Checkpoint, unpack_sign_bits
from exl3_triton.kernels import Codebook, exl3_dequant
from exl3_triton.model import load

from .conftest import random_exl3_tensors, write_checkpoint

# --------------------------------------------------------------- layouts


@pytest.mark.parametrize("shards,with_index", [(3, True), (3, False)])
def test_sharded_checkpoint_reads_like_single_file(golden, tmp_path, shards, with_index):
    src = golden / "exl3" / "llama_k4_mcg"
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    dst = write_checkpoint(tmp_path / "m", tensors, config, shards=shards, with_index=with_index)
    shutil.copy(src / "tokenizer.json", dst)
    single, sharded = Checkpoint(src), Checkpoint(dst)
    assert sharded.tensor_names() == single.tensor_names()
    assert len({sharded.info(n).file for n in sharded.tensor_names()}) == shards
    for a, b in zip(single.iter_exl3_linears(), sharded.iter_exl3_linears()):
        assert a.key == b.key and torch.equal(a.trellis, b.trellis) and torch.equal(a.svh, b.svh)
    ids = torch.arange(2, 30)
    torch.testing.assert_close(load(dst).forward(ids), load(src).forward(ids), rtol=0, atol=0)


def test_record_fields(tmp_path):
    t = random_exl3_tensors("blk.proj", 256, 384, 3.5, "mul1", bias=True)
    t.update(random_exl3_tensors("blk.other", 128, 128, 6, "3inst"))
    t["blk.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    ckpt = Checkpoint(write_checkpoint(tmp_path, t))
    w = ckpt.exl3_linear("blk.proj")
    assert (w.bits, w.codebook, w.in_features, w.out_features) == (3.5, Codebook.MUL1, 256, 384)
    assert w.trellis.dtype == torch.int16 and w.suh.dtype == torch.float16 and w.bias.shape == (384,)
    other = ckpt.exl3_linear("blk.other")
    assert (other.bits, other.codebook, other.bias) == (6, Codebook.THREE_INST, None)
    assert ckpt.exl3_linear_keys() == ["blk.other", "blk.proj"]
    assert ckpt.unquantized_tensor_names() == ["blk.norm.weight"]
    norm = ckpt.tensor("blk.norm.weight")
    assert norm.dtype == torch.bfloat16  # unquantized tensors come back as stored


@pytest.mark.parametrize("bits", [1, 2, 5, 7, 8, 1.5, 2.5])
def test_bits_from_trellis_width(tmp_path, bits):
    cb = "mul1" if bits != int(bits) else "mcg"
    ckpt = Checkpoint(write_checkpoint(tmp_path, random_exl3_tensors("x", 128, 128, bits, cb)))
    assert ckpt.exl3_linear("x").bits == bits


def test_legacy_sign_bits(tmp_path):
    t = random_exl3_tensors("x", 128, 256, 4, "3inst")
    suh, svh = t.pop("x.suh"), t.pop("x.svh")
    t["x.su"] = torch.tensor([0x0001, -0x8000, 0, 0x00F0, 0, 0, 0, -1], dtype=torch.int16)
    t["x.sv"] = torch.zeros(16, dtype=torch.int16)
    w = Checkpoint(write_checkpoint(tmp_path, t)).exl3_linear("x")
    expected = torch.ones(128)
    expected[0] = -1            # word 0, bit 0
    expected[16 + 15] = -1      # word 1, bit 15
    expected[48 + 4:48 + 8] = -1  # word 3, bits 4..7
    expected[112:128] = -1      # word 7, all bits
    assert torch.equal(w.suh.float(), expected)
    assert torch.equal(w.svh.float(), torch.ones(256))
    assert torch.equal(unpack_sign_bits(torch.tensor([2], dtype=torch.int16))[:3].float(), torch.tensor([1., -1., 1.]))


def test_unpadded_bias_is_padded(tmp_path):
    t = random_exl3_tensors("x", 128, 256, 4)
    t["x.bias"] = torch.randn(200).half()
    w = Checkpoint(write_checkpoint(tmp_path, t)).exl3_linear("x")
    assert w.bias.shape == (256,) and torch.all(w.bias[200:] == 0)


def test_padded_dims_accepted_against_true_sizes(tmp_path):
    ckpt = Checkpoint(write_checkpoint(tmp_path, random_exl3_tensors("head", 256, 640, 4)))
    assert ckpt.linear("head", in_features=256, out_features=600).out_features == 640  # vocab 600 -> 640
    with pytest.raises(CheckpointError, match="head.trellis") as e:
        ckpt.linear("head", in_features=256, out_features=500)  # 640 is not 500 padded
    assert "500" in str(e.value)


def test_quantization_config_json_is_optional(golden, tmp_path):
    src = golden / "exl3" / "llama_k4_mcg"
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    (dst / "quantization_config.json").unlink()
    ckpt = Checkpoint(dst)
    assert ckpt.quantization_config["quant_method"] == "exl3"  # from config.json's block
    assert len(ckpt.exl3_linear_keys()) == 15


# --------------------------------------------------------------- bad input


def _assert_names(err: Exception, *parts: str):
    msg = str(err)
    for p in parts:
        assert p in msg, f"{p!r} not in message: {msg}"


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path / "nope")
    _assert_names(e.value, "nope", "does not exist")


def test_missing_config(tmp_path):
    write_checkpoint(tmp_path, random_exl3_tensors("x", 128, 128, 4))
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path)
    _assert_names(e.value, "config.json", "not found")


def test_missing_shard_file(tmp_path):
    t = random_exl3_tensors("x", 128, 128, 4)
    write_checkpoint(tmp_path, t, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path)
    _assert_names(e.value, "model-00002-of-00002.safetensors", "missing")


def test_no_safetensors_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        Checkpoint(tmp_path)


def test_truncated_safetensors(tmp_path):
    write_checkpoint(tmp_path, random_exl3_tensors("x", 256, 256, 4))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path)
    _assert_names(e.value, "model.safetensors", "truncated", "tensor 'x.")


def test_garbage_file(tmp_path):
    write_checkpoint(tmp_path, random_exl3_tensors("x", 128, 128, 4))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path)
    _assert_names(e.value, "model.safetensors", "JSON")


@pytest.mark.parametrize("part", ["trellis", "suh", "svh"])
def test_missing_exl3_part(tmp_path, part):
    t = random_exl3_tensors("model.layers.0.mlp.up_proj", 128, 256, 4)
    del t[f"model.layers.0.mlp.up_proj.{part}"]
    ckpt = Checkpoint(write_checkpoint(tmp_path, t))
    with pytest.raises(CheckpointError) as e:
        ckpt.exl3_linear("model.layers.0.mlp.up_proj")
    _assert_names(e.value, f"model.layers.0.mlp.up_proj.{part}", "model.safetensors", "incomplete")
    with pytest.raises(CheckpointError):  # validating the whole checkpoint finds it too
        ckpt.validate()


@pytest.mark.parametrize("which,shape", [("suh", [256]), ("svh", [128])])
def test_trellis_inconsistent_with_scales(tmp_path, which, shape):
    t = random_exl3_tensors("x", 128, 256, 4)  # suh must be [128], svh [256]
    t[f"x.{which}"] = torch.ones(shape, dtype=torch.float16)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(write_checkpoint(tmp_path, t)).exl3_linear("x")
    _assert_names(e.value, f"x.{which}", "model.safetensors", str(shape))


def test_trellis_with_invalid_width(tmp_path):
    t = random_exl3_tensors("x", 128, 128, 4)
    t["x.trellis"] = torch.zeros(8, 8, 50, dtype=torch.int16)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(write_checkpoint(tmp_path, t)).exl3_linear("x")
    _assert_names(e.value, "x.trellis", "50", "model.safetensors")


def test_trellis_not_multiple_of_128(tmp_path):
    t = random_exl3_tensors("x", 128, 144, 4)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(write_checkpoint(tmp_path, t)).exl3_linear("x")
    _assert_names(e.value, "x.trellis", "multiples of 128")


def test_trellis_wrong_dtype(tmp_path):
    t = random_exl3_tensors("x", 128, 128, 4)
    t["x.trellis"] = t["x.trellis"].to(torch.int32)
    with pytest.raises(CheckpointError, match="int16"):
        Checkpoint(write_checkpoint(tmp_path, t)).exl3_linear("x")


def test_unknown_codebook_scalar(tmp_path):
    t = random_exl3_tensors("x", 128, 128, 4, "mcg")
    t["x.mcg"] = torch.tensor(12345, dtype=torch.int32)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(write_checkpoint(tmp_path, t)).exl3_linear("x")
    _assert_names(e.value, "x.mcg", "model.safetensors", "0x00003039", "codebook")


def test_both_codebook_markers(tmp_path):
    t = random_exl3_tensors("x", 128, 128, 4, "mcg")
    t.update({k: v for k, v in random_exl3_tensors("x", 128, 128, 4, "mul1").items() if k.endswith("mul1")})
    with pytest.raises(CheckpointError, match="both"):
        Checkpoint(write_checkpoint(tmp_path, t)).exl3_linear("x")


def test_half_integer_needs_mul1(tmp_path):
    t = random_exl3_tensors("x", 128, 128, 2.5, "mcg")
    with pytest.raises(CheckpointError) as e:
        Checkpoint(write_checkpoint(tmp_path, t)).exl3_linear("x")
    _assert_names(e.value, "x.trellis", "MUL1", "MCG")


def test_unknown_architecture(tmp_path):
    write_checkpoint(tmp_path, random_exl3_tensors("x", 128, 128, 4), {"architectures": ["FrobnicatorForCausalLM"]})
    with pytest.raises(UnsupportedArchitectureError) as e:
        load(tmp_path)
    _assert_names(e.value, "FrobnicatorForCausalLM", "config.json", "LlamaForCausalLM")


def test_config_without_architectures(tmp_path):
    write_checkpoint(tmp_path, random_exl3_tensors("x", 128, 128, 4), {"model_type": "llama"})
    with pytest.raises(ConfigError) as e:
        load(tmp_path)
    _assert_names(e.value, "config.json", "architectures")


@pytest.mark.parametrize("where", ["config.json", "quantization_config.json"])
def test_non_exl3_config(tmp_path, where):
    qcfg = {"quant_method": "gptq", "bits": 4}
    config = {"architectures": ["LlamaForCausalLM"]}
    if where == "config.json":
        config["quantization_config"] = qcfg
    write_checkpoint(tmp_path, {"x.weight": torch.ones(2, 2)}, config,
                     quantization_config=qcfg if where != "config.json" else None)
    with pytest.raises(ConfigError) as e:
        Checkpoint(tmp_path)
    _assert_names(e.value, where, "gptq", "not EXL3")


def test_missing_linear_in_model(golden, tmp_path):
    src = golden / "exl3" / "llama_k4_mcg"
    tensors = {k: v for k, v in load_file(str(src / "model.safetensors")).items()
               if not k.startswith("model.layers.1.mlp.down_proj.")}
    write_checkpoint(tmp_path, tensors, json.loads((src / "config.json").read_text()))
    with pytest.raises(CheckpointError) as e:
        load(tmp_path)
    _assert_names(e.value, "model.layers.1.mlp.down_proj", "not found")


def test_wrong_embedding_shape(golden, tmp_path):
    src = golden / "hf" / "llama"
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] = 1000
    write_checkpoint(tmp_path, load_file(str(src / "model.safetensors")), config)
    with pytest.raises(CheckpointError) as e:
        load(tmp_path)
    _assert_names(e.value, "model.embed_tokens.weight", "1000")


def test_config_value_of_wrong_type(golden, tmp_path):
    src = golden / "hf" / "llama"
    config = json.loads((src / "config.json").read_text())
    config["num_attention_heads"] = "four"
    write_checkpoint(tmp_path, load_file(str(src / "model.safetensors")), config)
    with pytest.raises(ConfigError) as e:
        load(tmp_path)
    _assert_names(e.value, "num_attention_heads", "config.json", "'four'")


def test_missing_tensor_lookup(golden):
    ckpt = Checkpoint(golden / "exl3" / "llama_k4_mcg")
    with pytest.raises(CheckpointError) as e:
        ckpt.tensor("model.nonexistent.weight")
    _assert_names(e.value, "model.nonexistent.weight", "llama_k4_mcg")


def test_bad_token_ids_are_rejected(golden):
    from exl3_triton import InvalidArgumentError

    model = load(golden / "exl3" / "llama_k4_mcg")
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        model.forward(torch.tensor([1, 2, 512]))
    with pytest.raises(InvalidArgumentError, match="integer tensor"):
        model.forward(torch.tensor([1.0, 2.0]))


def test_dequant_cpu_entry_point_matches_golden(golden):
    w = Checkpoint(golden / "exl3" / "llama_k3_mcg").exl3_linear("model.layers.0.mlp.down_proj")
    ref = load_file(str(golden / "exl3" / "ref" / "llama_k3_mcg_ref.safetensors"))
    assert torch.equal(exl3_dequant(w, backend="reference").view(torch.int16),
                       ref["wi.model.layers.0.mlp.down_proj"].view(torch.int16))
