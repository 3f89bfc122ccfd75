"""Backend choice and the plan for each EXL3 matmul.

A backend is chosen by argument (or by the model's load options), never by an
environment variable:

* ``"reference"``: the plain-PyTorch implementations in ``kernels.reference``;
* ``"triton"``: the Triton kernels (on CUDA; on a CPU they run under Triton's
  interpreter, which is how the test suite checks them);
* ``None`` / ``"auto"``: Triton on CUDA when available, else the reference.

``matmul_plan`` picks how a Triton matmul runs from the number of rows, using
the crossovers measured by ``bench/kernels.py`` (``kernels/tuning.py``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError
from . import triton_ops, tuning

BACKENDS = ("reference", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton kernels can run here (on CUDA, or under the interpreter on a CPU)."""
    return triton_ops.load() is not None


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """Turn a requested backend (or None/"auto") into "reference" or "triton"."""
    device = torch.device(device)
    if backend in (None, "auto"):
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    if backend == "triton":
        if not triton_available():
            raise InvalidArgumentError(
                f"backend 'triton' was requested but Triton cannot run here ({triton_ops.unavailable_reason()})")
        if device.type == "cpu" and not triton_ops.interpreting():
            raise InvalidArgumentError("backend 'triton' on a CPU tensor needs Triton's interpreter, "
                                       "which is off in this process (CUDA is present): use device='cuda'")
    return backend


_STATE = threading.local()


def capturing(device: torch.device) -> bool:
    """Whether the current call is being recorded into a CUDA graph (or is the warm-up for one)."""
    if getattr(_STATE, "assume_capture", False):
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def assume_capture():
    """Make kernels choose their CUDA-graph schedules, e.g. while warming up before a capture, so
    that every kernel the graph will hold is compiled and loaded before capturing starts."""
    previous = getattr(_STATE, "assume_capture", False)
    _STATE.assume_capture = True
    try:
        yield
    finally:
        _STATE.assume_capture = previous


@dataclass(frozen=True)
class MatmulPlan:
    """How to run one EXL3 matmul: the fused kernel with ``config``, or dequantize + torch.matmul."""

    kind: str  # "fused" or "dequant" (W_hat + rotations + torch.matmul)
    config: object = None


def matmul_plan(rows: int, in_features: int, out_features: int, capturing: bool = False) -> MatmulPlan | None:
    """None when the Triton kernels cannot take the shape (then the reference runs)."""
    if in_features % 128 or out_features % 128:
        return None
    if rows > tuning.fused_max_rows(in_features, out_features):
        return MatmulPlan("dequant")
    return MatmulPlan("fused", tuning.gemm_config(rows, in_features, out_features, capturing))
