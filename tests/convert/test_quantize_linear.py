"""Regularisation, block LDL, LDLQ and the packed result of one linear, against the reference decoder."""

import pytest
import torch

from exl3_triton.convert.allocation import allocate_bits
from exl3_triton.convert.families import LinearSpec
from exl3_triton.convert.hessian import HessianAccumulator, block_ldl, prepare_hessian
from exl3_triton.convert.quantize_linear import (
    LinearToQuantize,
    QuantizeOptions,
    quantize_linears,
    regularize,
)
from exl3_triton.kernels.reference.hadamard import hadamard_128_ref
from exl3_triton.kernels.reference.linear import exl3_weight_ref
from exl3_triton.kernels.weights import Codebook, Exl3Weight

from ..conftest import rel_err


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def decoded(q):
    """The full weight [in, out] decoded from the *packed* tensors by the reference decoder."""
    t = q.tensors
    return exl3_weight_ref(Exl3Weight(t["trellis"], t["suh"], t["svh"], q.bits, q.codebook))


def test_regularize_is_undone_by_the_stored_scales():
    w = torch.randn(256, 128, generator=gen()) * torch.linspace(0.1, 3, 128)  # uneven columns
    su0 = torch.randint(0, 2, (256,), generator=gen(1)).float() * 2 - 1
    sv0 = torch.randint(0, 2, (128,), generator=gen(2)).float() * 2 - 1
    reg = regularize(w, su0, sv0, Codebook.MCG, "always", None)
    assert reg.out_scales_applied
    # rows of W_reg have the codebook's RMS, and the §3.5 formula gives W back exactly
    assert torch.allclose(reg.weight.square().mean(), torch.tensor(1.24371088**2), rtol=0.05)
    back = hadamard_128_ref(hadamard_128_ref(reg.weight.T).T * reg.su[:, None]) * reg.sv[None, :]
    assert rel_err(back, w) < 1e-5
    assert (reg.su * su0 < 0).all()  # the reference's negative normalisation
    never = regularize(w, su0, sv0, Codebook.MCG, "never", None)
    assert torch.equal(never.sv, sv0) and not never.out_scales_applied


def test_block_ldl_factor_is_unit_block_lower_and_block_diagonalises_h():
    x = torch.randn(512, 128, generator=gen()) @ torch.randn(128, 128, generator=gen(1))
    acc = HessianAccumulator(128)
    acc.add(x)
    h = acc.finalize().double()
    ldl = block_ldl(h.float()).double()
    unit = ldl + torch.eye(128, dtype=torch.float64)
    assert torch.equal(ldl.triu(), torch.zeros_like(ldl))  # strictly lower (diagonal blocks zeroed)
    inv = torch.linalg.inv(unit)
    d = inv @ h @ inv.T
    blocks = torch.block_diag(*[d[i:i + 16, i:i + 16] for i in range(0, 128, 16)])
    assert (d - blocks).abs().max() < 1e-6 * d.abs().max()


@pytest.mark.parametrize("bits,cb,max_err", [(4, Codebook.MCG, 0.085), (2, Codebook.THREE_INST, 0.32),
                                             (2.5, Codebook.MUL1, 0.22), (6, Codebook.MUL1, 0.025)])
def test_uncalibrated_linear_round_trip(bits, cb, max_err):
    w = torch.randn(96, 128, generator=gen(3)) * 0.02  # HF [out, in]; out 96 is padded to 128
    bias = torch.randn(96, generator=gen(4))
    q = quantize_linears([LinearToQuantize("x", w, bias)], None,
                         QuantizeOptions(bits, cb, scale_search="none"), gen(5))[0]
    t = q.tensors
    assert t["trellis"].shape == (8, 8, int(16 * bits)) and t["trellis"].dtype == torch.int16
    assert t["suh"].dtype == t["svh"].dtype == torch.float16 and t["suh"].shape == (128,)
    assert t["bias"].shape == (128,) and torch.equal(t["bias"][:96], bias.half())
    assert ("mcg" in t) == (cb == Codebook.MCG) and ("mul1" in t) == (cb == Codebook.MUL1)
    full = decoded(q)[:, :96].T
    err = rel_err(full, w)
    assert abs(err - q.predicted_error) < 1e-6
    assert err < max_err
    assert (full[:, :].abs().sum() > 0) and q.proxy_error is None


def correlated_inputs(n=2048, k=128, seed=0):
    mix = torch.randn(k, k, generator=gen(seed)) * 0.3 + torch.eye(k)
    return torch.randn(n, k, generator=gen(seed + 1)) @ mix


def test_ldlq_lowers_the_output_error_on_correlated_inputs():
    x = correlated_inputs()
    w = torch.randn(128, 128, generator=gen(7))
    acc = HessianAccumulator(128)
    acc.add(x)
    h = acc.finalize()
    opts = QuantizeOptions(3, Codebook.MCG, scale_search="none")
    with_ldlq = quantize_linears([LinearToQuantize("a", w)], prepare_hessian(h, gen(8)), opts, gen(9))[0]
    without = quantize_linears([LinearToQuantize("a", w)], None, opts, gen(9))[0]
    y = x @ w.T

    def out_err(q):
        return rel_err(x @ decoded(q)[:, :128], y)

    assert out_err(with_ldlq) < 0.8 * out_err(without)
    assert 0 < with_ldlq.proxy_error < 0.2


def test_linears_sharing_an_input_are_quantized_together_like_one_by_one():
    x = correlated_inputs(seed=3)
    acc = HessianAccumulator(128)
    acc.add(x)
    prepared = prepare_hessian(acc.finalize(), gen(1))
    a, b = torch.randn(128, 128, generator=gen(2)), torch.randn(256, 128, generator=gen(3))
    opts = QuantizeOptions(3, Codebook.MCG, scale_search="none")
    together = quantize_linears([LinearToQuantize("a", a), LinearToQuantize("b", b)], prepared, opts, gen(4))
    g = gen(4)
    alone_a = quantize_linears([LinearToQuantize("a", a)], prepared, opts, g)[0]
    assert torch.equal(together[0].tensors["trellis"], alone_a.tensors["trellis"])
    assert together[1].tensors["trellis"].shape == (8, 16, 48)
    assert abs(rel_err(decoded(together[1])[:, :256].T, b) - together[1].predicted_error) < 1e-6


def test_full_scale_search_finds_a_scale_no_worse_than_one():
    w = torch.randn(128, 128, generator=gen(11))
    errs = {}
    for mode in ("none", "fast"):
        q = quantize_linears([LinearToQuantize("a", w)], None, QuantizeOptions(3, Codebook.MUL1, scale_search=mode),
                             gen(12))[0]
        errs[mode] = (q.predicted_error, q.global_scale)
    assert errs["none"][1] == 1.0 and 0.5 < errs["fast"][1] < 1.5
    assert errs["fast"][0] <= errs["none"][0] * 1.01


# ------------------------------------------------------------------ bit allocation

def specs(layers=4):
    out = []
    for i in range(layers):
        out += [LinearSpec(f"l{i}.q", "a", f"l{i}.qkv", 2, i), LinearSpec(f"l{i}.o", "o", f"l{i}.o", 2, i),
                LinearSpec(f"l{i}.up", "m", f"l{i}.gu", 0, i), LinearSpec(f"l{i}.down", "d", f"l{i}.d", 0, i)]
    return out


def test_allocation_integer_and_half_steps():
    s = specs()
    numel = {x.key: 100 for x in s}
    assert set(allocate_bits(s, numel, 4, half_steps=False).bits.values()) == {4.0}
    assert set(allocate_bits(s, numel, 2.5, half_steps=True).bits.values()) == {2.5}
    alloc = allocate_bits(s, numel, 3.5, half_steps=False)
    # 16 linears of 100 weights, budget 5600 bits: 8 linears go to 4 bits. Attention (priority 2) first,
    # outer layers (0 and 3) before inner ones.
    assert alloc.average == 3.5
    fours = sorted(k for k, b in alloc.bits.items() if b == 4)
    assert fours == ["l0.o", "l0.q", "l1.o", "l1.q", "l2.o", "l2.q", "l3.o", "l3.q"]
    mixed = allocate_bits(s, numel, 2.75, half_steps=True)
    assert set(mixed.bits.values()) == {2.5, 3.0} and mixed.average <= 2.75
