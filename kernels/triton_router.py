"""The sigmoid + bias router's selection in one Triton launch (OpenPanguV2, DeepSeek-V3 style).

``SigmoidBiasRouter`` (``arch/blocks/routing.py``) turns the router logits into expert ids and
weights with about eight small kernels in PyTorch (sigmoid, bias add, ``torch.topk``'s sort,
gather, sum, clamp, divide, scale), once per MoE layer and decode step. Here one program per
token does the same in fp32: ``s = sigmoid(logit)``; the top-k of ``s + bias`` picked by k
rounds of "largest, lowest index first" (``torch.topk``'s order: descending; ties are
unspecified there, lowest index here); the weights are the picked ``s``, normalised to sum 1
(the sum clamped at 1e-12 as the reference does) and times ``scaling``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher


@triton.jit
def _sigmoid_topk_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, stride_l, scaling,
                         E: tl.constexpr, E_P2: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr,
                         HAS_BIAS: tl.constexpr, NORMALISE: tl.constexpr):
    t = tl.program_id(0)
    e = tl.arange(0, E_P2)
    real = e < E
    s = tl.sigmoid(tl.load(logits_ptr + t * stride_l + e, mask=real, other=0.0).to(tl.float32))
    choice = s
    if HAS_BIAS:
        choice = s + tl.load(bias_ptr + e, mask=real, other=0.0)
    choice = tl.where(real, choice, float("-inf"))
    j = tl.arange(0, K_P2)
    ids = tl.zeros([K_P2], tl.int32)
    w = tl.zeros([K_P2], tl.float32)
    for r in tl.static_range(K):
        best = tl.max(choice, axis=0)
        pick = tl.min(tl.where(choice == best, e, E_P2), axis=0)
        ids = tl.where(j == r, pick, ids)
        w = tl.where(j == r, tl.sum(tl.where(e == pick, s, 0.0), axis=0), w)
        choice = tl.where(e == pick, float("-inf"), choice)
    if NORMALISE:
        w = w / tl.maximum(tl.sum(w, axis=0), 1e-12)
    tl.store(ids_ptr + t * K + j, ids.to(tl.int64), mask=j < K)
    tl.store(w_ptr + t * K + j, w * scaling, mask=j < K)


_route = FastLauncher(_sigmoid_topk_kernel)


def sigmoid_topk_triton(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, scaling: float,
                        normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [T, E]`` (fp32) -> expert ids ``[T, top_k]`` (int64) and weights ``[T, top_k]`` (fp32)."""
    t, e = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError(f"router logits must be contiguous in the expert dim, got strides {logits.stride()}")
    if not 0 < top_k <= e:
        raise ValueError(f"router top_k {top_k} must be in [1, {e}]")
    if bias is not None and (bias.numel() != e or bias.dtype != torch.float32):
        raise ValueError(f"router bias must be {e} fp32 values, got {tuple(bias.shape)} {bias.dtype}")
    ids = torch.empty(t, top_k, dtype=torch.long, device=logits.device)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    if t:
        _route((t,), logits, bias if bias is not None else logits, ids, weights, logits.stride(0), float(scaling),
               E=e, E_P2=triton.next_power_of_2(e), K=top_k, K_P2=triton.next_power_of_2(top_k),
               HAS_BIAS=bias is not None, NORMALISE=normalise, num_warps=4 if e > 256 else 2)
    return ids, weights
