"""mHC site kernels in Triton: the site weights (pre, post, Sinkhorn-normalised comb), and a whole
site's entry and exit in three launches.

Site weights
------------
The reference (``arch/blocks/mhc.py``) spends about 120 small kernels per site on
the 4x4 Sinkhorn alone (20 alternating row/column normalisations), which on the
decode path of a 46-layer mHC model is ~11,000 launches per token. ``_site_weights``
turns one token's ``(2 + N) * N`` mixing logits into ``pre [N]``, ``post [N]`` and
``comb [N, N]``, with the same formulas in fp32:

* ``pre = sigmoid(w_pre * a_pre + b_pre) + pre_eps``, ``post = 2 sigmoid(w_post * a_post + b_post)``;
* ``comb = softmax_rows(w_res * a_res + b_res) + eps``, a column normalisation, then
  ``iters - 1`` times a row and a column normalisation (each ``x / (sum + eps)``).

Whole sites
-----------
Around each block, ``HyperSite`` runs: an RMS norm over all ``N * D`` stream values (with gamma),
the ``[(2+N)*N, N*D]`` fp32 projection (cuBLAS), the weights, the collapse ``sum_i pre_i X_i``, and
after the block the update ``X'[j] = post[j] * out + sum_i comb[i, j] X[i]`` (two kernels): about
seven launches a site, 92 sites per openPangu-Flash decode step. Here:

1. ``mhc_site_partials``: the RMS norm and the projection as chunk partial sums. The norm is one
   scalar per token, so ``mix = rsqrt(mean(x^2) + eps) * ((x * gamma) @ phi^T)``: the sum of
   squares and the projection of the un-normalised ``x * gamma`` are accumulated in the same pass,
   chunk by chunk, and the scalar applied at the end. A chunk is ``BLOCK_D`` columns of all ``N``
   streams; a program per (chunk, group of tokens) keeps its ``phi`` tile in registers for its
   tokens. One token's ``phi`` is ``24 x 10240`` fp32 = 1 MB at Flash shapes: read by one program
   it would take the bandwidth of a single SM (some 50-100 GB/s: 10-20 us); split into
   ``2560 / 32 = 80`` chunks it is spread over 80 SMs (12 KB each), so at batch 1 the read is
   bounded by the launch and the latency of a few dependent loads rather than one SM's bandwidth.
2. ``mhc_site_enter``: per token, the chunk partials summed (a tiny finish), the weights, and the
   collapse into the block's input ``[D]`` fp32. A program per (token, ``BLOCK_C`` columns):
   each recomputes the 4x4 Sinkhorn (a few hundred instructions, cheaper than another launch
   or a grid-wide dependency) so that the collapse is spread over ``D / BLOCK_C`` programs.
   Optionally the block's own input RMSNorm and the cast to the model's dtype too (two launches
   fewer): then one program a token, as that norm reduces over the whole row (``4 x 2560`` fp32
   = 40 KB read twice, the second time from cache: well under a microsecond of one SM).
3. ``mhc_site_exit``: the update, and where the next site follows immediately (the MLP site after
   the attention site) that site's partials from the new streams while they are in registers:
   one launch and one read of ``X'`` fewer (the chunks match because both use the same
   ``site_chunk``).

So a layer's two sites with their input norms take 5 launches (partials, enter, exit+partials,
enter, exit) instead of about 16 (bench/count_ops.py on the tiny synthetic openPangu). Sums run in a different order than cuBLAS: results agree within fp32 rounding.
All shapes are fixed by the inputs; no host synchronisation (CUDA-graph capture safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InvalidArgumentError
from .launch import FastLauncher


@triton.jit
def _site_weights(w_pre, w_post, w_comb, scale_ptr, base_ptr, pre_eps, eps, N: tl.constexpr, ITERS: tl.constexpr):
    """Raw mixing logits ``w_pre [N]``, ``w_post [N]``, ``w_comb [N, N]`` -> ``pre``, ``post``, ``comb`` (fp32)."""
    i = tl.arange(0, N)
    ij = i[:, None] * N + i[None, :]
    a_pre = tl.load(scale_ptr).to(tl.float32)
    a_post = tl.load(scale_ptr + 1).to(tl.float32)
    a_res = tl.load(scale_ptr + 2).to(tl.float32)
    pre = tl.sigmoid(w_pre * a_pre + tl.load(base_ptr + i)) + pre_eps
    post = 2 * tl.sigmoid(w_post * a_post + tl.load(base_ptr + N + i))
    c = w_comb * a_res + tl.load(base_ptr + 2 * N + ij)
    c = tl.exp(c - tl.max(c, axis=1)[:, None])
    c = c / tl.sum(c, axis=1)[:, None] + eps
    c = c / (tl.sum(c, axis=0)[None, :] + eps)
    for _ in range(ITERS - 1):
        c = c / (tl.sum(c, axis=1)[:, None] + eps)
        c = c / (tl.sum(c, axis=0)[None, :] + eps)
    return pre, post, c


@triton.jit
def _mhc_weights_kernel(mix_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, pre_eps, eps, stride_mix,
                        N: tl.constexpr, ITERS: tl.constexpr):
    t = tl.program_id(0)
    i = tl.arange(0, N)
    ij = i[:, None] * N + i[None, :]
    row = mix_ptr + t * stride_mix
    pre, post, comb = _site_weights(tl.load(row + i).to(tl.float32), tl.load(row + N + i).to(tl.float32),
                                    tl.load(row + 2 * N + ij).to(tl.float32), scale_ptr, base_ptr, pre_eps, eps,
                                    N, ITERS)
    tl.store(pre_ptr + t * N + i, pre)
    tl.store(post_ptr + t * N + i, post)
    tl.store(comb_ptr + t * N * N + ij, comb)


_weights = FastLauncher(_mhc_weights_kernel)


def mhc_weights_triton(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, streams: int, iters: int,
                       pre_eps: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mix [T, (2+N)*N]`` fp32 (rows may be strided) -> ``pre [T, N]``, ``post [T, N]``, ``comb [T, N, N]``."""
    n = streams
    _check_streams(n)
    if mix.dtype != torch.float32 or mix.stride(-1) != 1:
        raise InvalidArgumentError("mix must be fp32 with contiguous rows")
    t = mix.shape[0]
    pre = torch.empty(t, n, device=mix.device, dtype=torch.float32)
    post = torch.empty_like(pre)
    comb = torch.empty(t, n, n, device=mix.device, dtype=torch.float32)
    if t:
        _weights((t,), mix, scale, base, pre, post, comb, float(pre_eps), float(eps), mix.stride(0),
                 N=n, ITERS=iters, num_warps=1, num_stages=1)
    return pre, post, comb


# ------------------------------------------------------------------ whole sites


@triton.jit
def _chunk_phi(phi_ptr, gamma_ptr, k, kmask, stride_phi, M: tl.constexpr, M_PAD: tl.constexpr,
               HAS_GAMMA: tl.constexpr):
    """One chunk's ``phi [M_PAD, N, BLOCK_D]`` (rows past ``M`` zero) and ``gamma [N, BLOCK_D]`` (without
    one: 1 inside the chunk; either way 0 past ``D``)."""
    m = tl.arange(0, M_PAD)
    phi = tl.load(phi_ptr + m[:, None, None] * stride_phi + k[None, :, :],
                  mask=(m < M)[:, None, None] & kmask[None, :, :], other=0.0).to(tl.float32)
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    else:
        gamma = kmask.to(tl.float32)
    return phi, gamma


@triton.jit
def _where_token(mask, t, T):
    """``mask`` and token ``t < T``, formed elementwise (Triton's interpreter mis-types a tensor mask
    combined with a scalar one)."""
    return mask & ((mask.to(tl.int32) * 0 + t) < T)


@triton.jit
def _store_partials(x, phi, gamma, dots_ptr, sumsq_ptr, t, T, s, S, M_PAD: tl.constexpr):
    """One token's partials over one chunk ``x [N, BLOCK_D]`` (fp32, zero outside the chunk)."""
    m = tl.arange(0, M_PAD)
    sumsq = tl.sum(tl.sum(x * x, axis=1), axis=0)
    dots = tl.sum(tl.sum(phi * (x * gamma)[None, :, :], axis=2), axis=1)
    tl.store(dots_ptr + (t * S + s) * M_PAD + m, dots, mask=_where_token(m < M_PAD, t, T))
    tl.store(sumsq_ptr + t * S + s, sumsq, mask=t < T)


@triton.jit
def _site_partials_kernel(x_ptr, phi_ptr, gamma_ptr, dots_ptr, sumsq_ptr, T, D, S, stride_x, stride_phi,
                          N: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                          TOKENS: tl.constexpr, HAS_GAMMA: tl.constexpr):
    s = tl.program_id(0)
    i = tl.arange(0, N)
    d = s * BLOCK_D + tl.arange(0, BLOCK_D)
    k = i[:, None] * D + d[None, :]
    kmask = (d < D)[None, :] & (i < N)[:, None]
    phi, gamma = _chunk_phi(phi_ptr, gamma_ptr, k, kmask, stride_phi, M, M_PAD, HAS_GAMMA)
    for tt in range(TOKENS):
        t = (tl.program_id(1) * TOKENS + tt).to(tl.int64)  # t * stride_x passes 2^31 in long prefills
        x = tl.load(x_ptr + t * stride_x + k, mask=_where_token(kmask, t, T), other=0.0).to(tl.float32)
        _store_partials(x, phi, gamma, dots_ptr, sumsq_ptr, t, T, s, S, M_PAD)


@triton.jit
def _collapse(x_ptr, t, stride_x, pre, d, D, N: tl.constexpr):
    """``sum_i pre[i] * X[t, i, d]`` for the columns ``d`` (0 past ``D``)."""
    i = tl.arange(0, N)
    x = tl.load(x_ptr + t * stride_x + i[:, None] * D + d[None, :], mask=(d < D)[None, :] & (i < N)[:, None],
                other=0.0).to(tl.float32)
    return tl.sum(pre[:, None] * x, axis=0)


@triton.jit
def _site_enter_kernel(x_ptr, dots_ptr, sumsq_ptr, scale_ptr, base_ptr, y_ptr, pre_ptr, post_ptr, comb_ptr,
                       norm_w_ptr, D, S, stride_x, stride_y, inv_width, norm_eps, pre_eps, eps, block_norm_eps,
                       N: tl.constexpr, M_PAD: tl.constexpr, S_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
                       ITERS: tl.constexpr, BLOCK_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    i = tl.arange(0, N)
    ij = i[:, None] * N + i[None, :]
    sidx = tl.arange(0, S_PAD)
    smask = sidx < S
    rows = dots_ptr + (t * S + sidx) * M_PAD  # [S_PAD] pointers to each chunk's partial logits
    # the finish: chunk partials summed, then the norm's scalar applied to the projection
    sumsq = tl.sum(tl.load(sumsq_ptr + t * S + sidx, mask=smask, other=0.0), axis=0)
    rinv = 1.0 / tl.sqrt(sumsq * inv_width + norm_eps)
    w_pre = tl.sum(tl.load(rows[:, None] + i[None, :], mask=smask[:, None], other=0.0), axis=0) * rinv
    w_post = tl.sum(tl.load(rows[:, None] + N + i[None, :], mask=smask[:, None], other=0.0), axis=0) * rinv
    w_comb = tl.sum(tl.load(rows[:, None, None] + 2 * N + ij[None, :, :], mask=smask[:, None, None], other=0.0),
                    axis=0) * rinv
    pre, post, comb = _site_weights(w_pre, w_post, w_comb, scale_ptr, base_ptr, pre_eps, eps, N, ITERS)
    first = (i * 0 + c) == 0  # the first program of the token writes the weights
    tl.store(pre_ptr + t * N + i, pre, mask=first)
    tl.store(post_ptr + t * N + i, post, mask=first)
    tl.store(comb_ptr + t * N * N + ij, comb, mask=(ij * 0 + c) == 0)
    cols = tl.arange(0, BLOCK_C)
    if BLOCK_NORM:
        # the block's own RMSNorm needs the whole row: this program collapses it twice (the second
        # time from L1/L2), first for the sum of squares, then normalised and cast to y's dtype
        acc = tl.zeros([BLOCK_C], tl.float32)
        for c0 in range(0, D, BLOCK_C):
            y = _collapse(x_ptr, t, stride_x, pre, c0 + cols, D, N)
            acc += y * y
        r = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + block_norm_eps)
        for c0 in range(0, D, BLOCK_C):
            d = c0 + cols
            y = _collapse(x_ptr, t, stride_x, pre, d, D, N) * r
            if HAS_NORM_W:
                y = y * tl.load(norm_w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
            tl.store(y_ptr + t * stride_y + d, y.to(y_ptr.dtype.element_ty), mask=d < D)
    else:
        d = c * BLOCK_C + cols
        tl.store(y_ptr + t * stride_y + d, _collapse(x_ptr, t, stride_x, pre, d, D, N), mask=d < D)


@triton.jit
def _site_exit_kernel(x_ptr, out_ptr, post_ptr, comb_ptr, new_ptr, phi_ptr, gamma_ptr, dots_ptr, sumsq_ptr,
                      T, D, S, stride_x, stride_out, stride_new, stride_phi,
                      N: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                      TOKENS: tl.constexpr, NEXT: tl.constexpr, HAS_GAMMA: tl.constexpr):
    s = tl.program_id(0)
    i = tl.arange(0, N)
    ij = i[:, None] * N + i[None, :]
    d = s * BLOCK_D + tl.arange(0, BLOCK_D)
    k = i[:, None] * D + d[None, :]
    kmask = (d < D)[None, :] & (i < N)[:, None]
    if NEXT:
        phi, gamma = _chunk_phi(phi_ptr, gamma_ptr, k, kmask, stride_phi, M, M_PAD, HAS_GAMMA)
    for tt in range(TOKENS):
        t = (tl.program_id(1) * TOKENS + tt).to(tl.int64)  # t * stride_x passes 2^31 in long prefills
        live = _where_token(kmask, t, T)
        x = tl.load(x_ptr + t * stride_x + k, mask=live, other=0.0).to(tl.float32)
        out = tl.load(out_ptr + t * stride_out + d, mask=_where_token(d < D, t, T), other=0.0).to(tl.float32)
        post = tl.load(post_ptr + t * N + i, mask=_where_token(i < N, t, T), other=0.0)
        comb = tl.load(comb_ptr + t * N * N + ij, mask=_where_token(ij < N * N, t, T), other=0.0)
        # X'[j] = post[j] * out + sum_i comb[i, j] X[i]
        new = post[:, None] * out[None, :] + tl.sum(comb[:, :, None] * x[:, None, :], axis=0)
        tl.store(new_ptr + t * stride_new + k, new, mask=live)
        if NEXT:
            _store_partials(new, phi, gamma, dots_ptr, sumsq_ptr, t, T, s, S, M_PAD)


_partials = FastLauncher(_site_partials_kernel)
_enter = FastLauncher(_site_enter_kernel)
_exit = FastLauncher(_site_exit_kernel)

# chunk widths of the projection (columns of each stream per program; see the module's docstring)
SMALL_BATCH_BLOCK_D = 32
LARGE_BATCH_BLOCK_D = 64
LARGE_BATCH_ROWS = 64
COLLAPSE_BLOCK = 256
# warps of the chunk kernels (partials, exit) and of the enter kernel. Enter is one warp: its 4x4
# Sinkhorn is 40 tiny dependent reductions, which stay in warp shuffles there (more warps would
# take a shared-memory round trip and a barrier each), and 1024 collapse values are 32 a lane.
CHUNK_WARPS = 4
ENTER_WARPS = 1
# With the block's input norm the entry program walks the whole row twice: in one step of up to this many
# columns with NORM_ENTER_WARPS warps. Measured (bench/mhc_enter_sweep.py, H100, Flash shapes, CUDA graphs):
# 256 columns with 1 warp 9.8 us (batch 1) / 11.5 us (batch 8); 4096 with 4 warps 7.1 / 8.1 us.
NORM_COLLAPSE_BLOCK = 4096
NORM_ENTER_WARPS = 4
# grids of about this many programs (a few per SM on an H100's 132) before tokens share a program
TARGET_PROGRAMS = 512


def _check_streams(n: int):
    if n < 1 or n & (n - 1):
        raise InvalidArgumentError(f"the fused mHC kernels need a power-of-two stream count, got {n}")


def site_chunk(rows: int, width: int) -> tuple[int, int]:
    """``(BLOCK_D, S)``: the projection's chunk width and count for ``rows`` tokens of width ``D``.

    Narrow chunks at decode sizes spread one token's 1 MB of ``phi`` over many SMs; wider ones for
    many tokens keep the partials buffer (``T * S * M_PAD`` fp32) small."""
    block = SMALL_BATCH_BLOCK_D if rows <= LARGE_BATCH_ROWS else LARGE_BATCH_BLOCK_D
    block = min(block, triton.next_power_of_2(width))
    return block, triton.cdiv(width, block)


def _tokens_per_program(rows: int, chunks: int) -> int:
    return max(1, min(16, triton.next_power_of_2(triton.cdiv(rows * chunks, TARGET_PROGRAMS))))


def _streams_3d(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 3 or x.dtype != torch.float32:
        raise InvalidArgumentError(f"{what} must be fp32 streams [T, N, D], got {x.dtype} {tuple(x.shape)}")
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def _check_phi(phi: torch.Tensor, gamma: torch.Tensor | None, n: int, d: int, what: str):
    if phi.shape != ((2 + n) * n, n * d) or phi.stride(-1) != 1:
        raise InvalidArgumentError(f"{what} phi must be [{(2 + n) * n}, {n * d}] with contiguous rows, got {tuple(phi.shape)}")
    if gamma is not None and (gamma.numel() != n * d or not gamma.is_contiguous()):
        raise InvalidArgumentError(f"{what} gamma must be a contiguous [{n * d}], got {tuple(gamma.shape)}")


def _partials_buffers(t: int, s: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    m_pad = triton.next_power_of_2((2 + n) * n)
    return (torch.empty(t, s, m_pad, device=device, dtype=torch.float32),
            torch.empty(t, s, device=device, dtype=torch.float32))


def mhc_site_partials(x: torch.Tensor, phi: torch.Tensor, gamma: torch.Tensor | None,
                      tokens_per_program: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Streams ``x [T, N, D]`` fp32 -> chunk partials ``dots [T, S, M_PAD]`` of ``(x * gamma) @ phi^T``
    and ``sumsq [T, S]`` of ``x^2`` (chunks as ``site_chunk``), for ``mhc_site_enter``."""
    x = _streams_3d(x, "mHC streams")
    t, n, d = x.shape
    _check_streams(n)
    _check_phi(phi, gamma, n, d, "mHC site")
    block, s = site_chunk(t, d)
    dots, sumsq = _partials_buffers(t, s, n, x.device)
    if t:
        tok = tokens_per_program or _tokens_per_program(t, s)
        _partials((s, triton.cdiv(t, tok)), x, phi, x if gamma is None else gamma, dots, sumsq, t, d, s,
                  x.stride(0), phi.stride(0), N=n, M=(2 + n) * n, M_PAD=dots.shape[2], BLOCK_D=block,
                  TOKENS=tok, HAS_GAMMA=gamma is not None, num_warps=CHUNK_WARPS, num_stages=1)
    return dots, sumsq


def mhc_site_enter(x: torch.Tensor, dots: torch.Tensor, sumsq: torch.Tensor, scale: torch.Tensor,
                   base: torch.Tensor, streams: int, iters: int, norm_eps: float, pre_eps: float, eps: float,
                   block_norm: tuple[torch.Tensor | None, float, torch.dtype] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Streams ``x [T, N, D]`` and their partials -> the block input ``y [T, D]`` and ``pre [T, N]``,
    ``post [T, N]``, ``comb [T, N, N]`` (fp32). ``y`` is the collapse in fp32, or with ``block_norm =
    (weight [D] or None, eps, dtype)`` the block's RMSNorm of it, cast to ``dtype``."""
    x = _streams_3d(x, "mHC streams")
    t, n, d = x.shape
    _check_streams(n)
    if n != streams or dots.shape[:2] != sumsq.shape or dots.shape[0] != t or not dots.is_contiguous():
        raise InvalidArgumentError(f"mHC partials {tuple(dots.shape)}/{tuple(sumsq.shape)} do not fit streams "
                                   f"{tuple(x.shape)} ({streams} expected)")
    weight, block_eps, dtype = block_norm if block_norm is not None else (None, 0.0, torch.float32)
    if weight is not None and (weight.shape != (d,) or not weight.is_contiguous()):
        raise InvalidArgumentError(f"the block norm's weight must be a contiguous [{d}], got {tuple(weight.shape)}")
    y = torch.empty(t, d, device=x.device, dtype=dtype)
    pre = torch.empty(t, n, device=x.device, dtype=torch.float32)
    post = torch.empty_like(pre)
    comb = torch.empty(t, n, n, device=x.device, dtype=torch.float32)
    if t:
        s = dots.shape[1]
        # without the block's norm the collapse is spread over programs of BLOCK_C columns; with it
        # one program a token loops over the row (its norm is a reduction over all of it)
        block = min(NORM_COLLAPSE_BLOCK if block_norm is not None else COLLAPSE_BLOCK, triton.next_power_of_2(d))
        grid = (t, 1 if block_norm is not None else triton.cdiv(d, block))
        _enter(grid, x, dots, sumsq, scale, base, y, pre, post, comb, x if weight is None else weight, d, s,
               x.stride(0), y.stride(0), 1.0 / (n * d), float(norm_eps), float(pre_eps), float(eps), float(block_eps),
               N=n, M_PAD=dots.shape[2], S_PAD=triton.next_power_of_2(s), BLOCK_C=block, ITERS=iters,
               BLOCK_NORM=block_norm is not None, HAS_NORM_W=weight is not None,
               num_warps=NORM_ENTER_WARPS if block_norm is not None else ENTER_WARPS,
               num_stages=1)
    return y, pre, post, comb


def mhc_site_exit(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                  next_phi: torch.Tensor | None = None, next_gamma: torch.Tensor | None = None,
                  tokens_per_program: int | None = None):
    """``X'[j] = post[j] * out + sum_i comb[i, j] X[i]`` -> ``(X' [T, N, D] fp32, partials)``; with
    ``next_phi`` the partials of the site that follows (as ``mhc_site_partials(X', ...)``), else None."""
    x = _streams_3d(x, "mHC streams")
    t, n, d = x.shape
    _check_streams(n)
    if out.shape != (t, d) or out.stride(-1) != 1:
        raise InvalidArgumentError(f"mHC block output must be [{t}, {d}] with contiguous rows, got {tuple(out.shape)}")
    if post.shape != (t, n) or comb.shape != (t, n, n) or not (post.is_contiguous() and comb.is_contiguous()):
        raise InvalidArgumentError(f"mHC post/comb {tuple(post.shape)}/{tuple(comb.shape)} do not fit {t} x {n} streams")
    new = torch.empty_like(x)
    block, s = site_chunk(t, d)
    if next_phi is not None:
        _check_phi(next_phi, next_gamma, n, d, "next mHC site")
        dots, sumsq = _partials_buffers(t, s, n, x.device)
    if t:
        tok = tokens_per_program or _tokens_per_program(t, s)
        nxt = next_phi is not None
        _exit((s, triton.cdiv(t, tok)), x, out, post, comb, new, next_phi if nxt else x,
              next_gamma if next_gamma is not None else x, dots if nxt else x, sumsq if nxt else x, t, d, s,
              x.stride(0), out.stride(0), new.stride(0), next_phi.stride(0) if nxt else 0,
              N=n, M=(2 + n) * n, M_PAD=triton.next_power_of_2((2 + n) * n), BLOCK_D=block, TOKENS=tok,
              NEXT=nxt, HAS_GAMMA=next_gamma is not None, num_warps=CHUNK_WARPS, num_stages=1)
    return new, ((dots, sumsq) if next_phi is not None else None)
