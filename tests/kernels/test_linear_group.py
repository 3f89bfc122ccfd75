"""Linears that read one input, computed by one matmul (``concat_exl3`` / ``LinearGroup``).

The oracle is each member on its own through the PyTorch reference: the concatenated weight must
give every member's output, whatever plan the dispatcher picks (one row, a few rows, tensor-core
blocks, dequantize + matmul), under Triton's interpreter on a CPU.
"""

import pytest
import torch

from exl3_triton.arch.blocks.linear import Linear, LinearGroup
from exl3_triton.kernels import Codebook, exl3_matmul
from exl3_triton.kernels.reference import exl3_matmul_ref, exl3_weight_ref
from exl3_triton.kernels.weights import DenseWeight, concat_exl3
from exl3_triton.options import RuntimeOptions

from ..conftest import random_exl3_weight, rel_err

MATMUL_TOL = 2e-3


def _members(device, bits=(4, 4, 4), widths=(256, 128, 128), cb=Codebook.MCG, k=256):
    return [random_exl3_weight(k, n, b, cb, bias=(j == 1), seed=10 + j, device=device)
            for j, (b, n) in enumerate(zip(bits, widths))]


def test_reference_of_concatenation_equals_members(device):
    members = _members(device)
    w = concat_exl3(members)
    assert w.out_splits == (256, 128, 128) and w.member_suh().shape == (3, 256)
    x = torch.randn(3, 256, device=device).half()
    want = torch.cat([exl3_matmul_ref(x.float(), m) for m in members], dim=1)
    assert rel_err(exl3_matmul_ref(x.float(), w), want) < 1e-6
    # the full weight too: each member's columns with its own input signs
    full = torch.cat([exl3_weight_ref(m) for m in members], dim=1)
    assert rel_err(exl3_weight_ref(w), full) < 1e-6


# every plan of the dispatcher: one row (rotation in the kernel), 2 rows, 3 rows (4-row blocks, rotation in
# the kernel), 16-row and 32-row tensor-core blocks (members' rotations in one launch), dequantize + matmul
@pytest.mark.parametrize("rows,bits,cb", [(1, 4, Codebook.MCG), (2, 4, Codebook.MCG), (3, 4, Codebook.MCG),
                                          (20, 4, Codebook.MCG), (40, 4, Codebook.MCG),
                                          (1, 2, Codebook.THREE_INST), (5, 2, Codebook.THREE_INST)])
def test_triton_matmul_of_concatenation(device, rows, bits, cb):
    members = _members(device, bits=(bits,) * 3, cb=cb)
    w = concat_exl3(members)
    x = torch.randn(rows, 256, device=device).half()
    want = torch.cat([exl3_matmul_ref(x.float(), m) for m in members], dim=1)
    got = exl3_matmul(x, w, backend="triton")
    assert got.shape == (rows, 512) and torch.isfinite(got).all()
    assert rel_err(got, want) < MATMUL_TOL


def test_concatenation_refuses_mixed_formats(device):
    assert concat_exl3(_members(device, bits=(4, 3, 4))) is None
    assert concat_exl3(_members(device, widths=(256, 128, 144))) is None  # a block would straddle members
    assert concat_exl3(_members(device)[:1]) is None


def _linear(w, out_features, device, backend="triton"):
    return Linear(w, w.in_features, out_features, RuntimeOptions(device=device, backend=backend))


def test_group_outputs_and_fallback(device):
    opts = RuntimeOptions(device=device, backend="triton")
    x = torch.randn(2, 256, device=device).half()
    same = _members(device)
    # a member narrower than its stored width (padded output) is cut back
    group = LinearGroup([Linear(w, 256, n, opts) for w, n in zip(same, (256, 100, 128))])
    assert group.launches == 1
    outs = group(x)
    assert [o.shape[-1] for o in outs] == [256, 100, 128]
    for o, m, n in zip(outs, same, (256, 100, 128)):
        assert rel_err(o, exl3_matmul_ref(x.float(), m)[:, :n]) < MATMUL_TOL
    # by format: the two 4-bit members share a launch, the 3-bit one runs alone; outputs stay in order
    mixed = _members(device, bits=(4, 3, 4))
    group = LinearGroup([Linear(w, 256, w.out_features, opts) for w in mixed])
    assert group.launches == 2
    for o, m in zip(group(x), mixed):
        assert rel_err(o, exl3_matmul_ref(x.float(), m)) < MATMUL_TOL
    reference = LinearGroup([Linear(w, 256, w.out_features, RuntimeOptions(device=device, backend="reference"))
                             for w in _members(device)])
    assert reference.launches == 3  # nothing to gain on the reference backend


def test_group_of_dense_linears(device):
    opts = RuntimeOptions(device=device, backend="triton", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ws = [DenseWeight(torch.randn(n, 64, generator=g), torch.randn(n, generator=g) if n == 32 else None)
          for n in (48, 32)]
    group = LinearGroup([Linear(w, 64, w.out_features, opts) for w in ws])
    assert group.launches == 2  # one with a bias, one without: different formats
    group = LinearGroup([Linear(w, 64, w.out_features, opts) for w in ws + [ws[0]]])
    assert group.launches == 2
    ws = ws + [ws[0]]
    x = torch.randn(3, 64, generator=g).to(device)
    for o, w in zip(group(x), ws):
        want = torch.nn.functional.linear(x.cpu(), w.weight, w.bias)
        assert torch.allclose(o.cpu(), want, atol=1e-5)
