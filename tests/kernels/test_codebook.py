"""Codebooks against the values and statistics published in exl3-format.md section 3.2
(GPU-confirmed against ExLlamaV3's device code)."""

import hashlib

import pytest
import torch

from exl3_triton.kernels.reference import codebook_table, decode_states
from exl3_triton.kernels.weights import Codebook

# state -> (3INST, MCG, MUL1) fp16 bit patterns, from the spec's golden table.
GOLDEN_VALUES = {
    0x0000: (0x3A25, 0x3F60, 0xC2E8),
    0x0001: (0xBB5B, 0x304E, 0x3921),
    0x0002: (0x3B74, 0xBA13, 0xB72D),
    0x0003: (0x34B6, 0x3AB8, 0x3239),
    0x0004: (0x3924, 0x3952, 0xBB29),
    0x0005: (0x2CB0, 0xB75F, 0xB409),
    0x0006: (0x404F, 0xBEA4, 0xBD5E),
    0x0007: (0xB906, 0xBC71, 0xB997),
    0x1234: (0xC066, 0x3E0F, 0xB89E),
    0x8000: (0xB7F8, 0xB915, 0xBAF2),
    0xFFFF: (0xB110, 0x3ACD, 0xB936),
}

FINGERPRINTS = {
    Codebook.THREE_INST: "ad88de2dcff5bb05fff2faec37cceceb",
    Codebook.MCG: "95383563929baa9d1ae5de0be2249028",
    Codebook.MUL1: "bc48d02cb1c14939dc47b90f870dd689",
}

# mean, std, min, max over all 65536 states (spec table, 4-6 significant digits)
STATISTICS = {
    Codebook.THREE_INST: (0.000210, 1.243711, -3.9570, 3.9727),
    Codebook.MCG: (-0.000037, 1.244112, -3.9492, 3.9492),
    Codebook.MUL1: (-0.001931, 1.000310, -3.4531, 3.3477),
}


def _bits(t: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFF for v in t.view(torch.int16).tolist()]


@pytest.mark.parametrize("codebook", list(Codebook))
def test_golden_values(codebook):
    states = torch.tensor(list(GOLDEN_VALUES))
    got = _bits(decode_states(states, codebook))
    want = [v[int(codebook)] for v in GOLDEN_VALUES.values()]
    assert [hex(g) for g in got] == [hex(w) for w in want]


@pytest.mark.parametrize("codebook", list(Codebook))
def test_whole_table_fingerprint(codebook):
    table = codebook_table(codebook)
    assert table.dtype == torch.float16 and table.shape == (65536,)
    digest = hashlib.sha256(table.view(torch.int16).numpy().astype("<i2").tobytes()).hexdigest()
    assert digest[:32] == FINGERPRINTS[codebook]


@pytest.mark.parametrize("codebook", list(Codebook))
def test_table_statistics(codebook):
    t = codebook_table(codebook).double()
    mean, std, lo, hi = STATISTICS[codebook]
    assert t.mean().item() == pytest.approx(mean, abs=2e-6)
    assert t.std(correction=0).item() == pytest.approx(std, abs=2e-6)
    assert t.min().item() == pytest.approx(lo, abs=1e-4)
    assert t.max().item() == pytest.approx(hi, abs=1e-4)


def test_lop3_halves_sum_is_single_rounding():
    # The two fp16 halves are normal numbers in +-[0.125, 2): their fp32 sum is
    # exact, so one fp32->fp16 rounding is the hardware __hadd. Check the
    # claim on every state: fp64 sum rounded once gives the same table.
    x = (torch.arange(65536, dtype=torch.int64) * 0xCBAC1FED) & 0xFFFFFFFF
    x = (x & 0x8FFF8FFF) ^ 0x3B603B60
    as16 = lambda v: (((v ^ 0x8000) - 0x8000).to(torch.int16)).view(torch.float16)  # noqa: E731
    lo, hi = as16(x & 0xFFFF), as16(x >> 16)
    assert lo.abs().min() >= 0.125 and hi.abs().max() < 2
    exact = (lo.double() + hi.double()).half()
    assert torch.equal(exact.view(torch.int16), codebook_table(Codebook.MCG).view(torch.int16))


def test_3inst_rms_is_the_quantizer_constant():
    # ExLlamaV3's quantizer normalises by codebook_scale = 1.24371088 for 3INST.
    rms = codebook_table(Codebook.THREE_INST).double().pow(2).mean().sqrt().item()
    assert rms == pytest.approx(1.24371088, abs=1e-7)
