"""The full-weight reconstruction (kernels/triton_reconstruct.py) and the large-batch path that uses it.

Oracle: the PyTorch reference's fp32 ``W = diag(suh) . H . W_hat . H . diag(svh)`` and its matmul; the kernel
stores W in fp16, so it must agree to fp16 tolerance (relative error < 2e-3, as every EXL3 matmul).
"""

import dataclasses

import pytest
import torch

from exl3_triton.errors import InvalidArgumentError
from exl3_triton.kernels import Codebook, exl3_matmul, tuning
from exl3_triton.kernels.dispatch import matmul_plan
from exl3_triton.kernels.reference import exl3_matmul_ref, exl3_weight_ref
from exl3_triton.kernels.weights import concat_exl3
from exl3_triton.checkpoint import Checkpoint

from ..conftest import GOLDEN_EXL3, random_exl3_weight, rel_err

TOL = 2e-3
FORMATS = [(1, Codebook.MCG), (2, Codebook.THREE_INST), (3, Codebook.MCG), (4, Codebook.MUL1), (5, Codebook.MCG),
           (8, Codebook.THREE_INST), (1.5, Codebook.MUL1), (2.5, Codebook.MUL1), (3.5, Codebook.MUL1)]


def _small_bias(w):
    """A bias of the output's own size (~0.04 here), so that an error in x W is not hidden under it, and a bias
    left out is not hidden either."""
    return dataclasses.replace(w, bias=(w.bias.float() * 0.02).half())


def _poisoned(k, n, device):
    return torch.full((k, n), float("nan"), dtype=torch.float16, device=device)


@pytest.mark.parametrize("bits,codebook", FORMATS)
def test_reconstruct_matches_reference_weight(triton_kernels, device, bits, codebook):
    w = random_exl3_weight(256, 384, bits, codebook, seed=int(bits * 10), device=device)
    got = triton_kernels.reconstruct.reconstruct_weight_triton(w, out=_poisoned(256, 384, device))
    assert got.dtype == torch.float16 and got.shape == (256, 384)
    assert rel_err(got, exl3_weight_ref(w)) < TOL


@pytest.mark.parametrize("schedule", [
    dict(programs_per_sm=1, row_split=1),  # persistent: each program loops over several blocks
    dict(programs_per_sm=0, row_split=4, h_from_memory=True),  # one block per program, H loaded
    dict(programs_per_sm=2, row_split=8, h_from_memory=False),
    dict(programs_per_sm=1, row_split=2, h_from_memory=True, num_warps=8),
])
def test_reconstruct_schedules(triton_kernels, device, schedule):
    w = random_exl3_weight(384, 256, 4, Codebook.MCG, seed=3, device=device)
    got = triton_kernels.reconstruct.reconstruct_weight_triton(w, out=_poisoned(384, 256, device), schedule=schedule)
    assert rel_err(got, exl3_weight_ref(w)) < TOL


def test_reconstruct_concatenated_linears(triton_kernels, device):
    """Each member's columns take its own suh (a member that straddled a 128-column block would be refused)."""
    parts = [random_exl3_weight(256, n, 3, Codebook.MCG, seed=n, device=device) for n in (128, 256, 128)]
    group = concat_exl3(parts)
    got = triton_kernels.reconstruct.reconstruct_weight_triton(group, out=_poisoned(256, 512, device))
    expected = torch.cat([exl3_weight_ref(p) for p in parts], dim=1)
    assert rel_err(got, expected) < TOL
    for j, (lo, hi) in enumerate(((0, 128), (128, 384), (384, 512))):  # no member borrowed another's signs
        assert rel_err(got[:, lo:hi], expected[:, lo:hi]) < TOL, j


def test_reconstruct_golden_trellises(golden, triton_kernels, device):
    """Real trellises from the reference converter (dims that are multiples of 128)."""
    checked = 0
    for name in GOLDEN_EXL3:
        ckpt = Checkpoint(golden / "exl3" / name)
        for key in ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj", "lm_head"):
            w = ckpt.exl3_linear(key, device=device)
            if w.in_features % 128 or w.out_features % 128:
                continue
            got = triton_kernels.reconstruct.reconstruct_weight_triton(w)
            assert rel_err(got, exl3_weight_ref(w)) < TOL, (name, key)
            checked += 1
    assert checked >= len(GOLDEN_EXL3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matmul_reconstruct_path(device, dtype):
    w = _small_bias(random_exl3_weight(256, 384, 4, Codebook.MCG, bias=True, seed=5, device=device))
    x = torch.randn(2, 20, 256, device=device).to(dtype)  # 3-D input, bias, x in each dtype
    y = exl3_matmul(x, w, backend="triton", _force_path="reconstruct")
    assert y.dtype == dtype and y.shape == (2, 20, 384)
    # bf16: its 8-bit mantissa in W and in y (measured 2.4e-3 here) against an 8e-3 error of W scaled by 0.992
    assert rel_err(y, exl3_matmul_ref(x.float(), w)) < (TOL if dtype != torch.bfloat16 else 4e-3)


def test_matmul_reconstruct_path_grouped(device):
    parts = [_small_bias(random_exl3_weight(256, n, 4, Codebook.MCG, bias=True, seed=n, device=device))
             for n in (256, 128)]
    group = concat_exl3(parts)
    x = torch.randn(24, 256, device=device).half()
    y = exl3_matmul(x, group, backend="triton", _force_path="reconstruct")
    assert rel_err(y, torch.cat([exl3_matmul_ref(x.float(), p) for p in parts], dim=1)) < TOL


def test_dispatch_takes_reconstruct_from_the_measured_row_count(triton_kernels, device, monkeypatch):
    assert matmul_plan(tuning.RECONSTRUCT_MIN_ROWS, 8192, 8192).kind == "reconstruct"
    assert matmul_plan(tuning.RECONSTRUCT_MIN_ROWS - 1, 8192, 8192).kind == "dequant"
    # through the public entry point, at a lowered threshold (small enough for the interpreter)
    monkeypatch.setattr(tuning, "RECONSTRUCT_MIN_ROWS", 48)
    calls = []
    real = triton_kernels.reconstruct.reconstruct_weight_triton
    monkeypatch.setattr(triton_kernels.reconstruct, "reconstruct_weight_triton",
                        lambda w, **kw: calls.append(w.key) or real(w, **kw))
    w = random_exl3_weight(128, 256, 3, Codebook.MCG, seed=9, device=device)
    x = torch.randn(48, 128, device=device).half()
    assert rel_err(exl3_matmul(x, w, backend="triton"), exl3_matmul_ref(x.float(), w)) < TOL
    assert calls == [w.key]
    exl3_matmul(x[:47], w, backend="triton")  # below the threshold: the dequant path
    assert calls == [w.key]


def test_reconstruct_rejects_bad_input(triton_kernels, device):
    reconstruct = triton_kernels.reconstruct.reconstruct_weight_triton
    w = random_exl3_weight(256, 128, 4, Codebook.MCG, device=device)
    with pytest.raises(ValueError, match=r"random_256x128_4.*fp16 \[256, 128\]"):
        reconstruct(w, out=torch.empty(128, 256, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="fp16"):
        reconstruct(w, out=torch.empty(256, 128, dtype=torch.float32, device=device))
    with pytest.raises(ValueError, match="row_split"):
        reconstruct(w, schedule=dict(row_split=3))
    odd = random_exl3_weight(256, 48, 4, Codebook.MCG, device=device)
    with pytest.raises(ValueError, match=r"random_256x48_4.*divisible by 128"):
        reconstruct(odd)
    with pytest.raises(InvalidArgumentError, match="sideways"):
        exl3_matmul(torch.randn(4, 256, device=device).half(), w, backend="triton", _force_path="sideways")
