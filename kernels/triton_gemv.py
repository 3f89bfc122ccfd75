"""One-row fused decode + GEMV loops that keep more trellis bytes in flight than
``triton_gemm.decode_matmul``'s one-row path; switchable (``GemmConfig.async_stages``,
``prefetch_steps``, ``lane_major``, ``early_load``), off by default.

Why (docs/performance.md, "One-row kernel: load layout and bytes in flight"): the
default loop loads the next step's trellis words while decoding the current one,
so one step (1 KB at 4 bits and ``BTK = 1``) per program is in flight; in SASS
every loaded register is first read less than one step's instructions later.
Carrying more steps in loop registers the plain way (``a, b = b, new``) makes the
copy at the end of the iteration wait for the load just issued.

``async_gemv`` leaves the prefetching to Triton's software pipeliner: the loop loads
the step it decodes and ``tl.range(num_stages=S)`` turns the loads into ``cp.async``
copies into a shared-memory ring ``S - 1`` steps ahead (Triton 3.6 and 3.9 both do).

``ring_gemv`` keeps ``PREFETCH + 1`` register sets and unrolls the loop over them:
sub-step ``j`` decodes set ``j``, then reloads it in place with the step
``PREFETCH + 1`` ahead, so no set is copied. How much of that survives is up to
ptxas: with Triton 3.6 three sets ahead keep ~2 steps of cover, with 3.9 the loads
are moved down to the end of the loop body and keep about one (measured in the
compiled code); the ring is kept as the register-only contender.

``LANES`` (``GemmConfig.lane_major``) orders the rank-7 block so that the 32
threads of a warp hold the 32 lanes of one tile: each word-load instruction then
reads one 128-byte line instead of 4 (Triton 3.9) or 8 (Triton 3.6) lines of 4-8
different tiles. Which order does that depends on Triton: its coalescing pass
spreads threads over the axes of a gather load (no axis provably contiguous)
from the last axis in 3.7-3.9 but from the first in 3.6 (``lanes_arrangement``).
The one-row product does not care how the block's axes are ordered: the columns
are put back in order once, after the loop.

In the ring, steps past the end of the K slice (the last group of the unrolled
loop) re-read the slice's last step (in bounds; a clamp, not a modulo, which
would cost an integer division per step) and count its activations as zeros.
Words and activations stay packed int32 until their step is decoded, so no
instruction waits on a load earlier than the decode that needs it.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

from .triton_decode import codebook_decode, lane_geometry, unpack_pairs, window_states


@functools.lru_cache(maxsize=None)
def lanes_arrangement() -> int:
    """The ``LANES`` arrangement that puts a tile's lanes in one warp with the installed Triton.

    Measured by compiling a gather load for sm_90 (``bench/kernel_resources.py --coalesce-order``):
    Triton 3.6 gives it ``order = [0, 1, ...]`` (threads over the first axes), 3.7, 3.8 and 3.9
    ``order = [..., 1, 0]`` (threads over the last axes).
    """
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return 2 if (major, minor) < (3, 7) else 1


@triton.jit
def _on_axis(N: tl.constexpr, AXIS: tl.constexpr):
    """``arange(N)`` placed on axis ``AXIS`` of a rank-7 tensor."""
    v = tl.arange(0, N)
    if AXIS == 0:
        return v[:, None, None, None, None, None, None]
    elif AXIS == 1:
        return v[None, :, None, None, None, None, None]
    elif AXIS == 2:
        return v[None, None, :, None, None, None, None]
    elif AXIS == 3:
        return v[None, None, None, :, None, None, None]
    elif AXIS == 4:
        return v[None, None, None, None, :, None, None]
    elif AXIS == 5:
        return v[None, None, None, None, None, :, None]
    else:
        return v[None, None, None, None, None, None, :]


@triton.jit
def _axes(BTK: tl.constexpr, LANES: tl.constexpr):
    """Index tensors ``tk, mh, t4, ml, tn, h, c0`` on their rank-7 axes for arrangement ``LANES``:
    0 ``(tk, mh, t4, ml, tn, h, c0)`` (triton_decode's), 1 ``(tk, mh, ml, h, tn, c0, t4)``,
    2 ``(t4, c0, mh, ml, h, tn, tk)`` (see ``lanes_arrangement``)."""
    if LANES == 1:
        return (_on_axis(BTK, 0), _on_axis(2, 1), _on_axis(4, 6), _on_axis(2, 2), _on_axis(8, 4), _on_axis(2, 3),
                _on_axis(8, 5))
    elif LANES == 2:
        return (_on_axis(BTK, 6), _on_axis(2, 2), _on_axis(4, 0), _on_axis(2, 3), _on_axis(8, 5), _on_axis(2, 4),
                _on_axis(8, 1))
    else:
        return (_on_axis(BTK, 0), _on_axis(2, 1), _on_axis(4, 2), _on_axis(2, 3), _on_axis(8, 4), _on_axis(2, 5),
                _on_axis(8, 6))


@triton.jit
def ring_words(t32_ptr, kt0, nt0, TN, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr,
               NLOAD: tl.constexpr, BTK: tl.constexpr, LANES: tl.constexpr):
    """The int32 words each lane of tiles ``[kt0, +BTK) x [nt0, +8)`` needs (``w2 is w1`` when ``NLOAD == 2``)."""
    tk, mh, t4, ml, tn, h, c0 = _axes(BTK, LANES)
    j0, pair_idx, shift = lane_geometry(mh, t4, ml, h, c0, W32, KA, HALF)
    return lane_words(t32_ptr, ((kt0 + tk) * TN + nt0 + tn) * W32, j0, W32, NLOAD)


@triton.jit
def lane_words(t32_ptr, tile, j0, W32: tl.constexpr, NLOAD: tl.constexpr):
    """The words ``j0, j0 + 1 (, j0 + 2)`` (mod the tile's ``W32``) of each lane's tile at int32 offset ``tile``
    (``w2 is w1`` when ``NLOAD == 2``)."""
    w0 = tl.load(t32_ptr + tile + j0)
    w1 = tl.load(t32_ptr + tile + (j0 + 1) % W32)
    if NLOAD >= 3:
        w2 = tl.load(t32_ptr + tile + (j0 + 2) % W32)
    else:
        w2 = w1
    return w0, w1, w2


@triton.jit
def ring_rows(src32_ptr, word0, BTK: tl.constexpr, LANES: tl.constexpr):
    """Activations of tile rows ``[kt, kt + BTK)`` as packed int32 pairs on the block's row axes (``ml`` left out);
    ``word0``: int32 index of row ``16*kt`` (two fp16 rows per int32)."""
    tk, mh, t4, ml, tn, h, c0 = _axes(BTK, LANES)
    return tl.load(src32_ptr + word0 + 8 * tk + 4 * mh + t4)


@triton.jit
def ring_decode(w0, w1, w2, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
                CB: tl.constexpr, USE_PTX: tl.constexpr, BTK: tl.constexpr, LANES: tl.constexpr):
    """int32 words from ``ring_words`` -> fp32 weights on the block's axes."""
    tk, mh, t4, ml, tn, h, c0 = _axes(BTK, LANES)
    j0, pair_idx, shift = lane_geometry(mh, t4, ml, h, c0, W32, KA, HALF)
    state = window_states(w0.to(tl.uint32).to(tl.uint64), w1.to(tl.uint32).to(tl.uint64),
                          w2.to(tl.uint32).to(tl.uint64), pair_idx, shift, NLOAD)
    return codebook_decode(state, CB, USE_PTX).to(tl.float32)


@triton.jit
def step_tile(kt_begin, step, steps, BTK: tl.constexpr):
    """First tile row of ``step``; steps past the slice's end re-read its last step (a clamp, no division)."""
    return kt_begin + tl.minimum(step, steps - 1) * BTK


@triton.jit
def ring_prologue(t32_ptr, kt_begin, steps, nt, TN, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr,
                  NLOAD: tl.constexpr, BTK: tl.constexpr, SETS: tl.constexpr, LANES: tl.constexpr):
    """The words of the first ``SETS`` (1-4) steps, issued together (before the rotation when ``EARLY_LOAD``)."""
    wa0, wa1, wa2 = ring_words(t32_ptr, kt_begin, nt, TN, W32, KA, HALF, NLOAD, BTK, LANES)
    wb0, wb1, wb2 = wa0, wa1, wa2
    wc0, wc1, wc2 = wa0, wa1, wa2
    wd0, wd1, wd2 = wa0, wa1, wa2
    if SETS >= 2:
        wb0, wb1, wb2 = ring_words(t32_ptr, step_tile(kt_begin, 1, steps, BTK), nt, TN, W32, KA, HALF, NLOAD, BTK,
                                LANES)
    if SETS >= 3:
        wc0, wc1, wc2 = ring_words(t32_ptr, step_tile(kt_begin, 2, steps, BTK), nt, TN, W32, KA, HALF, NLOAD, BTK,
                                LANES)
    if SETS >= 4:
        wd0, wd1, wd2 = ring_words(t32_ptr, step_tile(kt_begin, 3, steps, BTK), nt, TN, W32, KA, HALF, NLOAD, BTK,
                                LANES)
    return wa0, wa1, wa2, wb0, wb1, wb2, wc0, wc1, wc2, wd0, wd1, wd2


@triton.jit
def _ring_substep(acc, w0, w1, w2, x, step, steps, src32, row_word0, t32_ptr, kt_begin, nt, TN,
                  W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr, CB: tl.constexpr,
                  USE_PTX: tl.constexpr, BTK: tl.constexpr, SETS: tl.constexpr, LANES: tl.constexpr):
    """Decode this set (step ``step``), then reload it in place with step ``step + SETS``."""
    tk, mh, t4, ml, tn, h, c0 = _axes(BTK, LANES)
    xf = tl.where(step < steps, unpack_pairs(x, ml), 0.0)
    acc += xf * ring_decode(w0, w1, w2, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, LANES)
    kt = step_tile(kt_begin, step + SETS, steps, BTK)
    w0, w1, w2 = ring_words(t32_ptr, kt, nt, TN, W32, KA, HALF, NLOAD, BTK, LANES)
    x = ring_rows(src32, row_word0 + kt * 8, BTK, LANES)
    return acc, w0, w1, w2, x


@triton.jit
def ring_gemv(src32, row_word0, t32_ptr, kt_begin, k_tiles, nt, TN,
              wa0, wa1, wa2, wb0, wb1, wb2, wc0, wc1, wc2, wd0, wd1, wd2,
              W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr, CB: tl.constexpr,
              USE_PTX: tl.constexpr, BTK: tl.constexpr, SETS: tl.constexpr, LANES: tl.constexpr):
    """``x[K-slice] @ W_hat[K-slice, 128 columns]`` -> fp32 ``[1, 128]`` for one row.

    ``src32``: the row's rotated activations viewed as int32, ``row_word0`` the int32 index of
    feature 0; ``a*``..``d*``: the words of the first ``SETS`` steps from ``ring_prologue``.
    """
    steps = k_tiles // BTK
    xa = ring_rows(src32, row_word0 + kt_begin * 8, BTK, LANES)
    xb = xa
    xc = xa
    xd = xa
    if SETS >= 2:
        xb = ring_rows(src32, row_word0 + step_tile(kt_begin, 1, steps, BTK) * 8, BTK, LANES)
    if SETS >= 3:
        xc = ring_rows(src32, row_word0 + step_tile(kt_begin, 2, steps, BTK) * 8, BTK, LANES)
    if SETS >= 4:
        xd = ring_rows(src32, row_word0 + step_tile(kt_begin, 3, steps, BTK) * 8, BTK, LANES)
    acc = _zero_block(BTK, LANES)
    for g in range(0, steps, SETS):
        acc, wa0, wa1, wa2, xa = _ring_substep(acc, wa0, wa1, wa2, xa, g, steps, src32, row_word0, t32_ptr, kt_begin,
                                            nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, SETS,
                                            LANES)
        if SETS >= 2:
            acc, wb0, wb1, wb2, xb = _ring_substep(acc, wb0, wb1, wb2, xb, g + 1, steps, src32, row_word0, t32_ptr,
                                                kt_begin, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK,
                                                SETS, LANES)
        if SETS >= 3:
            acc, wc0, wc1, wc2, xc = _ring_substep(acc, wc0, wc1, wc2, xc, g + 2, steps, src32, row_word0, t32_ptr,
                                                kt_begin, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK,
                                                SETS, LANES)
        if SETS >= 4:
            acc, wd0, wd1, wd2, xd = _ring_substep(acc, wd0, wd1, wd2, xd, g + 3, steps, src32, row_word0, t32_ptr,
                                                kt_begin, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK,
                                                SETS, LANES)
    return block_columns(acc, BTK, LANES)


@triton.jit
def _zero_block(BTK: tl.constexpr, LANES: tl.constexpr):
    if LANES == 1:
        return tl.zeros((BTK, 2, 2, 2, 8, 8, 4), tl.float32)
    elif LANES == 2:
        return tl.zeros((4, 8, 2, 2, 2, 8, BTK), tl.float32)
    else:
        return tl.zeros((BTK, 2, 4, 2, 8, 2, 8), tl.float32)


@triton.jit
def block_columns(acc, BTK: tl.constexpr, LANES: tl.constexpr):
    """Sum a rank-7 accumulator over its row axes -> ``[1, 128]`` columns in order."""
    if LANES == 1:  # sum the row axes (t4, ml, mh, tile_k), then put the columns back as (tile_n, h, c0)
        cols = tl.sum(tl.sum(tl.sum(tl.sum(acc, axis=6), axis=2), axis=1), axis=0)  # (h, tile_n, c0)
        return tl.reshape(tl.permute(cols, (1, 0, 2)), (128,))[None, :]
    elif LANES == 2:  # rows are (tile_k, ml, mh, t4) on axes 6, 3, 2, 0
        cols = tl.sum(tl.sum(tl.sum(tl.sum(acc, axis=6), axis=3), axis=2), axis=0)  # (c0, h, tile_n)
        return tl.reshape(tl.permute(cols, (2, 1, 0)), (128,))[None, :]
    else:
        return tl.sum(tl.reshape(acc, (16 * BTK, 128)), axis=0)[None, :]


@triton.jit
def async_gemv(src32, row_word0, t32_ptr, kt_begin, k_tiles, nt, TN,
               W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr, CB: tl.constexpr,
               USE_PTX: tl.constexpr, BTK: tl.constexpr, STAGES: tl.constexpr, LANES: tl.constexpr):
    """``ring_gemv`` with the prefetching left to Triton's software pipeliner (``GemmConfig.async_stages``).

    The loop loads the step it decodes; ``tl.range(num_stages=STAGES)`` makes Triton
    (3.6 and 3.9 alike) turn these gather loads into ``cp.async`` copies into a
    shared-memory ring ``STAGES - 1`` steps ahead. The copies hold no registers,
    so no compiler pass can sink them next to their use (as ptxas does with the
    ring loop's register loads, docs/performance.md).
    """
    tk, mh, t4, ml, tn, h, c0 = _axes(BTK, LANES)
    acc = _zero_block(BTK, LANES)
    for it in tl.range(0, k_tiles, BTK, num_stages=STAGES):
        w0, w1, w2 = ring_words(t32_ptr, kt_begin + it, nt, TN, W32, KA, HALF, NLOAD, BTK, LANES)
        x = ring_rows(src32, row_word0 + (kt_begin + it) * 8, BTK, LANES)
        acc += unpack_pairs(x, ml) * ring_decode(w0, w1, w2, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, LANES)
    return block_columns(acc, BTK, LANES)


@triton.jit
def lanes_block_fp16(w0, w1, w2, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
                     CB: tl.constexpr, USE_PTX: tl.constexpr, BTK: tl.constexpr, LANES: tl.constexpr):
    """Words from ``ring_words`` (arrangement ``LANES``) -> fp16 ``W_hat`` block ``[16*BTK, 128]`` in row-major
    order, for the tensor-core path: the block is decoded on the lane-major axes and put back in
    ``triton_decode``'s axis order before the reshape (a layout change the dot's operand conversion
    through shared memory needs anyway)."""
    tk, mh, t4, ml, tn, h, c0 = _axes(BTK, LANES)
    j0, pair_idx, shift = lane_geometry(mh, t4, ml, h, c0, W32, KA, HALF)
    state = window_states(w0.to(tl.uint32).to(tl.uint64), w1.to(tl.uint32).to(tl.uint64),
                          w2.to(tl.uint32).to(tl.uint64), pair_idx, shift, NLOAD)
    v = codebook_decode(state, CB, USE_PTX)
    if LANES == 1:  # (tk, mh, ml, h, tn, c0, t4) -> (tk, mh, t4, ml, tn, h, c0)
        v = tl.permute(v, (0, 1, 6, 2, 4, 3, 5))
    elif LANES == 2:  # (t4, c0, mh, ml, h, tn, tk) -> (tk, mh, t4, ml, tn, h, c0)
        v = tl.permute(v, (6, 2, 0, 3, 5, 4, 1))
    return tl.reshape(v, (16 * BTK, 128))
