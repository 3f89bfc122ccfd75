"""Fused EXL3 decode + matmul in Triton: ``y = H(H(x * suh) @ W_hat) * svh + bias``.

The weight is decoded in registers tile block by tile block and never written
to memory. A program owns 128 output columns (one Hadamard block) and a slice of
the input features:

* ``USE_DOT``: ``tl.dot`` on tensor cores, rows padded to ``BLOCK_M`` >= 16;
  otherwise (one row) fp32 FMAs with the row broadcast over the decoded block.
* ``FUSE_HAD``: the input rotation ``fp16(H(fp16(x * suh)))`` is computed per
  128-feature chunk inside the kernel (one launch in all); otherwise the caller
  passes already rotated activations (``exl3_input_rotate``).
* ``SPLIT_K > 1``: programs that share a column block each write their partial
  sum to a workspace and bump a per-block counter; the last to arrive adds the
  partials in a fixed order (deterministic), applies the output rotation,
  ``svh`` and bias, writes the result and resets the counter for the next call.
  The counters live in one zeroed buffer per device, so calls must be ordered
  on one stream (as the runtime does).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_decode import HAD_SCALE, decode_tiles, hadamard_rows, lane_layout
from .triton_hadamard import exl3_input_rotate
from .weights import Exl3Weight

LOCK_SLOTS = 1 << 16


@functools.lru_cache(maxsize=None)
def _device_buffers(device: torch.device):
    """Per-device constants: zeroed split-K counters and the Hadamard matrix (fp16 and fp32)."""
    from .reference.hadamard import sylvester

    h = sylvester(128, device)
    return torch.zeros(LOCK_SLOTS, dtype=torch.int32, device=device), h.half().contiguous(), h.float().contiguous()


def device_buffers(device: torch.device):
    return _device_buffers(torch.device(device))


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# ------------------------------------------------------------------ jit helpers

@triton.jit
def load_hadamard(h_ptr, DTYPE: tl.constexpr):
    i = tl.arange(0, 128)
    return tl.load(h_ptr + i[:, None] * 128 + i[None, :]).to(DTYPE)


@triton.jit
def rotate_input_chunk(x, suh, BM: tl.constexpr):
    """``fp16(H(fp16(x * suh)))`` for a ``[BM, 128]`` chunk."""
    xs = (x.to(tl.float32) * suh.to(tl.float32)[None, :]).to(tl.float16)
    return (hadamard_rows(xs.to(tl.float32), BM) * HAD_SCALE).to(tl.float16)


@triton.jit
def rotate_output(acc, h32_ptr, BLOCK_M: tl.constexpr):
    """``H(acc) / sqrt(128)`` for ``acc [BLOCK_M, 128]`` fp32 (fp32-accurate)."""
    if BLOCK_M <= 16:
        return hadamard_rows(acc, BLOCK_M) * HAD_SCALE
    else:  # large blocks: one 128 x 128 tensor-core product
        return tl.dot(acc, load_hadamard(h32_ptr, tl.float32), input_precision="tf32x3") * HAD_SCALE


@triton.jit
def store_output(acc, rows, rmask, cols, svh_ptr, bias_ptr, y_ptr, stride_ym, h32_ptr,
                 BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = rotate_output(acc, h32_ptr, BLOCK_M) * tl.load(svh_ptr + cols).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=rmask[:, None])


# ------------------------------------------------------------------ kernel

@triton.jit
def _exl3_gemm_kernel(
    # pointers
    x_ptr, t32_ptr, suh_ptr, svh_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, h16_ptr, h32_ptr,
    # sizes and strides
    M, N, TN, k_tiles_per_split, m_pad, stride_xm, stride_ym,
    # trellis format
    W32: tl.constexpr, KA: tl.constexpr, HALF: tl.constexpr, NLOAD: tl.constexpr,
    CB: tl.constexpr, USE_PTX: tl.constexpr,
    # schedule
    BLOCK_M: tl.constexpr, BTK: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, FUSE_HAD: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    nt = pid_n * 8
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = pid_n * 128 + tl.arange(0, 128)
    kt_begin = pid_s * k_tiles_per_split

    if USE_DOT:
        acc = tl.zeros((BLOCK_M, 128), tl.float32)
        if FUSE_HAD:
            for c in range(0, k_tiles_per_split, 8):  # one 128-feature chunk per step
                kk = (kt_begin + c) * 16 + tl.arange(0, 128)
                x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=rmask[:, None], other=0.0)
                xh = rotate_input_chunk(x, tl.load(suh_ptr + kk), BLOCK_M)
                w = decode_tiles(t32_ptr, kt_begin + c, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, 8, 8)
                acc = tl.dot(xh, w, acc)
        else:
            for it in range(0, k_tiles_per_split, BTK):
                kk = (kt_begin + it) * 16 + tl.arange(0, 16 * BTK)
                x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=rmask[:, None], other=0.0)
                w = decode_tiles(t32_ptr, kt_begin + it, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, 8)
                acc = tl.dot(x.to(tl.float16), w, acc)
    else:  # one row, FMA; activations already rotated
        acc2 = tl.zeros((16 * BTK, 128), tl.float32)
        for it in range(0, k_tiles_per_split, BTK):
            kk = (kt_begin + it) * 16 + tl.arange(0, 16 * BTK)
            x = tl.load(x_ptr + pid_m * stride_xm + kk).to(tl.float32)
            w = decode_tiles(t32_ptr, kt_begin + it, nt, TN, W32, KA, HALF, NLOAD, CB, USE_PTX, BTK, 8)
            acc2 += x[:, None] * w.to(tl.float32)
        acc = tl.sum(acc2, axis=0)[None, :]

    if SPLIT_K == 1:
        store_output(acc, rows, rmask, cols, svh_ptr, bias_ptr, y_ptr, stride_ym, h32_ptr, BLOCK_M, HAS_BIAS)
    else:
        ws_rows = pid_s * m_pad + rows
        tl.store(ws_ptr + ws_rows[:, None] * N + cols[None, :], acc)
        tl.debug_barrier()
        lock = lock_ptr + pid_m * (N // 128) + pid_n
        arrived = tl.atomic_add(lock, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, 128), tl.float32)
            for s in range(SPLIT_K):
                part = ws_ptr + (s * m_pad + rows)[:, None] * N + cols[None, :]
                total += tl.load(part, cache_modifier=".cg")
            store_output(total, rows, rmask, cols, svh_ptr, bias_ptr, y_ptr, stride_ym, h32_ptr, BLOCK_M, HAS_BIAS)
            tl.atomic_xchg(lock, 0)


# ------------------------------------------------------------------ launch

@dataclass(frozen=True)
class GemmConfig:
    """How one fused GEMM call is scheduled (chosen by the dispatcher from measured tables)."""

    block_m: int = 16
    btk: int = 2
    split_k: int | None = None  # None: pick to fill the GPU
    num_warps: int = 4
    num_stages: int = 2
    use_dot: bool = True
    fuse_had: bool = False
    use_ptx: bool | None = None  # None: on CUDA

    def describe(self) -> str:
        mode = ("dot" if self.use_dot else "fma") + ("+had" if self.fuse_had else "")
        return f"{mode} bm{self.block_m} btk{self.btk} sk{self.split_k} w{self.num_warps} s{self.num_stages}"


def choose_split_k(k_tiles: int, programs: int, sms: int, step: int) -> int:
    """Smallest split of the k tiles (in units of ``step``) giving >= 2 waves of programs."""
    units = k_tiles // step
    best = 1
    for split in range(1, min(units, 64) + 1):
        if units % split:
            continue
        best = split
        if programs * split >= 2 * sms:
            break
    return best


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
    out_shape = (*x.shape[:-1], n)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not cfg.use_dot and m != 1:
        raise ValueError("the FMA path handles one row")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not cfg.fuse_had:
        x2 = exl3_input_rotate(x2, w.suh)
    block_m = cfg.block_m if cfg.use_dot else 1
    grid_m = triton.cdiv(m, block_m)
    nb = n // 128
    k_tiles = k // 16
    step = 8 if cfg.fuse_had else cfg.btk
    split = cfg.split_k or choose_split_k(k_tiles, nb * grid_m, sm_count(x.device), step)
    if k_tiles % (split * step):
        raise ValueError(f"split_k {split} does not divide {k_tiles} tiles in steps of {step}")
    locks, h16, h32 = device_buffers(x.device)
    if split > 1 and grid_m * nb > LOCK_SLOTS:
        raise ValueError("too many output blocks for the split-K counters")
    ws = torch.empty((split * grid_m * block_m, n), dtype=torch.float32, device=x.device) if split > 1 else x2
    y = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out.view(m, n)
    layout = lane_layout(w.bits)
    use_ptx = x.is_cuda if cfg.use_ptx is None else cfg.use_ptx
    _exl3_gemm_kernel[(nb, split, grid_m)](
        x2, w.trellis.view(torch.int32), w.suh, w.svh, w.bias if w.bias is not None else w.svh, y, ws, locks, h16, h32,
        m, n, n // 16, k_tiles // split, grid_m * block_m, x2.stride(0), y.stride(0),
        W32=layout.w32, KA=layout.ka, HALF=layout.half, NLOAD=layout.nload, CB=int(w.codebook), USE_PTX=use_ptx,
        BLOCK_M=block_m, BTK=cfg.btk, SPLIT_K=split, USE_DOT=cfg.use_dot, FUSE_HAD=cfg.fuse_had,
        HAS_BIAS=w.bias is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.reshape(out_shape)
