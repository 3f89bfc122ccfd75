"""exl3_triton.kernels: the EXL3 kernel core.

Kernels know tensors, not models. Each op has a plain-PyTorch reference (the
oracle and the CPU path, in ``kernels.reference``) and a Triton implementation;
the public functions below pick one by the ``backend`` argument (see
``kernels.dispatch``).
"""

from __future__ import annotations

import torch

from .dispatch import BACKENDS, resolve_backend, triton_available
from .reference import (
    dense_matmul_ref,
    exl3_inner_ref,
    exl3_matmul_ref,
    exl3_weight_ref,
    hadamard_128_ref,
)
from .weights import (
    SUPPORTED_BITS,
    Codebook,
    DenseWeight,
    Exl3Weight,
    LinearWeight,
    bits_from_words,
    words_per_tile,
)


def exl3_dequant(weight: Exl3Weight, backend: str | None = None) -> torch.Tensor:
    """Decode ``W_hat`` (fp16 ``[in, out]``) of an EXL3 linear; bit-exact on every backend."""
    resolve_backend(backend, weight.device)
    return exl3_inner_ref(weight)


def exl3_full_weight(weight: Exl3Weight, backend: str | None = None) -> torch.Tensor:
    """The dense weight ``W`` fp32 ``[in, out]`` (without bias)."""
    return exl3_weight_ref(weight, inner=exl3_dequant(weight, backend))


def exl3_matmul(
    x: torch.Tensor,
    weight: Exl3Weight,
    backend: str | None = None,
    inner: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W + b`` for an EXL3 weight. ``x``: ``[..., in_features]`` -> ``[..., out_features]``.

    ``inner`` (reference backend only) is an already decoded ``W_hat`` to reuse.
    """
    resolve_backend(backend, x.device)
    return exl3_matmul_ref(x, weight, inner=inner)


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
    resolve_backend(backend, x.device)
    return hadamard_128_ref(x, pre_scale, post_scale)


__all__ = [
    "BACKENDS",
    "SUPPORTED_BITS",
    "Codebook",
    "DenseWeight",
    "Exl3Weight",
    "LinearWeight",
    "bits_from_words",
    "exl3_dequant",
    "exl3_full_weight",
    "exl3_matmul",
    "hadamard_128",
    "linear",
    "resolve_backend",
    "triton_available",
    "words_per_tile",
]
