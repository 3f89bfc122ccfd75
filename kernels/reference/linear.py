"""Reference EXL3 linear algebra in plain PyTorch: the oracle and the CPU path.

``W = diag(suh) . Hk . W_hat . Hn . diag(svh)``  (``[in, out]``)

Forward without materialising W (exl3-format.md section 3.6):

    xh = H(x * suh)           per 128-block of the input features
    acc = xh @ W_hat
    y  = H(acc) * svh + bias

Everything here computes in fp32 (the GPU kernels round intermediates to fp16;
the tests compare them against this with an fp16 tolerance).
"""

from __future__ import annotations

import torch

from ..weights import DenseWeight, Exl3Weight
from .hadamard import hadamard_128_ref
from .trellis import dequant_inner_ref


def exl3_inner_ref(weight: Exl3Weight) -> torch.Tensor:
    """Decoded ``W_hat`` fp16 ``[in, out]`` (bit-exact)."""
    return dequant_inner_ref(weight.trellis, weight.bits, weight.codebook)


def exl3_weight_ref(weight: Exl3Weight, inner: torch.Tensor | None = None) -> torch.Tensor:
    """The full weight ``W`` fp32 ``[in, out]`` (bias not included)."""
    w_hat = (exl3_inner_ref(weight) if inner is None else inner).float()
    # each member's columns: diag(suh_j) . Hk . W_hat_j (one member for a stored linear)
    w = torch.cat([hadamard_128_ref(part.T).T * suh.float()[:, None] for suh, part in
                   zip(weight.member_suh(), w_hat.split(list(weight.out_splits or [w_hat.shape[1]]), dim=1))], dim=1)
    return hadamard_128_ref(w, post_scale=weight.svh)  # . Hn . diag(svh)


def exl3_matmul_ref(x: torch.Tensor, weight: Exl3Weight, inner: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W + b`` through the rotated form, in fp32, returned in ``x.dtype``.

    ``x``: ``[..., in_features]``; ``inner``: an already decoded ``W_hat``
    (fp16 or fp32) to skip the decode, e.g. cached by the caller.
    """
    k, n = weight.in_features, weight.out_features
    if x.shape[-1] != k:
        raise ValueError(f"{weight.key or 'EXL3 linear'}: input has {x.shape[-1]} features, weight expects {k}")
    w_hat = (exl3_inner_ref(weight) if inner is None else inner).float()
    x2 = x.reshape(-1, k)
    if weight.out_splits is None:
        acc = hadamard_128_ref(x2, pre_scale=weight.suh) @ w_hat
    else:  # concatenated linears (concat_exl3): each member's columns see the input rotated with its suh
        parts = w_hat.split(list(weight.out_splits), dim=1)
        acc = torch.cat([hadamard_128_ref(x2, pre_scale=suh) @ part
                         for suh, part in zip(weight.member_suh(), parts)], dim=1)
    y = hadamard_128_ref(acc, post_scale=weight.svh)
    if weight.bias is not None:
        y = y + weight.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def dense_matmul_ref(x: torch.Tensor, weight: DenseWeight) -> torch.Tensor:
    """``y = x W^T + b`` for an unquantized weight, computed in ``x.dtype``."""
    w = weight.weight.to(x.dtype)
    b = None if weight.bias is None else weight.bias.to(x.dtype)
    return torch.nn.functional.linear(x, w, b)
