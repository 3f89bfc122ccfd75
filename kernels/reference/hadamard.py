"""Block-diagonal 128-point Hadamard rotation (exl3-format.md sections 2.1 and 3.6).

EXL3 rotates both sides of every weight with ``H = blockdiag(H128, H128, ...)``
where ``H128[i, j] = (-1)^popcount(i & j) / sqrt(128)`` (natural-order
Sylvester). ``H`` is symmetric and orthonormal, so it is its own inverse and
applying it on the left of a matrix is applying it on the right of the
transpose.
"""

from __future__ import annotations

import functools

import torch

HADAMARD_SIZE = 128


@functools.lru_cache(maxsize=None)
def _sylvester_cpu(n: int) -> torch.Tensor:
    i = torch.arange(n)
    anded = i[:, None] & i[None, :]
    popcount = torch.zeros_like(anded)
    while bool(anded.any()):
        popcount += anded & 1
        anded = anded >> 1
    return (1 - 2 * (popcount & 1)).to(torch.float32)


def sylvester(n: int = HADAMARD_SIZE, device: torch.device | str = "cpu") -> torch.Tensor:
    """The unnormalised n x n natural-order Sylvester Hadamard matrix (entries +-1, fp32)."""
    if n & (n - 1):
        raise ValueError(f"Sylvester Hadamard size must be a power of two, got {n}")
    return _sylvester_cpu(n).to(device)


def hadamard_128_ref(
    x: torch.Tensor,
    pre_scale: torch.Tensor | None = None,
    post_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``((x * pre_scale) . H) * post_scale`` along the last dim, in fp32.

    The last dimension must be a multiple of 128; each block of 128 is rotated
    independently with the orthonormal H128. Returns fp32.
    """
    n = x.shape[-1]
    if n % HADAMARD_SIZE:
        raise ValueError(f"Hadamard rotation needs a last dimension divisible by 128, got {n}")
    x = x.float()
    if pre_scale is not None:
        x = x * pre_scale.float()
    h = sylvester(HADAMARD_SIZE, x.device) * (HADAMARD_SIZE**-0.5)
    y = (x.reshape(*x.shape[:-1], n // HADAMARD_SIZE, HADAMARD_SIZE) @ h).reshape(x.shape)
    if post_scale is not None:
        y = y * post_scale.float()
    return y
