"""Backend choice for kernel ops.

A backend is chosen by argument (or by the model's load options), never by an
environment variable:

* ``"reference"``: the plain-PyTorch implementations in ``kernels.reference``;
* ``"triton"``: the Triton kernels (on CUDA; on CPU they run under Triton's
  interpreter, which is how the test suite checks them);
* ``None`` / ``"auto"``: the best available for the tensor's device.
"""

from __future__ import annotations

import functools

import torch

from ..errors import InvalidArgumentError

BACKENDS = ("reference", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton package imports and its kernels exist in this build."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    from . import triton_ops

    return triton_ops.AVAILABLE


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """Turn a requested backend (or None/"auto") into "reference" or "triton"."""
    device = torch.device(device)
    if backend in (None, "auto"):
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    if backend == "triton" and not triton_available():
        raise InvalidArgumentError("backend 'triton' was requested but the Triton kernels are not available here")
    return backend
