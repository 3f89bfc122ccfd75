"""Trellis bitstream -> 16-bit states -> W_hat, bit-exact, in plain PyTorch.

Format reference: shared ``exl3-format.md`` sections 3.1, 3.3, 3.4 and 10.1.

One 16x16 tile is a circular bitstream of ``L = 256*K`` bits stored in ``16*K``
int16 words. Each pair of words is stored swapped (``s[m] = g[m ^ 1]``) and bits
are read MSB-first within a word. Sequence position ``t`` (0..255) decodes the
16-bit window that ends at bit ``S(t)`` of the ring, where ``S(t)`` is the end
of position t's own bits:

* integer K:              ``S(t) = (t+1)*K``
* half-integer K = KA+.5: even positions carry KA bits, odd ones KA+1, so
                          ``S(t) = (t+1)*KA + (t+1)//2``

Position ``t`` holds tile element ``TC_PERM[t]`` (row-major 16x16, row = input
channel offset); tile ``(i, j)`` of the trellis covers ``W_hat[16i:16i+16,
16j:16j+16]``.

Rather than unpacking every bit (a [tiles, 256, 16] gather), each state is read
from the two consecutive words that hold its window: for a window starting at
ring bit ``b0``, ``state = ((s[w0] << 16 | s[w0+1]) >> (16 - b0 % 16)) & 0xFFFF``
with ``w0 = b0 // 16`` (indices mod the word count). The index arrays depend only
on K and are built once.
"""

from __future__ import annotations

import functools

import torch

from ..weights import SUPPORTED_BITS, Codebook, words_per_tile
from .codebook import codebook_table


def _tensor_core_perm() -> list[int]:
    # Lane t of a warp holds, for the m16n8k16 B fragment, rows r0, r0+1, r0+8,
    # r0+9 of columns c0 and c0+8.
    perm = []
    for lane in range(32):
        r0, c0 = 2 * (lane % 4), lane // 4
        for c in (c0, c0 + 8):
            for r in (r0, r0 + 1, r0 + 8, r0 + 9):
                perm.append(16 * r + c)
    return perm


# TC_PERM[p] = row-major tile element held by sequence position p.
TC_PERM = torch.tensor(_tensor_core_perm(), dtype=torch.int64)
# TC_PERM_INV[e] = sequence position holding tile element e.
TC_PERM_INV = torch.argsort(TC_PERM)


def position_end_bits(bits: float) -> torch.Tensor:
    """``S(t)`` for t = 0..255: the ring bit just past position t's own bits."""
    t1 = torch.arange(1, 257, dtype=torch.int64)
    ka = int(bits)
    if bits == ka:
        return t1 * ka
    return t1 * ka + t1 // 2


@functools.lru_cache(maxsize=None)
def _window_indices(bits: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each position: first word, second word and right shift of its 16-bit window."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits per weight {bits}")
    words = words_per_tile(bits)
    ring = words * 16
    start = (position_end_bits(bits) - 16) % ring
    w0 = start // 16
    w1 = (w0 + 1) % words
    shift = 16 - start % 16
    return w0, w1, shift


def unswap_words(trellis: torch.Tensor) -> torch.Tensor:
    """int16 words as stored -> uint16 stream words (as int32), undoing the pair swap."""
    g = trellis.to(torch.int32) & 0xFFFF
    shape = g.shape
    return g.reshape(*shape[:-1], shape[-1] // 2, 2).flip(-1).reshape(shape)


def trellis_states(trellis: torch.Tensor, bits: float) -> torch.Tensor:
    """16-bit states, int32 ``[..., 256]`` in sequence order, from int16 ``[..., 16*K]`` tiles."""
    words = words_per_tile(bits)
    if trellis.shape[-1] != words:
        raise ValueError(f"trellis last dim {trellis.shape[-1]} does not match {bits} bits ({words} words)")
    s = unswap_words(trellis)
    w0, w1, shift = (t.to(s.device) for t in _window_indices(bits))
    pair = (s[..., w0] << 16) | s[..., w1]
    return (pair >> shift) & 0xFFFF


def tiles_to_matrix(values: torch.Tensor) -> torch.Tensor:
    """``[tk, tn, 256]`` values in sequence order -> ``[16*tk, 16*tn]`` matrix."""
    tk, tn, _ = values.shape
    tiles = values[..., TC_PERM_INV.to(values.device)]  # row-major 16x16 per tile
    return tiles.view(tk, tn, 16, 16).permute(0, 2, 1, 3).reshape(16 * tk, 16 * tn)


def matrix_to_tiles(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of ``tiles_to_matrix``: ``[16*tk, 16*tn]`` -> ``[tk, tn, 256]`` in sequence order."""
    k, n = matrix.shape
    tiles = matrix.reshape(k // 16, 16, n // 16, 16).permute(0, 2, 1, 3).reshape(k // 16, n // 16, 256)
    return tiles[..., TC_PERM.to(matrix.device)]


def dequant_inner_ref(
    trellis: torch.Tensor,
    bits: float,
    codebook: Codebook,
    *,
    tile_rows_per_chunk: int = 64,
) -> torch.Tensor:
    """Decode a trellis ``[tk, tn, 16K]`` to ``W_hat`` fp16 ``[16*tk, 16*tn]``, bit-exact.

    Works in chunks of tile rows so that the int32 state buffer stays small for
    large matrices.
    """
    tk, tn, _ = trellis.shape
    table = codebook_table(codebook, trellis.device)
    out = torch.empty(16 * tk, 16 * tn, dtype=torch.float16, device=trellis.device)
    for r0 in range(0, tk, tile_rows_per_chunk):
        r1 = min(tk, r0 + tile_rows_per_chunk)
        states = trellis_states(trellis[r0:r1], bits)
        out[16 * r0 : 16 * r1] = tiles_to_matrix(table[states.long()])
    return out
