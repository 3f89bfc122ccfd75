"""The three EXL3 codebooks: 16-bit trellis state -> fp16 value (bit-exact).

Format reference: shared ``exl3-format.md`` section 3.2. All arithmetic on the
state is unsigned 32-bit with wraparound; we do it in int64 and mask.

* 3INST: ``x = x*89226354 + 64248484``; then the "lop3" step below.
* MCG:   ``x = x*0xCBAC1FED``;            then the "lop3" step below.
  lop3:  ``x = (x & 0x8FFF8FFF) ^ 0x3B603B60``; the two 16-bit halves are
         reinterpreted as fp16 and added with one fp16 rounding. Both halves are
         normal numbers in +-[0.125, 2), so their fp32 sum is exact and a single
         fp32 -> fp16 round-to-nearest-even reproduces the GPU's ``__hadd``.
* MUL1:  ``x = x*0x83DCD12D``; ``s`` = sum of the four bytes of x;
         ``w = fp16((1024 + s)*1774/2^18 - 1329/2^7)``, computed as an exact
         integer numerator over 2^18 (|num| < 2^22, exact in fp32) and rounded
         once, which equals the hardware fp16 fma.

Decoding a whole matrix is a gather into the 65536-entry table of each
codebook, built once per process.
"""

from __future__ import annotations

import functools

import torch

from ..weights import MCG_MULTIPLIER, MUL1_MULTIPLIER, Codebook

_MASK32 = 0xFFFFFFFF
_3INST_MUL, _3INST_ADD = 89226354, 64248484
_LOP3_AND, _LOP3_XOR = 0x8FFF8FFF, 0x3B603B60
# MUL1 affine map: w = (1024 + bytesum) * 1774 / 2^18 - 1329 / 2^7
_MUL1_SCALE_NUM, _MUL1_BIAS_NUM, _MUL1_SHIFT = 1774, 1329 * 2048, 262144.0


def _u16_as_fp16(bits: torch.Tensor) -> torch.Tensor:
    """Reinterpret integers in [0, 65536) as IEEE binary16 bit patterns."""
    signed = ((bits ^ 0x8000) - 0x8000).to(torch.int16)
    return signed.view(torch.float16)


def decode_states(states: torch.Tensor, codebook: Codebook) -> torch.Tensor:
    """Decode integer states in [0, 65536) to fp16 with the given codebook (any shape)."""
    x = states.to(torch.int64)
    codebook = Codebook(codebook)
    if codebook in (Codebook.THREE_INST, Codebook.MCG):
        if codebook == Codebook.THREE_INST:
            x = (x * _3INST_MUL + _3INST_ADD) & _MASK32
        else:
            x = (x * MCG_MULTIPLIER) & _MASK32
        x = (x & _LOP3_AND) ^ _LOP3_XOR
        lo = _u16_as_fp16(x & 0xFFFF).float()
        hi = _u16_as_fp16(x >> 16).float()
        return (lo + hi).half()
    x = (x * MUL1_MULTIPLIER) & _MASK32
    s = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
    num = (1024 + s) * _MUL1_SCALE_NUM - _MUL1_BIAS_NUM
    return (num.float() / _MUL1_SHIFT).half()


@functools.lru_cache(maxsize=None)
def _codebook_table_cpu(codebook: int) -> torch.Tensor:
    return decode_states(torch.arange(65536, dtype=torch.int64), Codebook(codebook))


def codebook_table(codebook: Codebook, device: torch.device | str = "cpu") -> torch.Tensor:
    """All 65536 decoded values of ``codebook`` as an fp16 tensor (index = state)."""
    table = _codebook_table_cpu(int(codebook))
    return table if torch.device(device).type == "cpu" else table.to(device)


# RMS of each codebook over all states. The quantizer divides weights by this so
# that the regularised weight matches the codebook's spread (exl3-format.md 3.2).
CODEBOOK_RMS = {Codebook.THREE_INST: 1.24371088, Codebook.MCG: 1.24371088, Codebook.MUL1: 1.0}
