"""Triton building blocks shared by every EXL3 kernel: trellis decode in registers.

``decode_tiles`` turns a ``BTK x BTN`` block of 16x16 trellis tiles into the
fp16 matrix ``W_hat[16*BTK, 16*BTN]`` without touching memory other than the
packed words, bit-exact with ``kernels.reference``.

How it avoids per-weight gathers. Sequence position ``p = 8*lane + q`` of a
tile (``lane`` 0..31, ``q`` 0..7) sits at tile row ``8*mh + 2*t4 + ml`` and column
``8*h + c0`` where ``lane = 4*c0 + t4`` and ``q = 4*h + 2*mh + ml`` (the tensor-core
permutation of exl3-format.md 3.3 is a permutation of index *bits*). So the
block is computed as a rank-7 tensor with axes ``(tile_k, mh, t4, ml, tile_n, h,
c0)`` -- a plain reshape away from the row-major matrix -- and the 32-bit words
each lane needs are loaded once per lane and broadcast over its 8 positions.

The 8 windows of one lane span at most ``NLOAD`` consecutive 32-bit words of the
tile's stream (2 for K <= 4, 3 above); each window is cut from a 64-bit word
pair with one shift. Loading the words (``load_tile_words``) and decoding them
(``decode_words``) are separate steps so that loops can prefetch the next
block's words while decoding the current one. The trellis is read as int32: little-endian int32 word
``j`` of a tile is exactly stream bits ``32j .. 32j+31`` MSB-first (the pair swap
of the int16 storage undoes itself).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import triton
import triton.language as tl

from .weights import words_per_tile


@dataclass(frozen=True)
class LaneLayout:
    """Compile-time constants of the decode for one bit width."""

    w32: int  # 32-bit words per tile
    ka: int  # integer part of K
    half: bool  # half-integer K (alternating KA, KA+1 bits)
    nload: int  # words loaded per lane


@functools.lru_cache(maxsize=None)
def lane_layout(bits: float) -> LaneLayout:
    ka = int(bits)
    half = bits != ka
    ring = words_per_tile(bits) * 16

    def end(p: int) -> int:  # ring bit just past position p's own bits
        return (p + 1) * ka + ((p + 1) // 2 if half else 0)

    max_rel = max((end(8 * lane) - 16) % ring % 32 + end(8 * lane + 7) - end(8 * lane) for lane in range(32))
    nload = max(0, (max_rel - 48 + 31) // 32) + 2
    return LaneLayout(w32=words_per_tile(bits) // 2, ka=ka, half=half, nload=nload)


# --------------------------------------------------------------------- codebooks

# The codebooks' PTX (exl3-format.md 3.2), from the state in ``$1``: MUL1 leaves the fp16 weight in ``v``; MCG and
# 3INST leave in ``x`` the 32-bit word whose two fp16 halves sum to the weight. Shared with the Gluon tensor-core
# kernel (gluon_gemv.py), which hands the word itself to the tensor cores.
MUL1_PTX = """
            .reg .b32 x, s, m;
            .reg .b16 h, a, b, v;
            mul.lo.u32 x, $1, 0x83DCD12D;
            mov.b32 m, 0x01010101;
            mov.b32 s, 0x6400;
            dp4a.u32.u32 s, x, m, s;
            cvt.u16.u32 h, s;
            mov.b16 a, 0x1EEE;
            mov.b16 b, 0xC931;
            fma.rn.f16 v, h, a, b;"""
MCG_PTX = """
            .reg .b32 x;
            mul.lo.u32 x, $1, 0xCBAC1FED;
            lop3.b32 x, x, 0x8FFF8FFF, 0x3B603B60, 0x6A;"""
THREE_INST_PTX = """
            .reg .b32 x;
            mad.lo.u32 x, $1, 89226354, 64248484;
            lop3.b32 x, x, 0x8FFF8FFF, 0x3B603B60, 0x6A;"""
_HALVES_SUM = """
            .reg .b16 lo, hi;
            mov.b32 {lo, hi}, x;
            add.rn.f16 $0, lo, hi;
            }"""
_MUL1_VALUE = tl.constexpr("{" + MUL1_PTX + "\n            mov.b16 $0, v;\n            }")
_MCG_VALUE = tl.constexpr("{" + MCG_PTX + _HALVES_SUM)
_THREE_INST_VALUE = tl.constexpr("{" + THREE_INST_PTX + _HALVES_SUM)


@triton.jit
def _codebook_ptx(state, CB: tl.constexpr):
    # One PTX sequence per weight: multiply, lop3 (or dp4a byte sum), one fp16 op.
    if CB == 2:  # MUL1
        return tl.inline_asm_elementwise(_MUL1_VALUE, "=h,r", [state], dtype=tl.float16, is_pure=True, pack=1)
    elif CB == 1:  # MCG
        return tl.inline_asm_elementwise(_MCG_VALUE, "=h,r", [state], dtype=tl.float16, is_pure=True, pack=1)
    else:  # 3INST
        return tl.inline_asm_elementwise(_THREE_INST_VALUE, "=h,r", [state], dtype=tl.float16, is_pure=True,
                                         pack=1)


@triton.jit
def codebook_decode(state, CB: tl.constexpr, USE_PTX: tl.constexpr):
    """uint32 states in [0, 65536) -> fp16 (exl3-format.md 3.2). CB: 0 3INST, 1 MCG, 2 MUL1."""
    if USE_PTX:
        return _codebook_ptx(state, CB)
    if CB == 2:
        x = state * 0x83DCD12D
        s = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + (x >> 24)
        num = (s.to(tl.int32) + 1024) * 1774 - 2721792  # (1024 + s)*1774 - 1329*2048
        return (num.to(tl.float32) * (1.0 / 262144.0)).to(tl.float16)
    else:
        if CB == 0:
            x = state * 89226354 + 64248484
        else:
            x = state * 0xCBAC1FED
        x = (x & 0x8FFF8FFF) ^ 0x3B603B60
        lo = (x & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        hi = (x >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
        # both halves are normal numbers in +-[0.125, 2): the fp32 sum is exact
        return (lo.to(tl.float32) + hi.to(tl.float32)).to(tl.float16)


# --------------------------------------------------------------------- tiles

@triton.jit
def _lane_geometry(W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr):
    """Per element of the rank-7 block: first word of its lane, and where its window sits.

    Axes: (tile_k, mh, t4, ml, tile_n, h, c0); lane = 4*c0 + t4, q = 4*h + 2*mh + ml.
    Returns ``j0`` (lane's first word, broadcast shape), ``pair_idx`` and ``shift``
    (which word pair holds the window, and the right shift that brings it down).
    """
    mh = tl.arange(0, 2)[None, :, None, None, None, None, None]
    t4 = tl.arange(0, 4)[None, None, :, None, None, None, None]
    ml = tl.arange(0, 2)[None, None, None, :, None, None, None]
    h = tl.arange(0, 2)[None, None, None, None, None, :, None]
    c0 = tl.arange(0, 8)[None, None, None, None, None, None, :]
    return lane_geometry(mh, t4, ml, h, c0, W32, KA, HALF)


@triton.jit
def lane_geometry(mh, t4, ml, h, c0, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr):
    """``_lane_geometry`` for index tensors placed on any axes (a kernel may order the rank-7 axes its own way)."""
    RING: tl.constexpr = W32 * 32
    lane = 4 * c0 + t4
    q = 4 * h + 2 * mh + ml
    if HALF:  # even positions carry KA bits, odd ones KA + 1
        end0 = (8 * lane + 1) * KA + (8 * lane + 1) // 2
        dq = q * KA + (q + 1) // 2
    else:
        end0 = (8 * lane + 1) * KA
        dq = q * KA
    start = (end0 - 16 + RING) % RING  # first window of the lane
    j0 = start // 32
    rel = start % 32 + dq  # window start relative to word j0
    pair_idx = tl.maximum(rel - 48 + 31, 0) // 32
    shift = (48 - (rel - 32 * pair_idx)).to(tl.uint64)
    return j0, pair_idx, shift


@triton.jit
def load_tile_words(t32_ptr, kt0, nt0, TN, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr,
                    NLOAD: tl.constexpr, BTK: tl.constexpr, BTN: tl.constexpr):
    """The (up to 3) 32-bit words each lane of tiles [kt0, +BTK) x [nt0, +BTN) needs, as uint64."""
    j0, pair_idx, shift = _lane_geometry(W32, KA, HALF)
    ti = tl.arange(0, BTK)[:, None, None, None, None, None, None]
    tj = tl.arange(0, BTN)[None, None, None, None, :, None, None]
    tile = ((kt0 + ti) * TN + nt0 + tj) * W32
    w0 = tl.load(t32_ptr + tile + j0).to(tl.uint32).to(tl.uint64)
    w1 = tl.load(t32_ptr + tile + (j0 + 1) % W32).to(tl.uint32).to(tl.uint64)
    if NLOAD >= 3:
        w2 = tl.load(t32_ptr + tile + (j0 + 2) % W32).to(tl.uint32).to(tl.uint64)
    else:
        w2 = w1
    return w0, w1, w2


@triton.jit
def decode_words(w0, w1, w2, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
                 CB: tl.constexpr, USE_PTX: tl.constexpr, BTK: tl.constexpr, BTN: tl.constexpr):
    """Words from ``load_tile_words`` -> fp16 ``W_hat`` block ``[16*BTK, 16*BTN]``."""
    values = decode_words_rank7(w0, w1, w2, W32, KA, HALF, NLOAD, CB, USE_PTX)
    return tl.reshape(values, (16 * BTK, 16 * BTN))


@triton.jit
def decode_words_rank7(w0, w1, w2, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr,
                       NLOAD: tl.constexpr, CB: tl.constexpr, USE_PTX: tl.constexpr):
    """``decode_words`` before the reshape: axes ``(tile_k, mh, t4, ml, tile_n, h, c0)``."""
    j0, pair_idx, shift = _lane_geometry(W32, KA, HALF)
    return codebook_decode(window_states(w0, w1, w2, pair_idx, shift, NLOAD), CB, USE_PTX)


@triton.jit
def window_states(w0, w1, w2, pair_idx, shift, NLOAD: tl.constexpr):
    """Each position's 16-bit trellis state, cut from its lane's words (uint64 holding 32-bit values)."""
    pair = (w0 << 32) | w1
    if NLOAD >= 3:
        pair = tl.where(pair_idx >= 1, (w1 << 32) | w2, pair)
    return ((pair >> shift) & 0xFFFF).to(tl.uint32)


@triton.jit
def load_rows_rank7(src32_ptr, word0, BTK: tl.constexpr):
    """Activations for tile rows ``[kt, kt + BTK)`` in the decode's rank-7 row axes, as fp32
    ``[BTK, 2, 4, 2, 1, 1, 1]`` (row ``16*tile_k + 8*mh + 2*t4 + ml``).

    ``src32_ptr`` views the fp16 activations as int32 and ``word0`` is the int32 index of row
    ``16*kt``: rows ``2i`` and ``2i + 1`` arrive in one 32-bit load, a third fewer load
    instructions in the one-row loop (measured 1-5% faster on large shapes, docs/performance.md)."""
    tk = tl.arange(0, BTK)[:, None, None, None, None, None, None]
    mh = tl.arange(0, 2)[None, :, None, None, None, None, None]
    t4 = tl.arange(0, 4)[None, None, :, None, None, None, None]
    ml = tl.arange(0, 2)[None, None, None, :, None, None, None]
    return unpack_pairs(tl.load(src32_ptr + word0 + 8 * tk + 4 * mh + t4), ml)


@triton.jit
def unpack_pairs(pairs, ml):
    """int32 words holding two fp16 activations -> the fp32 value selected by ``ml`` (0: low half, 1: high)."""
    half = (pairs.to(tl.uint32) >> (16 * ml).to(tl.uint32)) & 0xFFFF
    return half.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def decode_tiles(
    t32_ptr,  # int32 view of the trellis, [TK, TN, W32] contiguous (offset to the right expert)
    kt0, nt0,  # first tile row / column of the block
    TN,  # tiles per row of the trellis
    W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
    CB: tl.constexpr, USE_PTX: tl.constexpr,
    BTK: tl.constexpr, BTN: tl.constexpr,
):
    """Decode tiles [kt0, kt0+BTK) x [nt0, nt0+BTN) -> fp16 ``[16*BTK, 16*BTN]`` (rows = input features)."""
    w0, w1, w2 = load_tile_words(t32_ptr, kt0, nt0, TN, W32, KA, HALF, NLOAD, BTK, BTN)
    return decode_words(w0, w1, w2, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, BTN)


@triton.jit
def sign_matrix(N: tl.constexpr):
    """The unnormalised N x N Sylvester matrix in fp32 (N a power of two <= 128)."""
    return sylvester_signs(tl.arange(0, N)[:, None], tl.arange(0, N)[None, :]).to(tl.float32)


@triton.jit
def sylvester_signs(i, j):
    """Entries ``(-1)^popcount(i & j)`` of the Sylvester matrix at index tensors ``i``, ``j`` (< 128), as int32."""
    v = i & j
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return 1 - 2 * (v & 1)


@triton.jit
def _butterfly(z, BM: tl.constexpr, P: tl.constexpr, Q: tl.constexpr):
    """One radix-2 stage on ``z [BM, P*2*Q]``: pairs (a, b) at distance Q become (a + b, a - b)."""
    s2 = tl.reshape(sign_matrix(2), (1, 1, 2, 2, 1))
    y = tl.sum(tl.reshape(z, (BM, P, 2, 1, Q)) * s2, axis=2)
    return tl.reshape(y, (BM, P * 2 * Q))


@triton.jit
def hadamard_rows(x, BM: tl.constexpr):
    """``x . H128`` (unnormalised) for ``x [BM, 128]`` fp32, fp32-accurate.

    Natural-order Sylvester matrices factor by index bits, H128 = H8 (x) H16 with
    i = 16*i_hi + i_lo: a [BM*8, 16] x [16, 16] product over i_lo, then three
    radix-2 stages over the bits of i_hi. The operands stay tiny, unlike a
    128 x 128 matrix held in registers through the kernel.
    """
    z = tl.reshape(x, (BM * 8, 16))
    if BM * 8 >= 16:
        z = tl.dot(z, sign_matrix(16), input_precision="tf32x3")
    else:
        z = tl.sum(z[:, :, None] * sign_matrix(16)[None, :, :], axis=1)
    z = tl.reshape(z, (BM, 128))
    z = _butterfly(z, BM, 1, 64)
    z = _butterfly(z, BM, 2, 32)
    return _butterfly(z, BM, 4, 16)


# A module-level value used inside kernels must be a constexpr.
HAD_SCALE = tl.constexpr(128 ** -0.5)
