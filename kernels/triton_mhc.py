"""mHC site weights (pre, post, Sinkhorn-normalised comb) in one Triton launch per site.

The reference (``arch/blocks/mhc.py``) spends about 120 small kernels per site on
the 4x4 Sinkhorn alone (20 alternating row/column normalisations), which on the
decode path of a 46-layer mHC model is ~11,000 launches per token. Here one
program per token reads its ``(2 + N) * N`` mixing logits and writes ``pre [N]``,
``post [N]`` and ``comb [N, N]``, with the same formulas in fp32:

* ``pre = sigmoid(w_pre * a_pre + b_pre) + pre_eps``, ``post = 2 sigmoid(w_post * a_post + b_post)``;
* ``comb = softmax_rows(w_res * a_res + b_res) + eps``, a column normalisation, then
  ``iters - 1`` times a row and a column normalisation (each ``x / (sum + eps)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher


@triton.jit
def _mhc_weights_kernel(mix_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, pre_eps, eps, stride_mix,
                        N: tl.constexpr, ITERS: tl.constexpr):
    t = tl.program_id(0)
    i = tl.arange(0, N)
    row = mix_ptr + t * stride_mix
    a_pre = tl.load(scale_ptr).to(tl.float32)
    a_post = tl.load(scale_ptr + 1).to(tl.float32)
    a_res = tl.load(scale_ptr + 2).to(tl.float32)
    pre = tl.sigmoid(tl.load(row + i).to(tl.float32) * a_pre + tl.load(base_ptr + i)) + pre_eps
    post = 2 * tl.sigmoid(tl.load(row + N + i).to(tl.float32) * a_post + tl.load(base_ptr + N + i))
    tl.store(pre_ptr + t * N + i, pre)
    tl.store(post_ptr + t * N + i, post)
    ij = i[:, None] * N + i[None, :]
    c = tl.load(row + 2 * N + ij).to(tl.float32) * a_res + tl.load(base_ptr + 2 * N + ij)
    c = tl.exp(c - tl.max(c, axis=1)[:, None])
    c = c / tl.sum(c, axis=1)[:, None] + eps
    c = c / (tl.sum(c, axis=0)[None, :] + eps)
    for _ in range(ITERS - 1):
        c = c / (tl.sum(c, axis=1)[:, None] + eps)
        c = c / (tl.sum(c, axis=0)[None, :] + eps)
    tl.store(comb_ptr + t * N * N + ij, c)


_weights = FastLauncher(_mhc_weights_kernel)


def mhc_weights_triton(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, streams: int, iters: int,
                       pre_eps: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mix [T, (2+N)*N]`` fp32 (rows may be strided) -> ``pre [T, N]``, ``post [T, N]``, ``comb [T, N, N]``."""
    n = streams
    if n & (n - 1):
        raise ValueError(f"the fused mHC kernel needs a power-of-two stream count, got {n}")
    if mix.dtype != torch.float32 or mix.stride(-1) != 1:
        raise ValueError("mix must be fp32 with contiguous rows")
    t = mix.shape[0]
    pre = torch.empty(t, n, device=mix.device, dtype=torch.float32)
    post = torch.empty_like(pre)
    comb = torch.empty(t, n, n, device=mix.device, dtype=torch.float32)
    if t:
        _weights((t,), mix, scale, base, pre, post, comb, float(pre_eps), float(eps), mix.stride(0),
                 N=n, ITERS=iters, num_warps=1, num_stages=1)
    return pre, post, comb
