"""Triton tile encoder: the tail-biting Viterbi of the EXL3 converter, one program per 16x16 tile.

The PyTorch encoder (``exl3_triton.convert.tile_encoder``) is the reference and
the CPU path; this kernel does the same search on the GPU without ever
materialising the 65536 path costs of a position.

What a step keeps. With ``D(p)`` fresh bits at position ``p``, every path
cost at ``p`` is ``cost_p[s] = EC_p[s >> D(p)] + (v(s) - x_p)^2``: an *edge
cost* (the best path into the 16 - D(p) bits that ``s`` shares with its
predecessor) plus the error of ``s``'s own codebook value. So a program carries
only ``EC_p`` (4096 floats at 4 bits) from step to step, in a per-program
scratch row that stays in L1/L2, and computes ``v(s)`` from ``s`` on the fly.

One step ``p -> p + 1`` with ``DN = D(p + 1)``: split the state as
``s = [a: DN bits][b: 16 - D - DN bits][c: D bits]``. Then ``s >> D = [a][b]``
indexes ``EC_p`` and ``s``'s edge into ``p + 1`` is ``[b][c]``, so

    EC_{p+1}[b, c] = min_a ( EC_p[a, b] + (v(a, b, c) - x_p)^2 ),   bp_{p+1}[b, c] = argmin a

blocks of ``(b, c)`` outputs, each thread looping over ``a`` for its own outputs
(``EC_p[a, b]`` loaded once for all ``c``). The argmin rides in the low ``DN``
mantissa bits of the (non-negative) cost, one integer min giving both -- the
same trick, and the same tie-breaking (smallest ``a``), as the reference.

Both passes of the reference are kept (start half-way round and read off the
edge at position 0; then run from 0 with that edge forced at both ends), and
both trace back through the byte back-pointers in the program's own rows of a
``[tiles, 256, edges]`` buffer: ~1 MB per tile at 4 bits, which is why the
caller batches tiles (``tiles_per_launch``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_decode import codebook_decode

# Path costs of states excluded by the forced edge (pass 2): large, finite and positive,
# so that adding errors never makes NaNs and the integer min still orders them last.
_FORBIDDEN = tl.constexpr(1.0e30)


@triton.jit
def _viterbi_step(ec_in, ec_out, bp_row, x, D: tl.constexpr, DN: tl.constexpr,
                  BC: tl.constexpr, CC: tl.constexpr, CB: tl.constexpr, USE_PTX: tl.constexpr,
                  VECTOR_A: tl.constexpr):
    """``EC_p`` (at ``ec_in``) and target ``x = x_p`` -> ``EC_{p+1}`` (at ``ec_out``) and ``bp_{p+1}``.

    Work goes out in blocks of ``BC x CC`` outputs ``(b, c)``. On the GPU each
    thread keeps the running minimum of its outputs over a loop on ``a``, so the
    reduction never leaves the thread (a cross-thread ``tl.min`` over ``a`` went
    through shared memory), and loads ``EC_p[a, b]`` once for all its ``c``.
    ``VECTOR_A`` computes the whole ``[A, BC, CC]`` block and reduces it at once:
    the same result in a few operations, for the interpreter, where every
    operation is a Python call.
    """
    A: tl.constexpr = 1 << DN
    B: tl.constexpr = 1 << (16 - D - DN)
    C: tl.constexpr = 1 << D
    for b0 in range(0, B, BC):
        b = b0 + tl.arange(0, BC)[:, None]
        for c0 in range(0, C, CC):
            o = (b << D) | (c0 + tl.arange(0, CC)[None, :])  # [BC, CC]: output edge = low bits of s
            if VECTOR_A:
                a = tl.arange(0, A)[:, None, None]
                ec = tl.load(ec_in + (a << (16 - D - DN)) + b[None, :, :])  # [A, BC, 1]
                v = codebook_decode((o[None, :, :] | (a << (16 - DN))).to(tl.uint32), CB, USE_PTX).to(tl.float32)
                cost = ec + (v - x) * (v - x)
                best = tl.min((cost.to(tl.int32, bitcast=True) & (-A)) | a, axis=0)
            else:
                best = tl.full((BC, CC), 0x7FFFFFFF, tl.int32)
                for a in range(A):
                    ec = tl.load(ec_in + (a << (16 - D - DN)) + b)  # [BC, 1]
                    v = codebook_decode((o | (a << (16 - DN))).to(tl.uint32), CB, USE_PTX).to(tl.float32)
                    cost = ec + (v - x) * (v - x)
                    # the argmin rides in the low DN bits of the (non-negative) cost: one integer min
                    best = tl.minimum(best, (cost.to(tl.int32, bitcast=True) & (-A)) | a)
            tl.store(ec_out + o, best.to(tl.float32, bitcast=True))
            tl.store(bp_row + o, (best & (A - 1)).to(tl.uint8))
    tl.debug_barrier()  # the next step reads what other threads of the program wrote


@triton.jit
def _fill_edges(ec, forced_edge, count, CH: tl.constexpr):
    """``ec[:count] = 0`` if ``forced_edge < 0``, else 0 at ``forced_edge`` and forbidden elsewhere."""
    for e0 in range(0, count, CH):
        e = e0 + tl.arange(0, CH)
        value = tl.where((forced_edge < 0) | (e == forced_edge), 0.0, _FORBIDDEN)
        tl.store(ec + e, value, mask=e < count)
    tl.debug_barrier()


@triton.jit
def _fresh(p, KA: tl.constexpr, HALF: tl.constexpr):
    """``D(p)``: half-integer rates give odd positions one bit more."""
    if HALF:
        return KA + (p & 1)
    else:
        return KA + p * 0


@triton.jit
def _run(ec0, ec1, bp, tgt, start, KA: tl.constexpr, KB: tl.constexpr,
         BC0: tl.constexpr, CC0: tl.constexpr, BC1: tl.constexpr, CC1: tl.constexpr,
         E: tl.constexpr, CB: tl.constexpr, USE_PTX: tl.constexpr, VECTOR_A: tl.constexpr):
    """255 steps from even position ``start`` (mod 256); the last edge costs end in ``ec1``.

    ``KA``/``KB``: fresh bits at even/odd positions. Steps alternate even->odd
    (ec0 -> ec1) and odd->even (ec1 -> ec0): 127 pairs, then one even->odd step.
    """
    for i in range(127):
        p = (start + 2 * i) % 256
        _viterbi_step(ec0, ec1, bp + (p + 1) * E, tl.load(tgt + p), KA, KB, BC0, CC0, CB, USE_PTX, VECTOR_A)
        _viterbi_step(ec1, ec0, bp + ((p + 2) % 256) * E, tl.load(tgt + p + 1), KB, KA, BC1, CC1, CB, USE_PTX, VECTOR_A)
    p = (start + 254) % 256
    _viterbi_step(ec0, ec1, bp + (p + 1) * E, tl.load(tgt + p), KA, KB, BC0, CC0, CB, USE_PTX, VECTOR_A)


@triton.jit
def _state_cost(ec, s, x, D, CB: tl.constexpr, USE_PTX: tl.constexpr):
    v = codebook_decode(s.to(tl.uint32), CB, USE_PTX).to(tl.float32)
    return tl.load(ec + (s >> D)) + (v - x) * (v - x)


@triton.jit
def _viterbi_kernel(
    targets_ptr,  # fp32 [T, 256], sequence order
    ec_ptr,  # fp32 [T, 2, E] scratch (edge costs, double-buffered)
    bp_ptr,  # uint8 [T, 256, E] scratch (back-pointers, row = destination position)
    states_ptr,  # int32 [T, 256] out
    KA: tl.constexpr, KB: tl.constexpr, HALF: tl.constexpr, E: tl.constexpr,
    BC0: tl.constexpr, CC0: tl.constexpr, BC1: tl.constexpr, CC1: tl.constexpr,
    CH: tl.constexpr, CB: tl.constexpr, USE_PTX: tl.constexpr, VECTOR_A: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    tgt = targets_ptr + tile * 256
    ec0 = ec_ptr + tile * (2 * E)
    ec1 = ec0 + E
    bp = bp_ptr + tile * (256 * E)
    out = states_ptr + tile * 256
    edges_even: tl.constexpr = 1 << (16 - KA)  # edges into an even position (D = KA)
    idx = tl.arange(0, CH)

    # Pass 1: unconstrained, from position 128 round to 127; best final state -> state at 0.
    _fill_edges(ec0, -1, edges_even, CH)
    _run(ec0, ec1, bp, tgt, 128, KA, KB, BC0, CC0, BC1, CC1, E, CB, USE_PTX, VECTOR_A)
    x = tl.load(tgt + 127)
    best_cost = float("inf")
    best_state = 0
    for s0 in range(0, 65536, CH):
        cost = _state_cost(ec1, s0 + idx, x, KB, CB, USE_PTX)
        m = tl.min(cost, axis=0)
        first = tl.min(tl.where(cost == m, s0 + idx, 65536), axis=0)
        take = m < best_cost
        best_state = tl.where(take, first, best_state)
        best_cost = tl.where(take, m, best_cost)
    state = best_state
    for i in range(127):  # positions 127 .. 1
        p = 127 - i
        d = _fresh(p, KA, HALF)
        edge = state >> d
        state = (tl.load(bp + p * E + edge).to(tl.int32) << (16 - d)) | edge
    edge0 = state >> KA

    # Pass 2: from position 0 with edge0 forced, to 255; close the ring through edge0.
    tl.debug_barrier()
    _fill_edges(ec0, edge0, edges_even, CH)
    _run(ec0, ec1, bp, tgt, 0, KA, KB, BC0, CC0, BC1, CC1, E, CB, USE_PTX, VECTOR_A)
    top = tl.arange(0, 1 << KA)
    closing = (top << (16 - KA)) | edge0
    cost = _state_cost(ec1, closing, tl.load(tgt + 255), KB, CB, USE_PTX)
    m = tl.min(cost, axis=0)
    state = tl.min(tl.where(cost == m, closing, 65536), axis=0)
    tl.store(out + 255, state)
    for i in range(255):  # positions 255 .. 1
        p = 255 - i
        d = _fresh(p, KA, HALF)
        edge = state >> d
        state = (tl.load(bp + p * E + edge).to(tl.int32) << (16 - d)) | edge
        tl.store(out + p - 1, state)


# Edge costs per block of the loop form, with 2 warps: 16 per thread, a quarter step at 4 bits
# (SASS for sm_90: 8 instructions per candidate state, one load per 16). Measured on the H100
# (bench/convert.py --sweep, 4 bits, 2048 tiles; warps x outputs: tiles/s): 2 x 1024 49.6k,
# 1 x 512 47.7k, 2 x 512 47.3k, 4 x 2048 40.5k, 4 x 1024 35.2k, 1 x 256 34.2k, 8 x 4096 31.6k,
# 4 x 4096 27.6k, 8 x 2048 25.2k, 2 x 2048 23.8k, 16 x 4096 22.5k.
OUTPUTS_PER_BLOCK = 1024


@functools.lru_cache(maxsize=None)
def _chunking(d: int, dn: int, outputs: int) -> tuple[int, int]:
    """``(BC, CC)`` for a step with ``D = d``, ``DN = dn``: blocks of ``BC * CC <= outputs`` edges."""
    b, c = 1 << (16 - d - dn), 1 << d
    cc = min(c, outputs)
    return min(b, max(1, outputs // cc)), cc


def edges_per_row(bits: float) -> int:
    """Row length of the scratch buffers: the edges into a position with the fewest fresh bits."""
    return 1 << (16 - int(bits))


def scratch_bytes_per_tile(bits: float) -> int:
    e = edges_per_row(bits)
    return 256 * e + 2 * 4 * e


def viterbi_encode_triton(targets: torch.Tensor, bits: float, codebook: int, *,
                          vector_a: bool | None = None, outputs_per_block: int = OUTPUTS_PER_BLOCK,
                          num_warps: int = 2) -> torch.Tensor:
    """Encode tiles ``[T, 256]`` (fp32, sequence order): the chosen states, int64 ``[T, 256]``.

    One launch; the caller limits ``T`` to what the scratch buffers may take
    (``scratch_bytes_per_tile``). ``vector_a``: the step's formulation (see
    ``_viterbi_step``); default: the loop on CUDA, whole-step blocks elsewhere.
    ``outputs_per_block``: edge costs per block of the loop form.
    """
    if targets.dim() != 2 or targets.shape[1] != 256:
        raise ValueError(f"targets must be [tiles, 256], got {list(targets.shape)}")
    t = targets.shape[0]
    ka = int(bits)
    half = bits != ka
    kb = ka + 1 if half else ka
    e = edges_per_row(bits)
    dev = targets.device
    vector_a = (not targets.is_cuda) if vector_a is None else vector_a
    states = torch.empty((t, 256), dtype=torch.int32, device=dev)
    if t == 0:
        return states.long()
    ec = torch.empty((t, 2, e), dtype=torch.float32, device=dev)
    bp = torch.empty((t, 256, e), dtype=torch.uint8, device=dev)
    # the vector form takes a whole step at once
    bc0, cc0 = _chunking(ka, kb, 65536 >> kb if vector_a else outputs_per_block)
    bc1, cc1 = _chunking(kb, ka, 65536 >> ka if vector_a else outputs_per_block)
    _viterbi_kernel[(t,)](
        targets.float().contiguous(), ec, bp, states,
        KA=ka, KB=kb, HALF=half, E=e, BC0=bc0, CC0=cc0, BC1=bc1, CC1=cc1,
        CH=4096 if targets.is_cuda else 65536,  # block of the one-off passes (fill, final argmin)
        CB=int(codebook), USE_PTX=targets.is_cuda, VECTOR_A=vector_a, num_warps=num_warps, num_stages=1,
    )
    return states.long()
