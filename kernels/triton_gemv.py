"""One-row fused decode + GEMV: the "ring" main loop, a switchable alternative to
``triton_gemm.decode_matmul``'s one-row path (``GemmConfig.prefetch_steps``).

Why it exists (docs/performance.md, "One-row kernel: load layout and bytes in
flight"): today's loop loads the next step's trellis words, decodes the current
step, then copies the new words into the loop-carried registers. In SASS those
copies are ``MOV``s at the top of the next iteration that wait for the loads, so
exactly one step (1 KB at 4 bits and ``BTK = 1``) per program is ever in flight.
Carrying more steps the same way only moves the wait: a register rotation
``a, b = b, new`` stalls on ``new`` at the end of the very iteration that loaded it.

The ring loop keeps ``PREFETCH + 1`` register sets and unrolls the loop over
them: sub-step ``j`` decodes set ``j`` and then reloads set ``j`` in place with the
step ``PREFETCH + 1`` ahead. No set is ever copied, so while a set is decoded the
other ``PREFETCH`` sets' loads are in flight. The words stay int32 until the
decode (half the registers of the uint64 the default loop holds).

``LANE_MAJOR`` orders the rank-7 block ``(tile_k, mh, ml, h, tile_n, c0, t4)``
instead of ``(tile_k, mh, t4, ml, tile_n, h, c0)``: the 32 threads of a warp then
hold the 32 lanes of one tile, so each word-load instruction reads one 128-byte
line of one tile instead of 8 words from each of 4 tiles (4 lines). The one-row
product does not care how the block's axes are ordered: the columns are put
back in order once, after the loop.

Steps past the end of the K slice (the last group of an unrolled loop) read
words from the slice's start (in bounds) and activations as zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_decode import codebook_decode, lane_geometry, unpack_pairs, window_states


@triton.jit
def _axes(LANE_MAJOR: tl.constexpr):
    """Index tensors ``mh, t4, ml, h, c0`` on their rank-7 axes (tile_k is axis 0, tile_n axis 4 in both orders)."""
    if LANE_MAJOR:  # (tile_k, mh, ml, h, tile_n, c0, t4): a warp's 32 threads are one tile's 32 lanes
        mh = tl.arange(0, 2)[None, :, None, None, None, None, None]
        ml = tl.arange(0, 2)[None, None, :, None, None, None, None]
        h = tl.arange(0, 2)[None, None, None, :, None, None, None]
        c0 = tl.arange(0, 8)[None, None, None, None, None, :, None]
        t4 = tl.arange(0, 4)[None, None, None, None, None, None, :]
    else:  # (tile_k, mh, t4, ml, tile_n, h, c0): triton_decode's order
        mh = tl.arange(0, 2)[None, :, None, None, None, None, None]
        t4 = tl.arange(0, 4)[None, None, :, None, None, None, None]
        ml = tl.arange(0, 2)[None, None, None, :, None, None, None]
        h = tl.arange(0, 2)[None, None, None, None, None, :, None]
        c0 = tl.arange(0, 8)[None, None, None, None, None, None, :]
    return mh, t4, ml, h, c0


@triton.jit
def ring_words(t32_ptr, kt0, nt0, TN, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr,
               NLOAD: tl.constexpr, BTK: tl.constexpr, LANE_MAJOR: tl.constexpr):
    """The int32 words each lane of tiles ``[kt0, +BTK) x [nt0, +8)`` needs (``w2 is w1`` when ``NLOAD == 2``)."""
    mh, t4, ml, h, c0 = _axes(LANE_MAJOR)
    j0, pair_idx, shift = lane_geometry(mh, t4, ml, h, c0, W32, KA, HALF)
    ti = tl.arange(0, BTK)[:, None, None, None, None, None, None]
    tj = tl.arange(0, 8)[None, None, None, None, :, None, None]
    tile = ((kt0 + ti) * TN + nt0 + tj) * W32
    w0 = tl.load(t32_ptr + tile + j0)
    w1 = tl.load(t32_ptr + tile + (j0 + 1) % W32)
    if NLOAD >= 3:
        w2 = tl.load(t32_ptr + tile + (j0 + 2) % W32)
    else:
        w2 = w1
    return w0, w1, w2


@triton.jit
def ring_rows(src32_ptr, word0, valid, BTK: tl.constexpr, LANE_MAJOR: tl.constexpr):
    """fp32 activations of tile rows ``[kt, kt + BTK)`` on the block's row axes (zeros where ``valid`` is false);
    ``word0``: int32 index of row ``16*kt`` (two fp16 rows per int32)."""
    mh, t4, ml, h, c0 = _axes(LANE_MAJOR)
    tk = tl.arange(0, BTK)[:, None, None, None, None, None, None]
    x = unpack_pairs(tl.load(src32_ptr + word0 + 8 * tk + 4 * mh + t4), ml)
    return tl.where(valid, x, 0.0)  # the address is in bounds either way (steps wrap to the slice's start)


@triton.jit
def ring_decode(w0, w1, w2, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
                CB: tl.constexpr, USE_PTX: tl.constexpr, LANE_MAJOR: tl.constexpr):
    """int32 words from ``ring_words`` -> fp32 weights on the block's axes."""
    mh, t4, ml, h, c0 = _axes(LANE_MAJOR)
    j0, pair_idx, shift = lane_geometry(mh, t4, ml, h, c0, W32, KA, HALF)
    state = window_states(w0.to(tl.uint32).to(tl.uint64), w1.to(tl.uint32).to(tl.uint64),
                          w2.to(tl.uint32).to(tl.uint64), pair_idx, shift, NLOAD)
    return codebook_decode(state, CB, USE_PTX).to(tl.float32)


@triton.jit
def ring_prologue(t32_ptr, kt_begin, k_tiles, nt, TN, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr,
                  NLOAD: tl.constexpr, BTK: tl.constexpr, SETS: tl.constexpr, LANE_MAJOR: tl.constexpr):
    """The words of the first ``SETS`` (1-4) steps, issued together (before the rotation when ``EARLY_LOAD``)."""
    wa0, wa1, wa2 = ring_words(t32_ptr, kt_begin, nt, TN, W32, KA, HALF, NLOAD, BTK, LANE_MAJOR)
    wb0, wb1, wb2 = wa0, wa1, wa2
    wc0, wc1, wc2 = wa0, wa1, wa2
    wd0, wd1, wd2 = wa0, wa1, wa2
    if SETS >= 2:
        wb0, wb1, wb2 = ring_words(t32_ptr, kt_begin + (1 * BTK) % k_tiles, nt, TN, W32, KA, HALF, NLOAD, BTK,
                                LANE_MAJOR)
    if SETS >= 3:
        wc0, wc1, wc2 = ring_words(t32_ptr, kt_begin + (2 * BTK) % k_tiles, nt, TN, W32, KA, HALF, NLOAD, BTK,
                                LANE_MAJOR)
    if SETS >= 4:
        wd0, wd1, wd2 = ring_words(t32_ptr, kt_begin + (3 * BTK) % k_tiles, nt, TN, W32, KA, HALF, NLOAD, BTK,
                                LANE_MAJOR)
    return wa0, wa1, wa2, wb0, wb1, wb2, wc0, wc1, wc2, wd0, wd1, wd2


@triton.jit
def _ring_substep(acc, w0, w1, w2, x, step, steps, src32, row_word0, t32_ptr, kt_begin, k_tiles, nt, TN,
                  W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr, CB: tl.constexpr,
                  USE_PTX: tl.constexpr, BTK: tl.constexpr, SETS: tl.constexpr, LANE_MAJOR: tl.constexpr):
    """Decode this set (step ``step``), then reload it in place with step ``step + SETS``."""
    acc += x * ring_decode(w0, w1, w2, W32, KA, HALF, NLOAD, CB, USE_PTX, LANE_MAJOR)
    ahead = step + SETS
    kt = kt_begin + (ahead * BTK) % k_tiles
    w0, w1, w2 = ring_words(t32_ptr, kt, nt, TN, W32, KA, HALF, NLOAD, BTK, LANE_MAJOR)
    x = ring_rows(src32, row_word0 + kt * 8, ahead < steps, BTK, LANE_MAJOR)
    return acc, w0, w1, w2, x


@triton.jit
def ring_gemv(src32, row_word0, t32_ptr, kt_begin, k_tiles, nt, TN,
              wa0, wa1, wa2, wb0, wb1, wb2, wc0, wc1, wc2, wd0, wd1, wd2,
              W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr, CB: tl.constexpr,
              USE_PTX: tl.constexpr, BTK: tl.constexpr, SETS: tl.constexpr, LANE_MAJOR: tl.constexpr):
    """``x[K-slice] @ W_hat[K-slice, 128 columns]`` -> fp32 ``[1, 128]`` for one row.

    ``src32``: the row's rotated activations viewed as int32, ``row_word0`` the int32 index of
    feature 0; ``a*``..``d*``: the words of the first ``SETS`` steps from ``ring_prologue``.
    """
    steps = k_tiles // BTK
    xa = ring_rows(src32, row_word0 + kt_begin * 8, 0 < steps, BTK, LANE_MAJOR)
    xb = xa
    xc = xa
    xd = xa
    if SETS >= 2:
        xb = ring_rows(src32, row_word0 + (kt_begin + (1 * BTK) % k_tiles) * 8, 1 < steps, BTK, LANE_MAJOR)
    if SETS >= 3:
        xc = ring_rows(src32, row_word0 + (kt_begin + (2 * BTK) % k_tiles) * 8, 2 < steps, BTK, LANE_MAJOR)
    if SETS >= 4:
        xd = ring_rows(src32, row_word0 + (kt_begin + (3 * BTK) % k_tiles) * 8, 3 < steps, BTK, LANE_MAJOR)
    if LANE_MAJOR:
        acc = tl.zeros((BTK, 2, 2, 2, 8, 8, 4), tl.float32)
    else:
        acc = tl.zeros((BTK, 2, 4, 2, 8, 2, 8), tl.float32)
    for g in range(0, steps, SETS):
        acc, wa0, wa1, wa2, xa = _ring_substep(acc, wa0, wa1, wa2, xa, g, steps, src32, row_word0, t32_ptr, kt_begin,
                                            k_tiles, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, SETS,
                                            LANE_MAJOR)
        if SETS >= 2:
            acc, wb0, wb1, wb2, xb = _ring_substep(acc, wb0, wb1, wb2, xb, g + 1, steps, src32, row_word0, t32_ptr,
                                                kt_begin, k_tiles, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK,
                                                SETS, LANE_MAJOR)
        if SETS >= 3:
            acc, wc0, wc1, wc2, xc = _ring_substep(acc, wc0, wc1, wc2, xc, g + 2, steps, src32, row_word0, t32_ptr,
                                                kt_begin, k_tiles, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK,
                                                SETS, LANE_MAJOR)
        if SETS >= 4:
            acc, wd0, wd1, wd2, xd = _ring_substep(acc, wd0, wd1, wd2, xd, g + 3, steps, src32, row_word0, t32_ptr,
                                                kt_begin, k_tiles, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK,
                                                SETS, LANE_MAJOR)
    if LANE_MAJOR:  # sum the row axes (t4, ml, mh, tile_k), then put the columns back as (tile_n, h, wc0)
        cols = tl.sum(tl.sum(tl.sum(tl.sum(acc, axis=6), axis=2), axis=1), axis=0)  # (h, tile_n, wc0)
        return tl.reshape(tl.permute(cols, (1, 0, 2)), (128,))[None, :]
    else:
        return tl.sum(tl.reshape(acc, (16 * BTK, 128)), axis=0)[None, :]
