"""Tile encoder: tail-biting Viterbi over the 2^16-state bitshift trellis, and packing.

Format reference: shared ``exl3-format.md`` sections 3.1, 6.5 and 10.1.

A 16x16 tile is 256 weights in *sequence order* (``TC_PERM`` applied). The
stored tile is a circular bitstream; position ``t`` decodes the 16-bit window
ending at its own bits, so consecutive states overlap: with ``D(t)`` fresh bits
at position t (K for integer K; for half-integer K = KA + 0.5 even positions
take KA bits and odd ones KA + 1),

    state[t] = ((state[t-1] << D(t)) | fresh bits) & 0xFFFF

i.e. the top ``16 - D(t)`` bits of ``state[t]`` (its "edge") are the low bits of
``state[t-1]``. Encoding a tile means choosing the 256 states whose decoded
codebook values are closest (squared error) to the targets, under that overlap
rule *and* the wrap-around rule between position 255 and position 0. That is
a shortest path through a trellis of 65536 states per position, found with
Viterbi in two passes (QTIP / ExLlamaV3's scheme):

1. run unconstrained, starting at position 128 and wrapping round to 127, and
   read off the edge entering position 0 on the best path;
2. run again from position 0 with that edge forced at both ends.

The work per position is one call of ``viterbi_step`` on a whole batch of
tiles: 65536 candidate states x tiles. That function is kept separate (and
free of Python loops). On CUDA the Triton kernel in ``kernels/triton_viterbi.py``
runs the same two passes without materialising the per-state costs (``backend``).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from ..kernels.reference.codebook import codebook_table
from ..kernels.weights import SUPPORTED_BITS, Codebook, words_per_tile

NUM_STATES = 1 << 16
TILE_SIZE = 256  # weights per 16x16 tile
_ROLL = TILE_SIZE // 2  # pass 1 starts half-way round the ring
# On CPU, batches beyond ~16 tiles only add cache misses (measured: 52 ms/tile at 16, 75 at 64, K = 4).
CPU_MAX_BATCH = 16


# ---------------------------------------------------------------- bit layout


@functools.lru_cache(maxsize=None)
def _fresh_bits_list(bits: float) -> tuple[int, ...]:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits per weight {bits}; supported: {SUPPORTED_BITS}")
    ka = int(bits)
    if bits == ka:
        return (ka,) * TILE_SIZE
    # Half-integer rates: bit mask 0xAAAA, i.e. odd positions carry one more bit.
    return tuple(ka + (t & 1) for t in range(TILE_SIZE))


def fresh_bits(bits: float) -> torch.Tensor:
    """``D(t)``, the number of new ring bits at each of the 256 positions (int64 [256])."""
    return torch.tensor(_fresh_bits_list(bits), dtype=torch.int64)


@functools.lru_cache(maxsize=None)
def _ring_layout(bits: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For every ring bit: which position owns it, and which bit of that position's state it is.

    Position t owns ring bits ``[S(t) - D(t), S(t))``, written MSB-first, where
    ``S(t) = D(0) + ... + D(t)``.
    """
    d = fresh_bits(bits)
    owner = torch.repeat_interleave(torch.arange(TILE_SIZE), d)
    end = torch.cumsum(d, 0)
    ring_bit = torch.arange(owner.numel())
    shift = end[owner] - 1 - ring_bit  # MSB of the fresh bits comes first
    return owner, shift


def pack_states(states: torch.Tensor, bits: float) -> torch.Tensor:
    """Encoder states ``[..., 256]`` -> stored trellis words int16 ``[..., 16*K]``.

    Each position's low ``D(t)`` state bits are appended MSB-first to the ring,
    the ring is cut into uint16 words MSB-first, and each pair of words is
    stored swapped (exl3-format.md 3.1 step 1; the same layout serves the
    half-integer rates, 10.1).
    """
    owner, shift = (t.to(states.device) for t in _ring_layout(bits))
    ring = (states.to(torch.int64)[..., owner] >> shift) & 1  # [..., 256*K]
    words = words_per_tile(bits)
    weights = 1 << torch.arange(15, -1, -1, device=states.device)
    stream = (ring.reshape(*ring.shape[:-1], words, 16) * weights).sum(-1)  # uint16 stream words
    stored = stream.reshape(*stream.shape[:-1], words // 2, 2).flip(-1).reshape(stream.shape)
    return ((stored ^ 0x8000) - 0x8000).to(torch.int16)


def is_tail_biting(states: torch.Tensor, bits: float) -> torch.Tensor:
    """Whether every consecutive pair of states (255 -> 0 included) overlaps as the ring requires."""
    d = fresh_bits(bits).to(states.device)
    prev = torch.roll(states.to(torch.int64), 1, dims=-1)
    overlap_mask = (1 << (16 - d)) - 1
    return ((states.to(torch.int64) >> d) == (prev & overlap_mask)).all(-1)


# ---------------------------------------------------------------- Viterbi


@functools.lru_cache(maxsize=None)
def _top_index(shift: int, device: torch.device) -> torch.Tensor:
    return torch.arange(1 << shift, dtype=torch.int32, device=device)[None, :, None]


def viterbi_step(
    cost: torch.Tensor,
    target: torch.Tensor,
    table: torch.Tensor,
    table_sq: torch.Tensor,
    shift: int,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the path costs of a batch of tiles by one position.

    cost     fp32 [T, 65536]  best total error of a path ending in each state at the
                              previous position (overwritten: used as scratch)
    target   fp32 [T]         the weight to encode at this position, per tile
    table    fp32 [65536]     decoded codebook value of every state; ``table_sq`` its square
    shift    D(t), the number of fresh bits at this position
    out      optional fp32 [T, 65536] buffer for the result (must not be ``cost``)

    Returns the new costs fp32 [T, 65536] and the back-pointers uint8
    [T, 2^(16-shift)]: for each edge (the overlap of ``16 - shift`` bits),
    the top ``shift`` bits of the best previous state.

    A state at the previous position is ``(top << (16-shift)) | edge``; a state
    here is ``(edge << shift) | fresh``. So the best predecessor of every state
    with a given edge is the min over ``top``, shared by its 2^shift successors.

    Speed trick: a min-with-argmin over the middle axis is several times slower
    in PyTorch than a plain min, so the candidate index ``top`` is written into
    the low ``shift`` mantissa bits of each (non-negative) fp32 cost and one
    integer min yields both. Non-negative fp32 values order like their int32
    bit patterns. The price is a relative rounding of 2^(shift-23) per step
    (at most 3e-5 at K = 8), far below anything that changes which path wins
    in a meaningful way.
    """
    t = cost.shape[0]
    low = (1 << shift) - 1
    packed = cost.view(torch.int32).view(t, 1 << shift, 1 << (16 - shift))
    packed.bitwise_and_(~low).bitwise_or_(_top_index(shift, cost.device))
    packed = packed.amin(dim=1)  # [T, edges]
    top = packed.to(torch.uint8).bitwise_and_(low)  # int32 -> uint8 keeps the low byte
    # The index bits left in the mantissa are within the rounding accepted above.
    best = packed.view(torch.float32) + target.square()[:, None]
    # (table - target)^2 + best, with the target^2 term folded into `best`.
    out = torch.add(best[:, :, None], table_sq.view(1 << (16 - shift), 1 << shift), out=out.view(t, -1, 1 << shift))
    out = out.view(t, NUM_STATES).addcmul_(target[:, None], table[None, :], value=-2.0)
    return out, top


def _first_cost(target: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return (table[None, :] - target[:, None]).square()


def _backtrack(final_states: torch.Tensor, backptrs: list[torch.Tensor], shifts: list[int]) -> list[torch.Tensor]:
    """Walk back from the last position of a run. Returns the states of every position of the run, in run order.

    ``backptrs[i]``/``shifts[i]`` belong to the transition into run position i+1.
    """
    states = [final_states]
    state = final_states
    for bp, shift in zip(reversed(backptrs), reversed(shifts)):
        edge = state >> shift
        top = bp.gather(1, edge[:, None])[:, 0].to(torch.int64)
        state = (top << (16 - shift)) | edge
        states.append(state)
    states.reverse()
    return states


def _encode_batch(targets: torch.Tensor, table: torch.Tensor, bits: float) -> torch.Tensor:
    """Tail-biting Viterbi for a batch ``[T, 256]`` of targets; returns int64 states ``[T, 256]``."""
    device = targets.device
    d = _fresh_bits_list(bits)
    table_sq = table.square()

    # Pass 1: unconstrained, positions 128..255, 0..127. Only the transitions
    # from position 0 onwards are needed to recover the state at position 0.
    cost = _first_cost(targets[:, _ROLL], table)
    backptrs, shifts = [], []
    order = list(range(_ROLL + 1, TILE_SIZE)) + list(range(_ROLL))
    spare = torch.empty_like(cost)
    for pos in order:
        new_cost, bp = viterbi_step(cost, targets[:, pos], table, table_sq, d[pos], out=spare)
        cost, spare = new_cost, cost
        if pos >= 1 and pos < _ROLL:
            backptrs.append(bp)
            shifts.append(d[pos])
    last = cost.argmin(dim=1)
    state0 = _backtrack(last, backptrs, shifts)[0]
    edge0 = state0 >> d[0]  # overlap between position 255 and position 0
    del backptrs

    # Pass 2: from position 0 with that edge forced at both ends of the ring.
    all_states = torch.arange(NUM_STATES, device=device)
    cost = _first_cost(targets[:, 0], table)
    cost = cost.masked_fill((all_states[None, :] >> d[0]) != edge0[:, None], float("inf"))
    backptrs, shifts = [], []
    for pos in range(1, TILE_SIZE):
        new_cost, bp = viterbi_step(cost, targets[:, pos], table, table_sq, d[pos], out=spare)
        cost, spare = new_cost, cost
        backptrs.append(bp)
        shifts.append(d[pos])
    overlap = 16 - d[0]
    closing = (torch.arange(1 << d[0], device=device)[None, :] << overlap) | edge0[:, None]  # [T, 2^D0]
    last = closing.gather(1, cost.gather(1, closing).argmin(dim=1, keepdim=True))[:, 0]
    return torch.stack(_backtrack(last, backptrs, shifts), dim=1)


def tiles_per_batch(bits: float, memory_budget: int) -> int:
    """How many tiles to encode at once within ``memory_budget`` bytes of work buffers."""
    d_min = min(_fresh_bits_list(bits))
    per_tile = TILE_SIZE * (1 << (16 - d_min)) + 4 * NUM_STATES * 4  # back-pointers + cost buffers
    return max(1, min(4096, memory_budget // per_tile))


@contextlib.contextmanager
def _single_cpu_thread(device: torch.device):
    """Run the CPU Viterbi on one thread.

    Each step is a handful of element-wise passes over [tiles, 65536] arrays;
    splitting those over threads gains little and, on a busy 2-core machine,
    was measured 3-10x *slower* than one thread (thread hand-offs per op).
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class EncodedTiles:
    """Result of encoding a batch of tiles."""

    states: torch.Tensor  # int64 [T, 256], sequence order, tail-biting
    values: torch.Tensor  # fp32 [T, 256], decoded codebook values of ``states``
    sq_error: torch.Tensor  # fp32 [T], sum of squared errors per tile


ENCODER_BACKENDS = ("auto", "torch", "triton")


def _use_triton(targets: torch.Tensor, backend: str) -> bool:
    if backend not in ENCODER_BACKENDS:
        raise ValueError(f"tile encoder backend {backend!r}; choose one of {ENCODER_BACKENDS}")
    if backend == "torch":
        return False
    from ..kernels import triton_ops

    if backend == "triton":
        if triton_ops.load() is None:
            raise RuntimeError(f"tile encoder backend 'triton': Triton cannot run here ({triton_ops.unavailable_reason()})")
        return True
    return triton_ops.cuda_kernel(targets, "viterbi", "viterbi_encode_triton") is not None  # auto: on CUDA


def encode_tiles(
    targets: torch.Tensor,
    bits: float,
    codebook: Codebook,
    *,
    memory_budget: int = 1 << 30,
    backend: str = "auto",
) -> EncodedTiles:
    """Encode tiles ``[T, 256]`` (fp32, sequence order) at ``bits`` per weight with ``codebook``.

    Runs on the tensors' device; batches tiles to stay within ``memory_budget``.
    ``backend``: "torch" (this module's Viterbi, the reference and the CPU path),
    "triton" (``kernels/triton_viterbi.py``: the same search, one program per tile;
    under the interpreter on a CPU) or "auto" (Triton on CUDA, else torch).
    """
    if targets.dim() != 2 or targets.shape[1] != TILE_SIZE:
        raise ValueError(f"targets must be [tiles, 256], got {list(targets.shape)}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits per weight {bits}; supported: {SUPPORTED_BITS}")
    targets = targets.float()
    table = codebook_table(codebook, targets.device).float()
    if _use_triton(targets, backend):
        from ..kernels import triton_ops

        viterbi = triton_ops.load().viterbi
        batch = max(1, memory_budget // viterbi.scratch_bytes_per_tile(bits))
        chunks = [viterbi.viterbi_encode_triton(targets[i : i + batch], bits, int(codebook))
                  for i in range(0, targets.shape[0], batch)]
    else:
        batch = tiles_per_batch(bits, memory_budget)
        if targets.device.type == "cpu":
            batch = min(batch, CPU_MAX_BATCH)
        with _single_cpu_thread(targets.device):
            chunks = [_encode_batch(targets[i : i + batch], table, bits) for i in range(0, targets.shape[0], batch)]
    states = torch.cat(chunks) if chunks else torch.zeros(0, TILE_SIZE, dtype=torch.int64, device=targets.device)
    values = table[states]
    return EncodedTiles(states=states, values=values, sq_error=(values - targets).square().sum(1))
