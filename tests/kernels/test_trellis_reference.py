"""Trellis state extraction and tile layout against the spec's worked examples and a
bit-by-bit oracle written independently of the word-window implementation."""

import pytest
import torch

from exl3_triton.kernels.reference import (
    TC_PERM,
    dequant_inner_ref,
    matrix_to_tiles,
    tiles_to_matrix,
    trellis_states,
)
from exl3_triton.kernels.reference.codebook import decode_states
from exl3_triton.kernels.weights import SUPPORTED_BITS, Codebook, words_per_tile


def states_bitwise(trellis: torch.Tensor, bits: float) -> torch.Tensor:
    """Spec 3.1/10.1 literally: unpack every bit MSB-first after the word-pair swap,
    then read the 16-bit window ending at S(t) (mod L) for each position."""
    words = words_per_tile(bits)
    g = trellis.to(torch.int64) & 0xFFFF
    s = g.reshape(*g.shape[:-1], words // 2, 2).flip(-1).reshape(g.shape)
    stream = ((s.unsqueeze(-1) >> torch.arange(15, -1, -1)) & 1).reshape(*g.shape[:-1], words * 16)
    ring = words * 16
    ka = int(bits)
    end, out = 0, []
    for t in range(256):
        end += ka + (1 if (bits != ka and t % 2 == 1) else 0)
        idx = (torch.arange(end - 16, end) % ring)
        window = stream[..., idx]
        out.append((window << torch.arange(15, -1, -1)).sum(-1))
    return torch.stack(out, -1)


def pack_states(symbols: list[int], bits: float) -> torch.Tensor:
    """Independent packer: write each position's low D(t) bits MSB-first into a ring,
    then store each pair of uint16 words swapped (what ExLlamaV3's packer does)."""
    ka = int(bits)
    stream = []
    for t, sym in enumerate(symbols):
        d = ka + (1 if (bits != ka and t % 2 == 1) else 0)
        stream += [(sym >> (d - 1 - i)) & 1 for i in range(d)]
    words = [int("".join(map(str, stream[w * 16:(w + 1) * 16])), 2) for w in range(len(stream) // 16)]
    swapped = [words[m ^ 1] for m in range(len(words))]
    return torch.tensor([(w ^ 0x8000) - 0x8000 for w in swapped], dtype=torch.int16)


def test_perm_first_entries():
    assert TC_PERM[:16].tolist() == [0, 16, 128, 144, 8, 24, 136, 152, 32, 48, 160, 176, 40, 56, 168, 184]
    assert sorted(TC_PERM.tolist()) == list(range(256))


def test_worked_example_k4():
    tile = torch.zeros(64, dtype=torch.int16)
    tile[1] = 0x1234
    st = trellis_states(tile[None, None], 4)[0, 0]
    assert st[:9].tolist() == [0x0001, 0x0012, 0x0123, 0x1234, 0x2340, 0x3400, 0x4000, 0, 0]
    assert st[9:].abs().sum() == 0


def test_worked_example_k3():
    tile = torch.zeros(48, dtype=torch.int16)
    tile[1] = -0x8000  # 0x8000: only stream bit 0 set
    st = trellis_states(tile[None, None], 3)[0, 0]
    assert st[:6].tolist() == [0x0004, 0x0020, 0x0100, 0x0800, 0x4000, 0]
    assert st[6:].abs().sum() == 0


# Spec 3.7: tile with g[1] = 0x1234, K = 4; values at (row, col) and everywhere else.
RECONSTRUCT_EXAMPLE = {
    Codebook.THREE_INST: ([-0.91943359375, 0.79736328125, -0.6640625, -2.19921875, 0.8505859375, -1.53125,
                           0.51513671875, 0.76806640625], 0.76806640625),
    Codebook.MCG: ([0.134521484375, 1.046875, -1.7880859375, 1.5146484375, 1.142578125, 0.56640625,
                    2.07421875, 1.84375], 1.84375),
    Codebook.MUL1: ([0.64111328125, -0.5703125, -0.299560546875, -0.5771484375, -0.59716796875,
                     -0.88818359375, -2.16015625, -3.453125], -3.453125),
}
EXAMPLE_POSITIONS = [(0, 0), (1, 0), (8, 0), (9, 0), (0, 8), (1, 8), (8, 8), (9, 8)]


@pytest.mark.parametrize("codebook", list(Codebook))
def test_worked_reconstruction(codebook):
    trellis = torch.zeros(1, 1, 64, dtype=torch.int16)
    trellis[0, 0, 1] = 0x1234
    w = dequant_inner_ref(trellis, 4, codebook).double()
    values, other = RECONSTRUCT_EXAMPLE[codebook]
    expected = torch.full((16, 16), other, dtype=torch.float64)
    for (r, c), v in zip(EXAMPLE_POSITIONS, values):
        expected[r, c] = v
    assert torch.equal(w, expected)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_states_match_bitwise_oracle(bits):
    g = torch.Generator().manual_seed(int(bits * 10))
    trellis = torch.randint(-32768, 32768, (2, 3, words_per_tile(bits)), generator=g).to(torch.int16)
    assert torch.equal(trellis_states(trellis, bits).long(), states_bitwise(trellis, bits))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packed_symbols_decode_back(bits):
    # A state's low D(t) bits are exactly the symbol written for position t.
    g = torch.Generator().manual_seed(7)
    ka = int(bits)
    widths = [ka + (1 if (bits != ka and t % 2 == 1) else 0) for t in range(256)]
    symbols = [int(torch.randint(0, 1 << w, (1,), generator=g)) for w in widths]
    trellis = pack_states(symbols, bits)
    states = trellis_states(trellis[None, None], bits)[0, 0].tolist()
    assert [st & ((1 << w) - 1) for st, w in zip(states, widths)] == symbols


def test_tile_layout_roundtrip():
    m = torch.randn(48, 80)
    tiles = matrix_to_tiles(m)
    assert tiles.shape == (3, 5, 256)
    assert torch.equal(tiles_to_matrix(tiles), m)
    # tile (i, j) covers rows 16i.., cols 16j..; position p holds element TC_PERM[p]
    p = 37
    e = int(TC_PERM[p])
    assert tiles[2, 3, p] == m[32 + e // 16, 48 + e % 16]


def test_dequant_is_table_lookup_of_states():
    g = torch.Generator().manual_seed(3)
    trellis = torch.randint(-32768, 32768, (4, 2, 48), generator=g).to(torch.int16)
    w = dequant_inner_ref(trellis, 3, Codebook.MUL1, tile_rows_per_chunk=3)  # chunking crosses tiles
    expected = tiles_to_matrix(decode_states(states_bitwise(trellis, 3), Codebook.MUL1))
    assert torch.equal(w.view(torch.int16), expected.view(torch.int16))
