"""Fused EXL3 decode + matmul in Triton: ``y = H(H(x * suh) @ W_hat) * svh + bias``.

The weight is decoded in registers, tile block by tile block, and never written
to memory. A program owns 128 output columns (one Hadamard block), a block of
``BLOCK_M`` rows and a slice of the input features (split-K):

1. **input rotation** (``ROTATE_IN_KERNEL``): the program rotates its rows'
   slice of ``x`` (``fp16(H(fp16(x * suh)))``, ExLlamaV3's rounding points) into
   a scratch buffer; otherwise the caller passes rotated activations. Doing it in
   the kernel makes a GEMV one launch.
2. **main loop**: ``BTK`` tile rows of ``W_hat`` at a time; one row uses fp32
   FMAs (``BLOCK_M == 1``), more rows ``tl.dot`` on tensor cores.
3. **output**: each program writes its partial sum to a workspace; with
   ``SPLIT_K > 1`` it bumps a per-block counter and the last to arrive adds the
   partials in a fixed order (deterministic), applies ``H``, ``svh`` and bias a
   few rows at a time, writes the result and resets the counter. Counters live
   in one zeroed buffer per device, so calls must be ordered on one stream (as
   the runtime does).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..errors import InvalidArgumentError
from .launch import FastLauncher
from .triton_decode import (HAD_SCALE, decode_words, decode_words_rank7, hadamard_rows, lane_layout, load_rows_rank7,
                            load_tile_words)
from .triton_gemv import async_gemv, lanes_arrangement, lanes_block_fp16, ring_gemv, ring_prologue, ring_words
from .triton_hadamard import exl3_input_rotate, exl3_input_rotate_gathered
from .weights import Exl3Weight

LOCK_SLOTS = 1 << 16


@functools.lru_cache(maxsize=None)
def _device_buffers(device: torch.device):
    """Per-device constants: zeroed split-K counters and the 128x128 Sylvester matrix (fp32)."""
    from .reference.hadamard import sylvester

    return torch.zeros(LOCK_SLOTS, dtype=torch.int32, device=device), sylvester(128, device).contiguous()


def device_buffers(device: torch.device):
    return _device_buffers(device if isinstance(device, torch.device) else torch.device(device))


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# ------------------------------------------------------------------ jit helpers

@triton.jit
def rotate_rows(x, suh, BM: tl.constexpr):
    """``fp16(H(fp16(x * suh)))`` for ``x [BM, 128]`` and ``suh [128]``."""
    xs = (x.to(tl.float32) * suh.to(tl.float32)[None, :]).to(tl.float16)
    return (hadamard_rows(xs.to(tl.float32), BM) * HAD_SCALE).to(tl.float16)


@triton.jit
def rotate_into_scratch(x_ptr, stride_xm, x_rows, xmask, suh_ptr, dst_ptr, dst_rows,
                        k_begin, k_len, BM: tl.constexpr):
    """Rotate features [k_begin, k_begin + k_len) of ``BM`` rows of x into ``dst`` (row stride = K)."""
    for c in range(0, k_len, 128):
        kk = k_begin + c + tl.arange(0, 128)
        x = tl.load(x_ptr + x_rows[:, None] * stride_xm + kk[None, :], mask=xmask[:, None], other=0.0)
        xh = rotate_rows(x, tl.load(suh_ptr + kk), BM)
        tl.store(dst_ptr + dst_rows[:, None] + kk[None, :], xh)
    tl.debug_barrier()  # the main loop reads what other threads of the program wrote


@triton.jit
def rotate_row_slice_into_scratch(x_ptr, x_row, suh_ptr, dst_ptr, k_begin, k_len, NCH: tl.constexpr):
    """One row: rotate features [k_begin, k_begin + k_len) of ``x_ptr[x_row]`` into ``dst_ptr`` (same offsets).

    The slice's 128-feature chunks are rotated together as the rows of one
    ``[NCH, 128]`` block (``NCH`` >= chunks, a power of two): a handful of layout
    changes in all instead of a dependent chain of them per chunk.
    """
    ch = tl.arange(0, NCH)[:, None]
    kk = k_begin + ch * 128 + tl.arange(0, 128)[None, :]
    m = ch * 128 < k_len
    x = tl.load(x_ptr + x_row * 0 + kk, mask=m, other=0.0).to(tl.float32)
    xs = (x * tl.load(suh_ptr + kk, mask=m, other=0.0).to(tl.float32)).to(tl.float16)
    xh = (hadamard_rows(xs.to(tl.float32), NCH) * HAD_SCALE).to(tl.float16)
    tl.store(dst_ptr + kk, xh, mask=m)
    tl.debug_barrier()  # the main loop reads what other threads of the program wrote


@triton.jit
def rotate_output(acc, h32_ptr, BM: tl.constexpr):
    """``H(acc) / sqrt(128)`` for ``acc [BM, 128]`` fp32 (fp32-accurate)."""
    if BM <= 32:
        return hadamard_rows(acc, BM) * HAD_SCALE
    else:  # large blocks: one 128 x 128 tensor-core product
        i = tl.arange(0, 128)
        h = tl.load(h32_ptr + i[:, None] * 128 + i[None, :])
        return tl.dot(acc, h, input_precision="tf32x3") * HAD_SCALE


@triton.jit
def _step_words(t32_ptr, kt, nt, TN, W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
                BTK: tl.constexpr, DOT_LANES: tl.constexpr):
    """The trellis words of one step (tile rows ``[kt, kt + BTK)``, 8 tiles from ``nt``): lane-major
    (``ring_words``, one tile per warp-level load) when ``DOT_LANES``, else ``triton_decode``'s order."""
    if DOT_LANES:
        return ring_words(t32_ptr, kt, nt, TN, W32, KA, HALF, NLOAD, BTK, DOT_LANES)
    else:
        return load_tile_words(t32_ptr, kt, nt, TN, W32, KA, HALF, NLOAD, BTK, 8)


@triton.jit
def decode_matmul(src_ptr, src_rows, src_mask, stride_src, t32_ptr, kt_begin, k_tiles, nt, TN,
                  W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
                  CB: tl.constexpr, USE_PTX: tl.constexpr, BM: tl.constexpr, BTK: tl.constexpr,
                  LANES: tl.constexpr = 0):
    """``src[rows, K-slice] @ W_hat[K-slice, 128 columns]`` -> fp32 ``[BM, 128]``.

    For ``BM == 1`` ``src_rows`` is a scalar row (always valid); otherwise a ``[BM]``
    vector with ``src_mask`` marking real rows (others read as zeros).

    Software-pipelined by hand: the next step's trellis words and activations are
    loaded before the current step is decoded, so their latency hides behind the
    decode arithmetic (launch with ``num_stages=1``).
    """
    r = tl.arange(0, 16 * BTK)
    DOT_LANES: tl.constexpr = LANES if BM >= 2 else 0  # several rows: lane-major word loads, block put back in order
    w0, w1, w2 = _step_words(t32_ptr, kt_begin, nt, TN, W32, KA, HALF, NLOAD, BTK, DOT_LANES)
    if BM == 1:  # activations two at a time, straight into the decode's rank-7 layout
        src32 = src_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        row_word0 = (src_rows * stride_src) // 2
        x = load_rows_rank7(src32, row_word0 + kt_begin * 8, BTK)
        acc2 = tl.zeros((BTK, 2, 4, 2, 8, 2, 8), tl.float32)
    else:
        x = tl.load(src_ptr + src_rows[:, None] * stride_src + kt_begin * 16 + r[None, :],
                    mask=src_mask[:, None], other=0.0)
        if BM < 16:  # a few rows: FMAs, one decoded weight feeding BM products
            acc3 = tl.zeros((BM, 16 * BTK, 128), tl.float32)
        else:
            acc = tl.zeros((BM, 128), tl.float32)
    for it in range(0, k_tiles, BTK):
        # prefetch the next step (the last step re-reads the first block, which is harmless)
        nxt = kt_begin + (it + BTK) % k_tiles
        n0, n1, n2 = _step_words(t32_ptr, nxt, nt, TN, W32, KA, HALF, NLOAD, BTK, DOT_LANES)
        if BM == 1:
            x_next = load_rows_rank7(src32, row_word0 + nxt * 8, BTK)
        else:
            x_next = tl.load(src_ptr + src_rows[:, None] * stride_src + nxt * 16 + r[None, :],
                             mask=src_mask[:, None], other=0.0)
        if BM == 1:
            acc2 += x * decode_words_rank7(w0, w1, w2, W32, KA, HALF, NLOAD, CB, USE_PTX).to(tl.float32)
        else:
            if DOT_LANES:
                w = lanes_block_fp16(w0, w1, w2, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, DOT_LANES)
            else:
                w = decode_words(w0, w1, w2, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, 8)
            if BM < 16:
                acc3 += x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
            else:
                acc = tl.dot(x.to(tl.float16), w, acc)
        w0, w1, w2, x = n0, n1, n2, x_next
    if BM == 1:
        return tl.sum(tl.reshape(acc2, (16 * BTK, 128)), axis=0)[None, :]
    elif BM < 16:
        return tl.sum(acc3, axis=1)
    else:
        return acc


@triton.jit
def store_rows(acc, rows, rmask, cols, svh_ptr, bias_ptr, y_ptr, stride_ym, h32_ptr,
               BM: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = rotate_output(acc, h32_ptr, BM) * tl.load(svh_ptr + cols).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=rmask[:, None])


# ------------------------------------------------------------------ kernel

@triton.jit
def _exl3_gemm_kernel(
    # pointers
    x_ptr, scratch_ptr, t32_ptr, suh_ptr, svh_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, h32_ptr, group_ptr,
    # sizes and strides
    M, N, K, TN, k_tiles_per_split, m_pad, stride_xm, stride_ym, x_group_stride,
    # trellis format
    W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
    CB: tl.constexpr, USE_PTX: tl.constexpr,
    # schedule
    BLOCK_M: tl.constexpr, BTK: tl.constexpr, SPLIT_K: tl.constexpr,
    ROTATE_IN_KERNEL: tl.constexpr, NCH: tl.constexpr, FIN_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    # one-row variants (GemmConfig.prefetch_steps / lane_major / early_load; 0/False: decode_matmul's loop)
    PREFETCH: tl.constexpr, LANES: tl.constexpr, EARLY_LOAD: tl.constexpr, ASYNC_STAGES: tl.constexpr,
    # concatenated linears (Exl3Weight.out_splits): group_ptr[column block] is the member, whose input
    # is rotated with its own suh row (in the kernel) or found x_group_stride elements further on
    GROUPED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    nb = N // 128
    if GROUPED:
        member = tl.load(group_ptr + pid_n)
        suh_ptr += member * K
        x_ptr += member.to(tl.int64) * x_group_stride
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = pid_n * 128 + tl.arange(0, 128)
    kt_begin = pid_s * k_tiles_per_split
    RING: tl.constexpr = BLOCK_M == 1 and PREFETCH > 0
    if RING and EARLY_LOAD:  # the first trellis loads fly while the prologue rotates x
        (wa0, wa1, wa2, wb0, wb1, wb2, wc0, wc1, wc2, wd0, wd1, wd2) = ring_prologue(
            t32_ptr, kt_begin, k_tiles_per_split // BTK, pid_n * 8, TN, W32, KA, HALF, NLOAD, BTK, PREFETCH + 1, LANES)

    if ROTATE_IN_KERNEL:  # this program's private copy of its rows' rotated K-slice
        scratch_row0 = (pid_m * nb + pid_n) * BLOCK_M
        if BLOCK_M == 1:
            rotate_row_slice_into_scratch(x_ptr + pid_m * stride_xm, 0, suh_ptr, scratch_ptr + scratch_row0 * K,
                                          kt_begin * 16, k_tiles_per_split * 16, NCH)
        else:
            rotate_into_scratch(x_ptr, stride_xm, rows, rmask, suh_ptr, scratch_ptr,
                                (scratch_row0 + tl.arange(0, BLOCK_M)) * K,
                                kt_begin * 16, k_tiles_per_split * 16, BLOCK_M)
        src_ptr = scratch_ptr
        src_rows = scratch_row0 + tl.arange(0, BLOCK_M)
        src_mask = rmask
        stride_src = K
    else:
        src_ptr = x_ptr
        src_rows = rows
        src_mask = rmask
        stride_src = stride_xm
    if BLOCK_M == 1:
        src_rows = tl.sum(src_rows, axis=0)  # the one row, as a scalar

    if BLOCK_M == 1 and ASYNC_STAGES > 0:
        acc = async_gemv(src_ptr.to(tl.pointer_type(tl.int32), bitcast=True), (src_rows * stride_src) // 2, t32_ptr,
                         kt_begin, k_tiles_per_split, pid_n * 8, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK,
                         ASYNC_STAGES, LANES)
    elif RING:
        if not EARLY_LOAD:
            (wa0, wa1, wa2, wb0, wb1, wb2, wc0, wc1, wc2, wd0, wd1, wd2) = ring_prologue(
                t32_ptr, kt_begin, k_tiles_per_split // BTK, pid_n * 8, TN, W32, KA, HALF, NLOAD, BTK, PREFETCH + 1,
                LANES)
        acc = ring_gemv(src_ptr.to(tl.pointer_type(tl.int32), bitcast=True), (src_rows * stride_src) // 2, t32_ptr,
                        kt_begin, k_tiles_per_split, pid_n * 8, TN, wa0, wa1, wa2, wb0, wb1, wb2, wc0, wc1, wc2,
                        wd0, wd1, wd2, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, PREFETCH + 1, LANES)
    else:
        acc = decode_matmul(src_ptr, src_rows, src_mask, stride_src, t32_ptr, kt_begin, k_tiles_per_split,
                            pid_n * 8, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BLOCK_M, BTK, LANES)

    # Finish: the partial goes to the workspace; the last program of this column block
    # (the only one without a split) reloads the block FIN_ROWS rows at a time and
    # rotates, scales and stores it, so the epilogue never holds the accumulator.
    ws_rows = pid_s * m_pad + rows
    tl.store(ws_ptr + ws_rows[:, None] * N + cols[None, :], acc)
    tl.debug_barrier()
    if SPLIT_K == 1:
        finish = True
    else:
        lock = lock_ptr + pid_m * nb + pid_n
        finish = tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT_K - 1
    if finish:
        for r0 in range(0, BLOCK_M, FIN_ROWS):
            frows = pid_m * BLOCK_M + r0 + tl.arange(0, FIN_ROWS)
            total = tl.zeros((FIN_ROWS, 128), tl.float32)
            for s in range(SPLIT_K):
                part = ws_ptr + (s * m_pad + frows)[:, None] * N + cols[None, :]
                total += tl.load(part, cache_modifier=".cg")
            store_rows(total, frows, frows < M, cols, svh_ptr, bias_ptr, y_ptr, stride_ym, h32_ptr, FIN_ROWS,
                       HAS_BIAS)
        if SPLIT_K > 1:
            tl.atomic_xchg(lock, 0)


_gemm = FastLauncher(_exl3_gemm_kernel)


# ------------------------------------------------------------------ launch

@dataclass(frozen=True)
class GemmConfig:
    """How one fused GEMM call is scheduled (chosen by the dispatcher from measured tables).

    block_m: rows per program (1, 2, 4: FMA path; >= 16: tensor cores); btk: tile
    rows decoded per step; split_k: target number of K slices (None: enough
    programs for two waves); rotate_in_kernel: rotate x in the kernel's prologue
    (one launch) instead of a separate launch.
    """

    block_m: int = 16
    btk: int = 2
    split_k: int | None = None
    num_warps: int = 8
    num_stages: int = 1  # loops prefetch by hand (decode_matmul)
    rotate_in_kernel: bool = False
    use_ptx: bool | None = None  # None: on CUDA
    max_registers: int | None = None  # per thread (more programs per SM); None: the compiler's choice
    # One-row variants (triton_gemv.py; docs/performance.md, "One-row kernel: load layout and bytes in
    # flight"). prefetch_steps: None keeps decode_matmul's loop (one step ahead through copied registers);
    # 1-3 selects the ring loop with that many steps' loads in flight while a step is decoded.
    # lane_major: warps read one tile's 32 contiguous words per load instruction (the one-row ring loop; with
    # block_m >= 2 the main loop, its block put back in row-major order after the decode).
    # early_load: the ring's first loads are issued before the in-kernel rotation of x.
    # async_stages (2-4, instead of prefetch_steps): Triton's pipeliner copies the words and activations
    # into shared memory (cp.async) async_stages - 1 steps ahead; lane_major applies to it too.
    prefetch_steps: int | None = None
    lane_major: bool = False
    early_load: bool = False
    async_stages: int | None = None

    def __post_init__(self):
        if self.async_stages is not None:
            if self.block_m != 1 or self.prefetch_steps is not None or self.early_load:
                raise InvalidArgumentError("GemmConfig.async_stages is a one-row option (block_m=1) and replaces "
                                           "prefetch_steps and early_load")
            if self.async_stages not in (2, 3, 4):
                raise InvalidArgumentError(f"GemmConfig.async_stages must be 2, 3 or 4, got {self.async_stages}")
        elif self.prefetch_steps is not None:
            if self.block_m != 1:
                raise InvalidArgumentError(f"GemmConfig.prefetch_steps is a one-row option (block_m=1), "
                                           f"got block_m={self.block_m}")
            if self.prefetch_steps not in (1, 2, 3):
                raise InvalidArgumentError(f"GemmConfig.prefetch_steps must be 1, 2 or 3, got {self.prefetch_steps}")
        elif self.early_load or (self.lane_major and self.block_m == 1):
            raise InvalidArgumentError("GemmConfig.lane_major (one row) and early_load select variants of the "
                                       "one-row loops: set prefetch_steps (1-3) or async_stages (2-4, lane_major only) "
                                       "too; with block_m >= 2 lane_major applies to the word loads of the main loop")
        if self.early_load and not self.rotate_in_kernel:
            raise InvalidArgumentError("GemmConfig.early_load overlaps the in-kernel rotation: it needs "
                                       "rotate_in_kernel=True")

    def describe(self) -> str:
        mode = "fma" if self.block_m == 1 else (f"fma bm{self.block_m}" if self.block_m < 16 else f"dot bm{self.block_m}")
        return (f"{mode}{'+rot' if self.rotate_in_kernel else ''} btk{self.btk} sk{self.split_k} "
                f"w{self.num_warps} s{self.num_stages}{' noptx' if self.use_ptx is False else ''}"
                f"{f' r{self.max_registers}' if self.max_registers else ''}"
                f"{f' ring{self.prefetch_steps}' if self.prefetch_steps else ''}{' lanes' if self.lane_major else ''}"
                f"{' early' if self.early_load else ''}{f' async{self.async_stages}' if self.async_stages else ''}")


# Programs per SM the automatic split aims for. Measured on the H100 (splits section of
# bench/kernels.py): fewer leaves load latency exposed, many more costs per-program overhead.
PROGRAMS_PER_SM = 6


@functools.lru_cache(maxsize=4096)
def choose_split_k(units: int, programs: int, sms: int, target: int | None,
                   per_sm: int = PROGRAMS_PER_SM, auto_most: int = 64) -> int:
    """A divisor of ``units`` (K slices must be whole steps), at most 64: the largest <= ``target``, or
    the smallest giving ``per_sm`` programs per SM when no target is given (at most ``auto_most``; the
    largest such when none does)."""
    divisors = [d for d in range(1, min(units, 64) + 1) if units % d == 0]
    if target is not None:
        return max(d for d in divisors if d <= max(1, target))
    divisors = [d for d in divisors if d <= auto_most]
    for d in divisors:
        if programs * d >= per_sm * sms:
            return d
    return divisors[-1]


def next_power_of_2(n: int) -> int:
    """Host-side helper (triton.next_power_of_2 is a JIT-aware wrapper, ~10 us a call)."""
    return 1 << max(0, int(n) - 1).bit_length()


def launch_constants(w: Exl3Weight) -> dict:
    """The per-weight constexprs and views, computed once and kept on the weight."""
    cached = w.derived.get("triton")
    if cached is None:
        layout = lane_layout(w.bits)
        cached = w.derived["triton"] = {
            "t32": w.trellis.view(torch.int32),
            "fmt": dict(W32=layout.w32, KA=layout.ka, HALF=layout.half, NLOAD=layout.nload, CB=int(w.codebook)),
        }
        if w.out_splits is not None:  # the member of each 128-column block
            cached["groups"] = torch.repeat_interleave(
                torch.arange(len(w.out_splits), dtype=torch.int32),
                torch.tensor(w.out_splits) // 128).to(w.device)
    return cached


def member_rotations(x: torch.Tensor, w: Exl3Weight) -> torch.Tensor:
    """``x [m, k]`` rotated with each member's ``suh`` of concatenated linears -> ``[members, m, k]``
    fp16, in one launch (the index rows are kept on the weight per row count)."""
    g, m = len(w.out_splits), x.shape[0]
    rows = w.derived.get(("member_rows", m))
    if rows is None:
        rows = w.derived[("member_rows", m)] = (
            torch.arange(m, dtype=torch.int32).repeat(g).to(x.device),
            torch.arange(g, dtype=torch.int32).repeat_interleave(m).to(x.device))
    return exl3_input_rotate_gathered(x, w.member_suh(), *rows).view(g, m, x.shape[1])


def rotated_input(x: torch.Tensor, w: Exl3Weight) -> tuple[torch.Tensor, int]:
    """``x [m, k]`` rotated in its own launch for kernels that read rotated activations: ``(x_hat, 0)``, or for
    concatenated linears member 0's rows with the stride to the next member's (each rotated with its ``suh``)."""
    if w.out_splits is None:
        return exl3_input_rotate(x, w.suh), 0
    xg = member_rotations(x, w)  # [members, m, k]
    return xg[0], xg.stride(0)


def exl3_gemm_triton(x: torch.Tensor, w: Exl3Weight, config: GemmConfig | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` through the fused kernel (dims multiples of 128).

    ``out``: optional contiguous ``[rows, out]`` tensor of x's dtype to write into.
    """
    cfg = config or GemmConfig()
    k, n = w.in_features, w.out_features
    if k % 128 or n % 128:
        raise ValueError(f"the fused EXL3 kernel needs dims divisible by 128, got [{k}, {n}]")
    if x.shape[-1] != k:
        raise ValueError(f"{w.key or 'EXL3 linear'}: input has {x.shape[-1]} features, weight expects {k}")
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # reshape costs microseconds of dispatch: skip when 2-D
    m = x2.shape[0]
    block_m = cfg.block_m
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    rotate_in_kernel = cfg.rotate_in_kernel
    grouped = w.out_splits is not None
    x_group_stride = 0
    if not rotate_in_kernel:
        x2, x_group_stride = rotated_input(x2, w)
    dev = x.device
    grid_m = -(-m // block_m)
    nb, k_tiles = n // 128, k // 16
    step = 8 if rotate_in_kernel else cfg.btk  # K slices hold whole 128-feature chunks when rotating
    split = choose_split_k(k_tiles // step, nb * grid_m, sm_count(dev), cfg.split_k)
    locks, h32 = device_buffers(dev)
    if split > 1 and grid_m * nb > LOCK_SLOTS:
        raise ValueError("too many output blocks for the split-K counters")
    ws = torch.empty((split * grid_m * block_m, n), dtype=torch.float32, device=dev)
    scratch = (torch.empty((grid_m * nb * block_m, k), dtype=torch.float16, device=dev) if rotate_in_kernel
               else h32)
    y = torch.empty((m, n), dtype=x.dtype, device=dev) if out is None else out.view(m, n)
    consts = launch_constants(w)
    chunks = k_tiles // split // 8
    _gemm(
        (nb, split, grid_m),
        x2, scratch, consts["t32"], w.suh, w.svh, w.bias if w.bias is not None else w.svh, y, ws, locks, h32,
        consts["groups"] if grouped else h32,
        m, n, k, n // 16, k_tiles // split, grid_m * block_m, x2.stride(0), y.stride(0), x_group_stride,
        USE_PTX=x.is_cuda if cfg.use_ptx is None else cfg.use_ptx,
        BLOCK_M=block_m, BTK=cfg.btk, SPLIT_K=split, ROTATE_IN_KERNEL=rotate_in_kernel,
        NCH=next_power_of_2(chunks), FIN_ROWS=min(block_m, 4), HAS_BIAS=w.bias is not None,
        PREFETCH=cfg.prefetch_steps or 0, LANES=lanes_arrangement() if cfg.lane_major else 0, EARLY_LOAD=cfg.early_load,
        ASYNC_STAGES=cfg.async_stages or 0, GROUPED=grouped,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.max_registers, **consts["fmt"],
    )
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def with_split(cfg: GemmConfig, split_k: int | None) -> GemmConfig:
    return replace(cfg, split_k=split_k)
