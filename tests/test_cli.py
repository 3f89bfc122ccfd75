"""The command line, run in-process (and once through the installed console script)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exl3_triton.cli import main


def test_inspect(golden, capsys):
    assert main(["inspect", str(golden / "exl3" / "llama_k25_mul1")]) == 0
    out = capsys.readouterr().out
    assert "architecture: LlamaForCausalLM" in out
    assert "layers:       2" in out
    assert "EXL3 linears: 15" in out
    assert "2.5  MUL1         14" in out and "6  MUL1          1" in out
    assert "model.layers.1.mlp.down_proj" in out and "[768 x 256]" in out
    assert "model.embed_tokens.weight" in out and "BF16" in out


def test_inspect_unquantized(golden, capsys):
    assert main(["inspect", str(golden / "hf" / "llama")]) == 0
    assert "format:       unquantized" in capsys.readouterr().out


def test_inspect_broken_checkpoint_exits_nonzero(golden, tmp_path, capsys):
    dst = tmp_path / "m"
    shutil.copytree(golden / "exl3" / "llama_k4_mcg", dst)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert main(["inspect", str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err and "truncated" in err


def test_inspect_unknown_architecture_exits_nonzero(golden, tmp_path, capsys):
    dst = tmp_path / "m"
    shutil.copytree(golden / "exl3" / "llama_k4_mcg", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["WhatForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(dst)]) == 2
    captured = capsys.readouterr()
    assert "WhatForCausalLM" in captured.err and "EXL3 linears: 15" in captured.out


@pytest.mark.parametrize("module", ["model.layers.0.self_attn.k_proj", "lm_head"])
def test_dequant(golden, tmp_path, module):
    out = tmp_path / "d.safetensors"
    assert main(["dequant", str(golden / "exl3" / "llama_k4_3inst"), module, "--out", str(out)]) == 0
    got = load_file(str(out))
    ref = load_file(str(golden / "exl3" / "ref" / "llama_k4_3inst_ref.safetensors"))
    assert got["inner"].dtype == torch.float16 and got["weight"].dtype == torch.float32
    assert torch.equal(got["inner"].view(torch.int16), ref[f"wi.{module}"].view(torch.int16))
    assert (got["weight"] - ref[f"w.{module}"].float()).abs().max() < 3e-4


def test_dequant_rejects_non_exl3_module(golden, tmp_path, capsys):
    assert main(["dequant", str(golden / "exl3" / "llama_k4_mcg"), "model.norm", "--out", str(tmp_path / "x")]) == 2
    assert "model.norm" in capsys.readouterr().err


def test_logits(golden, tmp_path):
    ref = load_file(str(golden / "exl3" / "ref" / "llama_k3_mcg_ref.safetensors"))
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(ref["ids"].tolist()))
    out = tmp_path / "l.safetensors"
    assert main(["logits", str(golden / "exl3" / "llama_k3_mcg"), "--ids", str(ids), "--out", str(out)]) == 0
    logits = load_file(str(out))["logits"]
    assert logits.dtype == torch.float32 and logits.shape == (96, 512)
    rel = ((logits - ref["logits"]).norm() / ref["logits"].norm()).item()
    assert rel < 1e-2


@pytest.mark.parametrize("content", ["not json", "[]", "[1, 2.5]", '{"ids": [1]}'])
def test_logits_bad_ids_file(golden, tmp_path, capsys, content):
    ids = tmp_path / "ids.json"
    ids.write_text(content)
    assert main(["logits", str(golden / "exl3" / "llama_k3_mcg"), "--ids", str(ids), "--out", str(tmp_path / "o")]) == 2
    assert "--ids" in capsys.readouterr().err


def test_logits_out_of_vocab_id(golden, tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text("[1, 99999]")
    assert main(["logits", str(golden / "exl3" / "llama_k3_mcg"), "--ids", str(ids), "--out", str(tmp_path / "o")]) == 2
    assert "99999" in capsys.readouterr().err


def test_generate_greedy_matches_argmax_of_logits(golden, capsys):
    import exl3_triton

    model_dir = golden / "exl3" / "llama_k4_mcg"
    assert main(["generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model = exl3_triton.load(model_dir)
    ids = model.tokenizer.encode("Hello")
    new = []
    for _ in range(6):
        nxt = int(model.forward(torch.tensor(ids + new))[-1].argmax())
        if nxt in model.tokenizer.eos_token_ids:
            break
        new.append(nxt)
    assert printed == model.tokenizer.decode(new)


def test_console_script_is_installed(golden):
    # The script of the environment running the tests sits beside its interpreter.
    exe = Path(sys.executable).parent / "exl3-triton"
    assert exe.is_file(), f"the exl3-triton console script is not installed at {exe}"
    r = subprocess.run([exe, "inspect", str(golden / "exl3" / "llama_k4_mcg")], capture_output=True, text=True)
    assert r.returncode == 0 and "EXL3 linears: 15" in r.stdout


def test_dequant_triton_backend(golden, tmp_path):
    # On a CPU machine this runs the Triton kernel under Triton's interpreter.
    out = tmp_path / "d.safetensors"
    module = "model.layers.1.mlp.gate_proj"
    assert main(["dequant", str(golden / "exl3" / "llama_k25_mul1"), module, "--out", str(out),
                 "--backend", "triton"]) == 0
    got = load_file(str(out))
    ref = load_file(str(golden / "exl3" / "ref" / "llama_k25_mul1_ref.safetensors"))
    assert torch.equal(got["inner"].view(torch.int16), ref[f"wi.{module}"].view(torch.int16))
    assert (got["weight"] - ref[f"w.{module}"].float()).abs().max() < 3e-4


def test_logits_triton_backend(golden, tmp_path):
    ref = load_file(str(golden / "exl3" / "ref" / "llama_k4_mcg_ref.safetensors"))
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(ref["ids"].tolist()))
    out = tmp_path / "l.safetensors"
    assert main(["logits", str(golden / "exl3" / "llama_k4_mcg"), "--ids", str(ids), "--out", str(out),
                 "--backend", "triton"]) == 0
    logits = load_file(str(out))["logits"]
    rel = ((logits - ref["logits"]).norm() / ref["logits"].norm()).item()
    top1 = (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
    assert rel < 1e-2 and top1 >= 0.97
