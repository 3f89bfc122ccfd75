"""Few-row EXL3 matmul on tensor cores, with the decoded weights fed to ``mma`` straight from registers (Gluon).

Why a Gluon kernel. The one-row Triton kernel (``triton_gemv.ring_gemv``) is bound by instruction
issue at ~11 thread instructions per weight (docs/performance.md, Nsight section): after the decode
proper (window cut, multiply, ``lop3``) it spends three more on every weight (``HADD2`` of the
codebook's two fp16 halves, the conversion to fp32 and the ``FFMA``). Triton's ``tl.dot`` takes its
operands through shared memory when they are computed in registers, which costs more than it saves.
Gluon states every tensor's layout, so the decoded words can be produced in the exact register
layout of an ``mma.m16n8k16`` A fragment and handed over without moving.

The doubled K. The codebooks (3INST, MCG) make each weight as the sum of the two fp16 halves of one
32-bit word. Instead of adding them, the kernel treats the word as *two* K elements of the A operand
(``lo``, ``hi``) and feeds the activation twice (``x``, ``x``) in the B operand: the tensor core does
the sum, in fp32 and exactly (the reference rounds ``lo + hi`` to fp16 first; the outputs are within
2.0-2.2e-4 of the reference, as the Triton kernels' are). MUL1 words carry the fp16 value in the low
half and zero in the high half.

Which weights a thread holds. An A fragment of ``m16n8k16`` gives thread ``4g + t`` the rows
``g, g + 8`` and the K pairs ``2t, 2t + 8``. With the doubled K that is output features ``g, g + 8``
and real input rows ``t, t + 4``: exactly the positions ``(h, mh)`` of trellis lane ``4 c0 + t4``
for one ``ml`` (exl3-format.md 3.3: position ``q = 4h + 2mh + ml`` of lane ``4c0 + t4`` sits at tile
row ``8mh + 2t4 + ml``, column ``8h + c0``). So each thread loads its own lane's words and decodes
them where they are needed; the mma's K order within a tile is ``kh = 8 ml + 4 mh + t4``, and the
activations are loaded in the same order.

Operands: A = decoded weights ``[16 * tiles, 32 * BTK]`` (output features x doubled K), B = the
activations ``[32 * BTK, BN]`` (doubled K x up to BN = 8 rows, or 16 for 9-16 rows), accumulator
``[16 * tiles, BN]`` fp32. Rows 2-8 cost little more than one.

The main loop's instruction budget (compiled for sm_90, 4 bits: ~290 SASS instructions for 64 weights a thread, ~4.5
per weight; docs/performance.md, eighth session). Two of them per weight are the codebook (multiply, ``lop3``) and
one the window cut: for 2 and 4 bits the windows sit at constant offsets per register, so each is one byte permute or
mask, from the words or a copy shifted by 2-6 bits shared by several positions (``_states_4bit``, ``_states_2bit``).
Each word load is a loop-invariant pointer plus an immediate (``_lane_words``), and the loop runs two steps an
iteration so that the prefetched registers alternate instead of being copied back.

This module is only used on CUDA, with a Triton that has Gluon (3.5 and newer; Gluon has no
interpreter): ``kernels.dispatch.mma_ready`` checks it against the reference on first use on each
device and otherwise keeps the Triton kernels. On a CPU, tests compile it for sm_90.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .launch import FastLauncher
from .triton_decode import MCG_PTX, MUL1_PTX, THREE_INST_PTX, lane_geometry, window_states

# --------------------------------------------------------------------- layouts (host side, passed as constexprs)

def decode_layout(num_warps: int) -> gl.BlockedLayout:
    """The decode block's axes ``(tile column, h, c0, tile row, ml, mh, t4)``: lane ``4 c0 + t4``, warps own tile
    columns, the rest in registers."""
    return gl.BlockedLayout(size_per_thread=[1] * 7, threads_per_warp=[1, 1, 8, 1, 1, 1, 4],
                            warps_per_cta=[num_warps, 1, 1, 1, 1, 1, 1], order=[6, 2, 5, 4, 1, 3, 0])


def rows_layout(num_warps: int) -> gl.BlockedLayout:
    """Activation pairs ``[1, tile row, mh, t4, row]`` (int32: features ``ml = 0, 1``): lanes over (t4, row),
    every warp a full copy."""
    return gl.BlockedLayout(size_per_thread=[1] * 5, threads_per_warp=[1, 1, 1, 4, 8],
                            warps_per_cta=[num_warps, 1, 1, 1, 1], order=[3, 4, 2, 1, 0])


def chunk_layouts(num_warps: int):
    """Two layouts of a ``[rows, 8, 16]`` block of 128-feature chunks for the Hadamard butterflies: the 16 low
    index bits in registers, then the 8 high ones."""
    low = gl.BlockedLayout(size_per_thread=[1, 1, 16], threads_per_warp=[4, 8, 1], warps_per_cta=[num_warps, 1, 1],
                           order=[2, 1, 0])
    high = gl.BlockedLayout(size_per_thread=[1, 8, 2], threads_per_warp=[4, 1, 8], warps_per_cta=[num_warps, 1, 1],
                            order=[1, 2, 0])
    return low, high


def mma_layout(num_warps: int) -> gl.NVMMADistributedLayout:
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])


@triton.constexpr_function
def slice_chain(layout, rank, axis):
    """The 1-D layout whose ``arange``, expanded on every other axis in increasing order, lands on ``axis``."""
    out = layout
    rank, axis = int(rank), int(axis)
    for d in reversed(range(rank)):
        if d != axis:
            out = gl.SliceLayout(d, out)
    return out


# --------------------------------------------------------------------- jit helpers

@gluon.jit
def _axis_index(N: gl.constexpr, AXIS: gl.constexpr, RANK: gl.constexpr, L: gl.constexpr):
    """``arange(N)`` on axis ``AXIS`` of a rank-``RANK`` tensor in layout ``L`` (size 1 on the other axes)."""
    v = gl.arange(0, N, layout=slice_chain(L, RANK, AXIS))
    for d in gl.static_range(RANK):
        if d != AXIS:
            v = gl.expand_dims(v, d)
    return v


_MUL1_WORD = gl.constexpr("{" + MUL1_PTX + "\n            mov.b16 h, 0;\n            mov.b32 $0, {v, h};\n            }")
_MCG_WORD = gl.constexpr("{" + MCG_PTX + "\n            mov.b32 $0, x;\n            }")
_THREE_INST_WORD = gl.constexpr("{" + THREE_INST_PTX + "\n            mov.b32 $0, x;\n            }")


@gluon.jit
def _codebook_words(state, CB: gl.constexpr):
    """uint32 states -> the 32-bit codebook word whose fp16 halves sum to the weight (MUL1: value, 0)."""
    if CB == 2:
        return gl.inline_asm_elementwise(_MUL1_WORD, "=r,r", [state], dtype=gl.int32, is_pure=True, pack=1)
    elif CB == 1:
        return gl.inline_asm_elementwise(_MCG_WORD, "=r,r", [state], dtype=gl.int32, is_pure=True, pack=1)
    else:
        return gl.inline_asm_elementwise(_THREE_INST_WORD, "=r,r", [state], dtype=gl.int32, is_pure=True, pack=1)


_SHR2 = gl.constexpr("shr.b32 $0, $1, 2;")
_SHR4 = gl.constexpr("shr.b32 $0, $1, 4;")
_SHR6 = gl.constexpr("shr.b32 $0, $1, 6;")
_SHR16 = gl.constexpr("shr.b32 $0, $1, 16;")


@gluon.jit
def _shr(x, SHR: gl.constexpr):
    """``x >> n`` in asm, opaque to the compiler, which would otherwise merge it with a later byte shift into a shift
    and a mask (two instructions where a byte permute takes one). The same as a high multiply by ``2^(32-n)``, which
    would run on the FMA pipe instead of the busier logic pipe, measured 0.5-2 us slower at 8192x8192."""
    return gl.inline_asm_elementwise(SHR, "=r,r", [x], dtype=gl.uint32, is_pure=True, pack=1)


@gluon.jit
def _states_4bit(w0, w1, q):
    """The 16-bit states of a 4-bit lane (words ``j0, j0 + 1``): position ``q``'s window sits ``28 - 4 q`` bits above
    the low end of ``w0:w1``. Windows 16 and up are cut from ``mid = w0:w1 >> 16``, the others from ``w1``; each takes
    one instruction, plus a shift by 4 shared by two positions (``window_states``' 64-bit shift and mask take two)."""
    w0 = w0.to(gl.uint32)
    w1 = w1.to(gl.uint32)
    hi16 = _shr(w1, _SHR16)
    mid = (w0 << 16) | hi16  # one funnel shift
    n = 28 - 4 * q  # constant per register, so every select below folds
    src = gl.where(n >= 20, mid, w1)
    n = gl.where(n >= 20, n - 16, n)
    base = gl.where(n % 8 == 4, _shr(src, _SHR4), src)
    return gl.where(q == 3, hi16, (base >> (n - n % 8).to(gl.uint32)) & 0xFFFF)


@gluon.jit
def _states_2bit(w0, w1, q, odd_lane):
    """The 16-bit states of a 2-bit lane: position ``q``'s window sits ``30 - 2 q`` bits above the low end of
    ``w0:w1`` on even lanes and 16 bits higher on odd ones. One funnel shift per word makes that ``14 - 2 q`` bits
    above the low end of ``L`` on every lane, then each window is one instruction, from ``L`` or a copy of it shifted
    by 2, 4 or 6 (``window_states`` takes a 64-bit shift by a per-lane amount and a mask)."""
    w0 = w0.to(gl.uint32)
    w1 = w1.to(gl.uint32)
    lane_bits = gl.inline_asm_elementwise("shf.r.clamp.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                          [w1, w0, 16 + 16 * odd_lane.to(gl.uint32)], dtype=gl.uint32, is_pure=True,
                                          pack=1)
    n = 14 - 2 * q
    res = n % 8
    base = gl.where(res == 0, lane_bits,
                    gl.where(res == 2, _shr(lane_bits, _SHR2),
                             gl.where(res == 4, _shr(lane_bits, _SHR4), _shr(lane_bits, _SHR6))))
    return (base >> (n - res).to(gl.uint32)) & 0xFFFF


@gluon.jit
def _weights_operand(w0, w1, w2, pair_idx, shift, q, odd_lane, NLOAD: gl.constexpr, KA: gl.constexpr,
                     HALF: gl.constexpr, CB: gl.constexpr, A_LAYOUT: gl.constexpr, M: gl.constexpr, KD: gl.constexpr):
    """Words (rank 7, broadcast over h, ml, mh) -> the fp16 A operand ``[M, KD]`` in ``A_LAYOUT`` (no data moves)."""
    if KA == 4 and not HALF:
        state = _states_4bit(w0, w1, q)
    elif KA == 2 and not HALF:
        state = _states_2bit(w0, w1, q, odd_lane)
    else:
        state = window_states(w0.to(gl.uint32).to(gl.uint64), w1.to(gl.uint32).to(gl.uint64),
                              w2.to(gl.uint32).to(gl.uint64), pair_idx, shift, NLOAD)
    word = _codebook_words(state, CB)
    lo = (word & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True)
    hi = (word >> 16).to(gl.int16).to(gl.float16, bitcast=True)
    a = gl.reshape(gl.join(lo, hi), [M, KD])
    return gl.convert_layout(a, A_LAYOUT, assert_trivial=True)


@gluon.jit
def _lane_words(words_ptr, off0, off1, off2, NLOAD: gl.constexpr):
    """Each lane's words ``j0, j0 + 1 (, j0 + 2)`` of the step's tiles (``w2 is w1`` when ``NLOAD == 2``). The
    offsets are loop-invariant int64 tensors whose per-register parts are constants, so each load is the step's
    pointer plus an immediate (``triton_gemv.lane_words``' int32 sums cost ~60 address instructions a step here)."""
    w0 = gl.load(words_ptr + off0)
    w1 = gl.load(words_ptr + off1)
    if NLOAD >= 3:
        w2 = gl.load(words_ptr + off2)
    else:
        w2 = w1
    return w0, w1, w2


@gluon.jit
def _step(w0, w1, w2, xw, acc, pair_idx, shift, q, odd_lane, NLOAD: gl.constexpr, KA: gl.constexpr,
          HALF: gl.constexpr, CB: gl.constexpr, A_LAYOUT: gl.constexpr, B_LAYOUT: gl.constexpr, M: gl.constexpr,
          KD: gl.constexpr, BN: gl.constexpr):
    """One step: decode the words into the A operand and accumulate its product with the activations."""
    a = _weights_operand(w0, w1, w2, pair_idx, shift, q, odd_lane, NLOAD, KA, HALF, CB, A_LAYOUT, M, KD)
    return mma_v2(a, _rows_operand(xw, B_LAYOUT, KD, BN), acc)


@gluon.jit
def _rows_operand(x, B_LAYOUT: gl.constexpr, KD: gl.constexpr, BN: gl.constexpr):
    """Activation pairs (rank 5 ``[1, tk, mh, t4, row]``, int32 = features ``ml = 0, 1``) -> the fp16 B operand
    ``[KD, BN]`` with K order ``(tk, ml, mh, t4, copy)``: each value twice (the doubled K)."""
    lo = (x & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True)
    hi = (x >> 16).to(gl.int16).to(gl.float16, bitcast=True)
    v = gl.join(lo, hi)  # [1, tk, mh, t4, row, ml]
    v = gl.join(v, v)  # [1, tk, mh, t4, row, ml, copy]
    b = gl.reshape(gl.permute(v, [0, 1, 5, 2, 3, 6, 4]), [KD, BN])
    return gl.convert_layout(b, B_LAYOUT, assert_trivial=True)


_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier  # renamed in Triton 3.7


@gluon.jit
def _stage(z, A: gl.constexpr, N: gl.constexpr, D: gl.constexpr):
    """One radix-2 stage over the last axis of ``z [A, N]``: the pair ``(a, b)`` at distance ``D`` -> ``(a + b, a - b)``."""
    z4 = gl.permute(gl.reshape(z, [A, N // (2 * D), 2, D]), [0, 1, 3, 2])
    a, b = gl.split(z4)
    return gl.reshape(gl.permute(gl.join(a + b, a - b), [0, 1, 3, 2]), [A, N])


@gluon.jit
def _butterflies(z, A: gl.constexpr, N: gl.constexpr):
    """Unnormalised Walsh-Hadamard transform over the last axis of ``z [A, N]`` (N = 8 or 16, in registers)."""
    z = _stage(z, A, N, 1)
    z = _stage(z, A, N, 2)
    z = _stage(z, A, N, 4)
    if N == 16:
        z = _stage(z, A, N, 8)
    return z


@gluon.jit
def _hadamard128(z, RP: gl.constexpr, LOW: gl.constexpr, HIGH: gl.constexpr):
    """``z [RP, 8, 16]`` fp32 in ``LOW`` -> ``z . H128`` (unnormalised, fp32) in ``HIGH``, index ``16 hi + lo``:
    H128 = H8 (x) H16, the 16 stages in registers, one layout change, the 8 stages in registers."""
    z = gl.reshape(_butterflies(gl.reshape(z, [RP * 8, 16]), RP * 8, 16), [RP, 8, 16])
    z = gl.permute(gl.convert_layout(z, HIGH), [0, 2, 1])
    z = gl.reshape(_butterflies(gl.reshape(z, [RP * 16, 8]), RP * 16, 8), [RP, 16, 8])
    # the same placement as HIGH (Triton 3.7+ infers it as an equivalent linear layout, which broadcasts refuse)
    return gl.convert_layout(gl.permute(z, [0, 2, 1]), HIGH)


@gluon.jit
def _runs(offsets, RUN: gl.constexpr):
    """Tell the compiler that ``offsets`` (a ``[rows, 8, 16]`` chunk index) runs in aligned groups of ``RUN`` along
    the last axis, so each thread's loads and stores become vector accesses."""
    return gl.max_contiguous(gl.multiple_of(offsets, [1, 1, RUN]), [1, 1, RUN])


@gluon.jit
def _chunk_index(RP: gl.constexpr, L: gl.constexpr):
    """Row and feature (``16 hi + lo``) index tensors of a ``[RP, 8, 16]`` block in layout ``L``."""
    r = gl.arange(0, RP, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))[:, None, None]
    hi = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))[None, :, None]
    lo = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))[None, None, :]
    return r, 16 * hi + lo


@gluon.jit
def _partials(ws_ptr, s0, pq, ff, rows, N, col0, SPLIT_K: gl.constexpr, RP: gl.constexpr, SPG: gl.constexpr,
              BN: gl.constexpr):
    """Splits ``[s0, s0 + SPG)`` of the workspace's partials for rows ``< RP``, summed -> ``[RP, 8, 16]``: the
    ``(row, split)`` pairs ``pq`` (row-major) are the first axis of one ``[RP * SPG, 8, 16]`` load."""
    sp = s0 + pq % SPG
    part = gl.load(ws_ptr + _runs((sp * BN + pq // SPG) * N + col0 + ff, 16),
                   mask=(pq // SPG < rows) & (sp < SPLIT_K), other=0.0, cache_modifier=".cg")
    return gl.sum(gl.reshape(part, [RP, SPG, 8, 16]), axis=1)


@gluon.jit
def _mma_gemm_kernel(
    x_ptr, scratch_ptr, t32_ptr, suh_ptr, svh_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, group_ptr,
    rows, N, K, TN, k_tiles_per_split, stride_x, stride_y, x_group_stride,
    W32: gl.constexpr, KA: gl.constexpr, HALF: gl.constexpr, NLOAD: gl.constexpr, CB: gl.constexpr,
    BTK: gl.constexpr, TPW: gl.constexpr, NW: gl.constexpr, RP: gl.constexpr, BN: gl.constexpr, NCH: gl.constexpr,
    SPLIT_K: gl.constexpr, FINISH_PAIRS: gl.constexpr,
    HAS_BIAS: gl.constexpr, GROUPED: gl.constexpr, PREROTATED: gl.constexpr,
    L7: gl.constexpr, L5: gl.constexpr, MMA: gl.constexpr, LOW: gl.constexpr, HIGH: gl.constexpr,
):
    """``y = H(H(x * suh) @ W_hat) * svh + bias`` for up to BN (8 or 16) rows: program (column block of
    16 * NW * TPW = 128, K slice) rotates its slice of x into private scratch (up to 8 rows), accumulates on tensor
    cores, writes its partial to the
    workspace; the last program of a column block (split-K counter) adds the partials in a fixed order, rotates,
    scales and stores (as ``triton_gemm._exl3_gemm_kernel``)."""
    pid_n = gl.program_id(0)
    pid_s = gl.program_id(1)
    TILES: gl.constexpr = NW * TPW
    M: gl.constexpr = 16 * TILES
    KD: gl.constexpr = 32 * BTK
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    if GROUPED and not PREROTATED:  # concatenated linears: this column block's member rotates x with its suh
        suh_ptr += gl.load(group_ptr + pid_n) * K
    kt0 = pid_s * k_tiles_per_split
    nt0 = pid_n * TILES

    # decode geometry (exl3-format.md 3.3), once: lane = 4 c0 + t4, q = 4 h + 2 mh + ml
    tn = _axis_index(TILES, 0, 7, L7)
    h = _axis_index(2, 1, 7, L7)
    c0 = _axis_index(8, 2, 7, L7)
    tk = _axis_index(BTK, 3, 7, L7)
    ml = _axis_index(2, 4, 7, L7)
    mh = _axis_index(2, 5, 7, L7)
    t4 = _axis_index(4, 6, 7, L7)
    j0, pair_idx, shift = lane_geometry(mh, t4, ml, h, c0, W32, KA, HALF)
    q = 4 * h + 2 * mh + ml  # the position within the lane
    odd_lane = t4 % 2
    words_ptr = t32_ptr + (kt0 * TN + nt0) * W32  # step 0's first tile; step s's is s * step_words further
    step_words = BTK * TN * W32
    # 64-bit offsets from the index tensors: the per-register parts stay constants the compiler folds into
    # the loads' immediates
    tile_rel = tk.to(gl.int64) * (TN * W32) + tn.to(gl.int64) * W32
    j1 = (j0 + 1) % W32
    off0 = tile_rel + j0.to(gl.int64)
    off1 = tile_rel + j1.to(gl.int64)
    if NLOAD >= 3:
        off2 = tile_rel + ((j0 + 2) % W32).to(gl.int64)
    else:
        off2 = off1
    w0, w1, w2 = _lane_words(words_ptr, off0, off1, off2, NLOAD)  # in flight during the rotation

    k_len = 16 * k_tiles_per_split
    if PREROTATED:  # x holds rotated activations (a separate launch; concatenated linears: member after member)
        if GROUPED:
            x_ptr += gl.load(group_ptr + pid_n) * x_group_stride
        x32_ptr = (x_ptr + 16 * kt0).to(gl.pointer_type(gl.int32), bitcast=True)
        row_words = stride_x // 2
    else:
        # this program's rows of x, features [16 kt0, + k_len), rotated into private scratch [8 rows, k_len]: the
        # slice's 128-feature chunks of every row as the rows of [8, 8, 16] blocks (spread over the threads instead of
        # a serial loop over chunks)
        scratch = scratch_ptr + (pid_n * SPLIT_K + pid_s) * (8 * k_len)
        GRP: gl.constexpr = 8 if RP * NCH > 8 else RP * NCH  # (row, chunk) pairs per pass: 16 values a thread
        lq, cf = _chunk_index(GRP, LOW)
        hlq, hf = _chunk_index(GRP, HIGH)
        for g0 in range(0, RP * NCH, GRP):
            cq = g0 + lq
            cr = cq // NCH
            cmask = (cr < rows) & ((cq % NCH) * 128 < k_len)
            f = _runs(16 * kt0 + (cq % NCH) * 128 + cf, 16)
            xv = gl.load(x_ptr + _runs(cr * stride_x + f, 16), mask=cmask, other=0.0).to(gl.float32)
            xs = (xv * gl.load(suh_ptr + f, mask=cmask, other=0.0).to(gl.float32)).to(gl.float16).to(gl.float32)
            xh = (_hadamard128(xs, GRP, LOW, HIGH) * 0.08838834764831845).to(gl.float16)
            hq = g0 + hlq
            gl.store(scratch + _runs((hq // NCH) * k_len + (hq % NCH) * 128 + hf, 2), xh,
                     mask=(hq // NCH < rows) & ((hq % NCH) * 128 < k_len))
        _barrier()  # the main loop reads what the program's other threads wrote
        x32_ptr = scratch.to(gl.pointer_type(gl.int32), bitcast=True)
        row_words = k_len // 2

    # activation pairs: row r (< rows), features 16 s + 8 mh + 2 t4 + (0, 1) of the slice, as int32
    xtk = _axis_index(BTK, 1, 5, L5)
    xmh = _axis_index(2, 2, 5, L5)
    xt4 = _axis_index(4, 3, 5, L5)
    xr = _axis_index(BN, 4, 5, L5)
    # rows past ``rows`` read row ``rows - 1`` again: B's columns are independent, and theirs are never stored
    xoff = gl.minimum(xr, rows - 1) * row_words + 8 * xtk + 4 * xmh + xt4

    acc = gl.zeros([M, BN], gl.float32, MMA)
    steps = k_tiles_per_split // BTK
    xw = gl.load(x32_ptr + xoff)
    # Two steps per iteration, each loading the other's next words and activations while it decodes (the
    # activations come from the scratch this program just wrote, so from L2: an unhidden load per step cost ~30% on
    # 8192x8192). Alternating the two register sets saves the ~20 moves a step that carrying one set back costs.
    for s in range((steps - 1) // 2):
        wp = words_ptr + (2 * s + 1) * step_words
        xp = x32_ptr + (2 * s + 1) * (8 * BTK)
        n0, n1, n2 = _lane_words(wp, off0, off1, off2, NLOAD)
        nx = gl.load(xp + xoff)
        acc = _step(w0, w1, w2, xw, acc, pair_idx, shift, q, odd_lane, NLOAD, KA, HALF, CB, A_LAYOUT, B_LAYOUT,
                    M, KD, BN)
        w0, w1, w2 = _lane_words(wp + step_words, off0, off1, off2, NLOAD)
        xw = gl.load(xp + 8 * BTK + xoff)
        acc = _step(n0, n1, n2, nx, acc, pair_idx, shift, q, odd_lane, NLOAD, KA, HALF, CB, A_LAYOUT, B_LAYOUT,
                    M, KD, BN)
    if steps % 2 == 0:  # an odd number of steps was left after the first: one more with its prefetch
        n0, n1, n2 = _lane_words(words_ptr + (steps - 1) * step_words, off0, off1, off2, NLOAD)
        nx = gl.load(x32_ptr + (steps - 1) * (8 * BTK) + xoff)
        acc = _step(w0, w1, w2, xw, acc, pair_idx, shift, q, odd_lane, NLOAD, KA, HALF, CB, A_LAYOUT, B_LAYOUT,
                    M, KD, BN)
        w0, w1, w2, xw = n0, n1, n2, nx
    acc = _step(w0, w1, w2, xw, acc, pair_idx, shift, q, odd_lane, NLOAD, KA, HALF, CB, A_LAYOUT, B_LAYOUT, M, KD,
                BN)

    # partial -> workspace [split, 8, N]; the last program of the column block finishes
    m = gl.arange(0, M, layout=gl.SliceLayout(1, MMA))[:, None]
    r = gl.arange(0, BN, layout=gl.SliceLayout(0, MMA))[None, :]
    gl.store(ws_ptr + (pid_s * BN + r) * N + pid_n * M + m, acc, mask=(r < rows) & (m >= 0))
    _barrier()
    if SPLIT_K == 1:
        finish = True
    else:
        finish = gl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1
    if finish:
        # the partials in rounds of FINISH_PAIRS (row, split) pairs: the layout's spare lanes and warps each load one,
        # so a round costs one L2 latency and 2 * FINISH_PAIRS registers a thread (a serial sum over the splits was
        # ~2 us per 4)
        SPG: gl.constexpr = max(FINISH_PAIRS // RP, 2)  # splits per round (masked past SPLIT_K)
        pq, ff = _chunk_index(RP * SPG, LOW)
        fhr, fhf = _chunk_index(RP, HIGH)
        total = _partials(ws_ptr, 0, pq, ff, rows, N, pid_n * M, SPLIT_K, RP, SPG, BN)
        for s0 in range(SPG, SPLIT_K, SPG):
            total += _partials(ws_ptr, s0, pq, ff, rows, N, pid_n * M, SPLIT_K, RP, SPG, BN)
        total = gl.convert_layout(total, LOW)
        col = _runs(pid_n * M + fhf, 2)
        out = _hadamard128(total, RP, LOW, HIGH) * 0.08838834764831845 * gl.load(svh_ptr + col).to(gl.float32)
        if HAS_BIAS:
            out += gl.load(bias_ptr + col).to(gl.float32)
        gl.store(y_ptr + _runs(fhr * stride_y + col, 2), out.to(y_ptr.dtype.element_ty), mask=fhr < rows)
        if SPLIT_K > 1:
            gl.atomic_xchg(lock_ptr + pid_n, 0)


@functools.lru_cache(maxsize=None)
def layouts(num_warps: int):
    return (decode_layout(num_warps), rows_layout(num_warps), mma_layout(num_warps)) + chunk_layouts(num_warps)


# ------------------------------------------------------------------ launch

_launch = FastLauncher(_mma_gemm_kernel)

# The schedule (bench/gluon_gemv.py on the H100, 2026-11-23): 2 warps of 4 tile columns each (one 128-column
# Hadamard block per program), 2 tile rows per step; K split for ~7 programs per SM (the split sweep's best
# for 8192x8192, 21504x5376 and 4096x14336).
TILES_PER_WARP = 4
NUM_WARPS = 2
BTK = 2
PROGRAMS_PER_SM = 7
# More K slices make the finishing program's sum of partials longer than they save (sweep, one row:
# 8192x8192 64 slices 44.8 us against 37.1 at 32; 21504x5376 42 slices 57.7-58.4 against 56.3 at 24).
MAX_SPLIT = 32
MAX_ROWS = 16
# (row, split) partials the finishing program sums per round, one L2 latency each: 16 takes the 16 splits of one row
# of 8192x8192 in one round (8: two).
FINISH_PAIRS = 16
# A register cap for ptxas for the 2- and 4-bit formats, which it otherwise keeps at 72-80 registers with a small spill
# (Triton 3.9). With ~7 programs per SM launched, 96 registers (room for 10) cost no occupancy, and the cap is faster
# (bench/gluon_variants.py, H100, eight rows: 8192x8192 33.2 against 35.5 us uncapped, 5376x21504 43.6 against 48.7;
# one row equal or better). The other formats need more than 96 and keep ptxas's own choice.
MAXNREG = 96


def register_cap(fmt: dict, bn: int = 8) -> int | None:
    """The launch's ``maxnreg`` for a format's constexprs (``launch_constants(w)["fmt"]``) and B width ``bn``; 0 or
    None: no cap. 16 rows hold twice the accumulator: 40 registers more (32 spilled 8 bytes for 2-bit 3INST
    concatenated linears under Triton 3.6)."""
    if not MAXNREG or fmt["KA"] not in (2, 4) or fmt["HALF"]:
        return None
    return MAXNREG if bn <= 8 else MAXNREG + 40
# Up to this many rows each program rotates its K slice of x itself (one launch); more rows rotate in a separate
# launch first. 8192x8192, 8 rows: 45.9 us in the kernel, 41.6 with the separate launch (bench/gluon_gemv.py).
ROTATE_IN_KERNEL_MAX_ROWS = 4


def exl3_gemm_mma(x: torch.Tensor, w, out: torch.Tensor | None = None, split_k: int | None = None,
                  rotate_in_kernel: bool | None = None, x_rotated: bool = False) -> torch.Tensor:
    """``x [rows <= 16, in] -> [rows, out]`` on tensor cores (CUDA; dims multiples of 128). The B operand is 8 rows
    wide up to 8 rows and 16 past that; 9-16 rows always rotate x in a separate launch.

    ``rotate_in_kernel``: each program rotates its rows' K slice of x itself (one launch); False rotates x in a
    separate launch first (``triton_hadamard``), which the kernel then reads directly; ``x_rotated``: x is that
    launch's output already (benchmarks time the kernel alone this way)."""
    from .triton_gemm import choose_split_k, device_buffers, launch_constants, next_power_of_2, rotated_input, sm_count

    rows, k = x.shape
    n, out_dtype = w.out_features, x.dtype
    if rows > MAX_ROWS or k % 128 or n % 128 or k != w.in_features:
        raise ValueError(f"{w.key or 'EXL3 linear'}: the tensor-core few-row kernel takes up to {MAX_ROWS} rows "
                         f"and dims divisible by 128, got x {tuple(x.shape)} for a [{w.in_features}, {n}] weight")
    if x.stride(1) != 1 or x.stride(0) % 16 or x.data_ptr() % 32:
        x = x.contiguous()  # the kernel reads 16-feature runs as aligned vectors (``_runs``)
    consts = launch_constants(w)
    grouped = w.out_splits is not None
    x_group_stride = 0
    bn = 8 if rows <= 8 else 16
    if bn > 8:  # the in-kernel scratch holds 8 rows
        rotate_in_kernel = False
    elif rotate_in_kernel is None:
        rotate_in_kernel = rows <= ROTATE_IN_KERNEL_MAX_ROWS
    if x_rotated:
        rotate_in_kernel = False
    elif not rotate_in_kernel:
        x, x_group_stride = rotated_input(x, w)
    nb = n // 128
    split = choose_split_k(k // 128, nb, sm_count(x.device), split_k, per_sm=PROGRAMS_PER_SM,
                           auto_most=MAX_SPLIT)
    locks, _ = device_buffers(x.device)
    ws = torch.empty((split, bn, n), dtype=torch.float32, device=x.device)
    scratch = torch.empty(nb * 8 * k if rotate_in_kernel else 8, dtype=torch.float16, device=x.device)
    aligned_out = out is not None and out.is_contiguous() and out.data_ptr() % 4 == 0  # pairs stored as one word
    y = out.view(rows, n) if aligned_out else torch.empty((rows, n), dtype=out_dtype, device=x.device)
    l7, l5, mma, low, high = layouts(NUM_WARPS)
    _launch(
        (nb, split), x, scratch, consts["t32"], w.suh, w.svh, w.bias if w.bias is not None else w.svh, y, ws, locks,
        consts["groups"] if grouped else locks,
        rows, n, k, n // 16, k // 16 // split, x.stride(0), y.stride(0), x_group_stride,
        BTK=BTK, TPW=TILES_PER_WARP, NW=NUM_WARPS, RP=next_power_of_2(rows), BN=bn,
        NCH=next_power_of_2(k // 128 // split), SPLIT_K=split, FINISH_PAIRS=FINISH_PAIRS,
        HAS_BIAS=w.bias is not None, GROUPED=grouped, PREROTATED=not rotate_in_kernel,
        L7=l7, L5=l5, MMA=mma, LOW=low, HIGH=high, num_warps=NUM_WARPS, num_stages=1,
        maxnreg=register_cap(consts["fmt"], bn), **consts["fmt"])
    if out is not None and not aligned_out:
        out.view(rows, n).copy_(y)
        return out.view(rows, n)
    return y
