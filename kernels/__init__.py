"""exl3_triton.kernels: the EXL3 kernel core.

Kernels know tensors, not models. Each op has a plain-PyTorch reference (the
oracle and the CPU path, in ``kernels.reference``) and a Triton implementation
(``kernels/triton_*.py``); the public functions below pick one by the
``backend`` argument (see ``kernels.dispatch``):

    exl3_dequant(w)                 W_hat fp16 [in, out], bit-exact
    exl3_full_weight(w)             W fp32 [in, out]
    exl3_matmul(x, w)               x W + b through the rotated form
    exl3_moe(x, experts, ids, rw)   each token's selected experts, optionally weighted and summed
    hadamard_128(x, pre, post)      ((x * pre) . H128) * post
    linear(x, w)                    EXL3 or dense
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from . import triton_ops
from .dispatch import (BACKENDS, assume_capture, capturing, matmul_plan, mma_ready, resolve_backend, triton_available,
                       use_tensor_core_kernel)
from .reference import (
    dense_matmul_ref,
    exl3_inner_ref,
    exl3_matmul_ref,
    exl3_moe_ref,
    attention_ref,
    paged_attention_ref,
    ring_prefill_attention_ref,
    rope_store_kv_ref,
    HeadNorms,
    norm_rope_store_kv_ref,
    exl3_weight_ref,
    hadamard_128_ref,
)
from .weights import (
    SUPPORTED_BITS,
    Codebook,
    DenseWeight,
    Exl3ExpertStack,
    Exl3Weight,
    LinearWeight,
    bits_from_words,
    words_per_tile,
)


def _triton_shapes_ok(*dims: int) -> bool:
    return all(d % 128 == 0 for d in dims)


def exl3_dequant(weight: Exl3Weight, backend: str | None = None) -> torch.Tensor:
    """Decode ``W_hat`` (fp16 ``[in, out]``) of an EXL3 linear; bit-exact on every backend."""
    if resolve_backend(backend, weight.device) == "triton" and weight.out_features % 16 == 0:
        return triton_ops.load().dequant.dequant_inner_triton(weight)
    return exl3_inner_ref(weight)


def exl3_full_weight(weight: Exl3Weight, backend: str | None = None) -> torch.Tensor:
    """The dense weight ``W`` fp32 ``[in, out]`` (without bias)."""
    if resolve_backend(backend, weight.device) == "triton" and weight.out_splits is None and _triton_shapes_ok(
            weight.in_features, weight.out_features):
        had = triton_ops.load().hadamard.hadamard_128_triton
        inner = exl3_dequant(weight, "triton")
        left = had(inner.T.contiguous()).T * weight.suh.float()[:, None]  # diag(suh) . H . W_hat
        return had(left.contiguous(), None, weight.svh)  # . H . diag(svh)
    return exl3_weight_ref(weight)


def exl3_matmul(
    x: torch.Tensor,
    weight: Exl3Weight,
    backend: str | None = None,
    inner: torch.Tensor | None = None,
    _force_path: str | None = None,
) -> torch.Tensor:
    """``y = x W + b`` for an EXL3 weight. ``x``: ``[..., in_features]`` -> ``[..., out_features]``.

    ``inner`` (reference backend only) is an already decoded ``W_hat`` to reuse.
    ``_force_path`` (benchmarks): ``"dequant"`` or ``"reconstruct"`` takes that large-batch path whatever the size.
    """
    if resolve_backend(backend, x.device) == "triton":
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        plan = matmul_plan(rows, weight.in_features, weight.out_features, capturing(x.device))
        if plan is not None and rows > 0:
            ops = triton_ops.load()
            kind = _force_path or plan.kind
            if kind == "fused":
                if use_tensor_core_kernel(rows, weight.in_features, weight.out_features, x.device):
                    from .gluon_gemv import exl3_gemm_mma

                    y = exl3_gemm_mma(x.reshape(rows, x.shape[-1]), weight)
                    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.out_features)
                return ops.gemm.exl3_gemm_triton(x, weight, plan.config)
            if kind == "reconstruct":
                return _exl3_matmul_reconstruct(x, weight, ops)
            if kind != "dequant":
                raise InvalidArgumentError(f"unknown EXL3 matmul path {kind!r}")
            return _exl3_matmul_dequant(x, weight, ops)
    return exl3_matmul_ref(x, weight, inner=inner)


def _exl3_matmul_reconstruct(x: torch.Tensor, weight: Exl3Weight, ops) -> torch.Tensor:
    """Large batches: reconstruct the full weight W (fp16, rotations folded in) once, then one ``torch.matmul``
    of x as it is (concatenated linears too: each member's ``suh`` is folded into its columns)."""
    x2 = x.reshape(-1, x.shape[-1])
    w = ops.reconstruct.reconstruct_weight_triton(weight)
    if x2.dtype != torch.float16:  # e.g. bf16 activations: the product runs in x's dtype
        w = w.to(x2.dtype)
    if weight.bias is None:
        y = torch.matmul(x2, w)
    else:
        y = torch.addmm(weight.bias.to(x2.dtype), x2, w)
    return y.reshape(*x.shape[:-1], weight.out_features)


def _exl3_matmul_dequant(x: torch.Tensor, weight: Exl3Weight, ops) -> torch.Tensor:
    """Large batches: rotate x, dequantize W_hat once, fp16 ``torch.matmul``, rotate the result."""
    x2 = x.reshape(-1, x.shape[-1])
    w_hat = ops.dequant.dequant_inner_triton(weight)
    if weight.out_splits is None:
        acc = torch.matmul(ops.hadamard.exl3_input_rotate(x2, weight.suh), w_hat)
    else:  # concatenated linears: the input rotated with each member's suh, one matmul per member
        xh = ops.gemm.member_rotations(x2, weight)
        acc = torch.cat([torch.matmul(xh[j], part) for j, part in
                         enumerate(w_hat.split(list(weight.out_splits), dim=1))], dim=1)
    y = ops.hadamard.exl3_output_rotate(acc, weight.svh, weight.bias, x.dtype)
    return y.reshape(*x.shape[:-1], weight.out_features)


def exl3_moe(
    x: torch.Tensor,
    experts: Exl3ExpertStack,
    expert_ids: torch.Tensor,
    routing_weights: torch.Tensor | None = None,
    backend: str | None = None,
    schedule: str | None = None,
    members: int = 1,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply each token's selected experts (see ``kernels.reference.moe.exl3_moe_ref`` for shapes,
    ``members``: stacks such as gate + up in one launch, and ``base``: added to the weighted sum).
    ``schedule`` (Triton): "decode", "grouped" or None (by the number of slots)."""
    if resolve_backend(backend, x.device) == "triton" and _triton_shapes_ok(experts.in_features,
                                                                            experts.out_features):
        return triton_ops.load().moe.exl3_moe_triton(x, experts, expert_ids, routing_weights, schedule=schedule,
                                                     members=members, base=base)
    return exl3_moe_ref(x, experts, expert_ids, routing_weights, members=members, base=base)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    page_table: torch.Tensor,
    cu_q: list[int],
    kv_lens: list[int],
    q_positions: torch.Tensor,
    scale: float,
    window: int | None = None,
    kv_lens_t: torch.Tensor | None = None,
    is_decode: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of packed queries over paged keys/values.

    See ``kernels.reference.attention.paged_attention_ref`` for shapes. On CUDA a
    pure decode step (one query per sequence) runs the Triton paged-decode kernel,
    which reads lengths from ``kv_lens_t`` and is safe to capture in a CUDA graph.
    """
    if (is_decode and kv_lens_t is not None and resolve_backend(backend, q.device) == "triton"):
        return triton_ops.load().attention.paged_decode_attention(
            q, k_cache, v_cache, page_table=page_table, kv_lens=kv_lens_t, scale=scale, window=window)
    return paged_attention_ref(q, k_cache, v_cache, page_table=page_table, cu_q=cu_q, kv_lens=kv_lens,
                               q_positions=q_positions, scale=scale, window=window, attend=_attend(q, backend))


def ring_prefill_attention(q, k, v, k_ring, v_ring, *, ring_page_table, ring_slot_mapping, cu_q, kv_lens,
                           q_positions, scale: float, window: int, backend: str | None = None) -> torch.Tensor:
    """Prefill of sliding-window layers that keep a ring cache (see ``ring_prefill_attention_ref``).

    Decode steps of ring layers go through ``rope_store_kv`` and the Triton
    ``paged_attention`` over the ring's page table instead; here the attention
    core is PyTorch's fused SDPA on CUDA.
    """
    return ring_prefill_attention_ref(q, k, v, k_ring, v_ring, ring_page_table=ring_page_table,
                                      ring_slot_mapping=ring_slot_mapping, cu_q=cu_q, kv_lens=kv_lens,
                                      q_positions=q_positions, scale=scale, window=window,
                                      attend=_attend(q, backend))


def _attend(q: torch.Tensor, backend: str | None):
    """The attention core for prefill: PyTorch's fused SDPA on CUDA, the fp32 reference elsewhere."""
    if q.is_cuda and resolve_backend(backend, q.device) == "triton":
        from .torch_attention import attention_sdpa

        return attention_sdpa
    return attention_ref


def rope_store_kv(q, k, v, *, positions, inv_freq, slot_mapping, k_cache, v_cache, scaling: float = 1.0,
                  tables=None, norms: HeadNorms | None = None, backend: str | None = None) -> torch.Tensor:
    """NEOX rotary embedding on q and k plus the cache write of k and v; returns the rotated q.

    q ``[T, Hq, D]``, k ``[T, Hkv, D]``, v ``[T, Hkv, Dv]``; caches ``[pages, page_size, Hkv, D]``.
    ``tables``: precomputed (cos, sin) for the reference path, or a function that returns them
    (called only on that path: a GPU step computes its angles in the kernel). ``norms``: per-head RMSNorms of
    the raw projections, applied first (one Triton kernel for all of it on CUDA).
    """
    if resolve_backend(backend, q.device) == "triton" and q.is_cuda:
        rope = triton_ops.load().rope
        if norms is not None:
            return rope.norm_rope_store_kv_triton(q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache,
                                                  norms, scaling)
        return rope.rope_store_kv_triton(q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache, scaling)
    if norms is not None:
        return norm_rope_store_kv_ref(q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache, norms, scaling,
                                      tables)
    return rope_store_kv_ref(q, k, v, positions, inv_freq, slot_mapping, k_cache, v_cache, scaling, tables)


def linear(x: torch.Tensor, weight: LinearWeight, backend: str | None = None) -> torch.Tensor:
    """``y = x W + b`` for either kind of weight."""
    if isinstance(weight, Exl3Weight):
        return exl3_matmul(x, weight, backend)
    return dense_matmul_ref(x, weight)


def hadamard_128(
    x: torch.Tensor,
    pre_scale: torch.Tensor | None = None,
    post_scale: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``((x * pre_scale) . H128) * post_scale`` along the last dim (fp32 result)."""
    if resolve_backend(backend, x.device) == "triton" and x.shape[-1] % 128 == 0:
        return triton_ops.load().hadamard.hadamard_128_triton(x, pre_scale, post_scale)
    return hadamard_128_ref(x, pre_scale, post_scale)


__all__ = [
    "BACKENDS",
    "SUPPORTED_BITS",
    "Codebook",
    "DenseWeight",
    "Exl3ExpertStack",
    "Exl3Weight",
    "HeadNorms",
    "LinearWeight",
    "bits_from_words",
    "exl3_dequant",
    "exl3_full_weight",
    "exl3_matmul",
    "exl3_moe",
    "hadamard_128",
    "linear",
    "paged_attention",
    "ring_prefill_attention",
    "resolve_backend",
    "rope_store_kv",
    "triton_available",
    "words_per_tile",
]
