"""The EXL3 format against the reference library's own output (../shared/golden/exl3)."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import exl3_triton
from exl3_triton.checkpoint import Checkpoint
from exl3_triton.kernels import exl3_dequant, exl3_full_weight

from .conftest import GOLDEN_EXL3

EXPECTED_FORMAT = {  # directory: (body bits, head bits, codebook label)
    "llama_k4_mcg": (4, 8, "MCG"),
    "llama_k3_mcg": (3, 6, "MCG"),
    "llama_k4_3inst": (4, 6, "3INST"),
    "llama_k25_mul1": (2.5, 6, "MUL1"),
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", GOLDEN_EXL3)
def test_every_linear_decodes_bit_exact(golden, name):
    ckpt = Checkpoint(golden / "exl3" / name)
    ref = safe_open(str(golden / "exl3" / "ref" / f"{name}_ref.safetensors"), "pt")
    ref_keys = sorted(k[3:] for k in ref.keys() if k.startswith("wi."))
    assert ckpt.exl3_linear_keys() == ref_keys and len(ref_keys) == 15

    body_bits, head_bits, cb = EXPECTED_FORMAT[name]
    for w in ckpt.iter_exl3_linears():
        assert w.codebook.label == cb
        assert w.bits == (head_bits if w.key == "lm_head" else body_bits)
        inner = exl3_dequant(w)
        wi = ref.get_tensor(f"wi.{w.key}")
        assert inner.shape == wi.shape == (w.in_features, w.out_features)
        assert torch.equal(inner.view(torch.int16), wi.view(torch.int16)), w.key
        # The reference rotates in fp16; ours is fp32 (README: differences up to ~2e-4).
        full = exl3_full_weight(w)
        assert (full - ref.get_tensor(f"w.{w.key}").float()).abs().max().item() < 3e-4, w.key


@pytest.mark.parametrize("name", GOLDEN_EXL3)
def test_logits_match_reference(golden, name):
    ref = load_file(str(golden / "exl3" / "ref" / f"{name}_ref.safetensors"))
    model = exl3_triton.load(golden / "exl3" / name)
    logits = model.forward(ref["ids"])
    assert logits.shape == ref["logits"].shape
    assert relative_error(logits, ref["logits"]) < 1e-2
    top1 = (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
    assert top1 >= 0.97


def test_unquantized_llama_matches_transformers(golden):
    ref = load_file(str(golden / "hf" / "llama_hf_logits.safetensors"))
    model = exl3_triton.load(golden / "hf" / "llama")
    logits = model.forward(ref["ids"])
    assert relative_error(logits, ref["logits"]) < 1e-4


def test_batch_forward_equals_single(golden):
    model = exl3_triton.load(golden / "exl3" / "llama_k4_mcg")
    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(0))
    batched = model.forward(ids)
    for b in range(3):
        torch.testing.assert_close(batched[b], model.forward(ids[b]), rtol=1e-5, atol=1e-5)


def test_prefix_logits_do_not_depend_on_later_tokens(golden):
    model = exl3_triton.load(golden / "exl3" / "llama_k3_mcg")
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.forward(ids)[:25], model.forward(ids[:25]), rtol=1e-5, atol=1e-5)
