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

    kind: str  # "fused", "dequant" (W_hat + rotations + torch.matmul) or "reconstruct" (full W + torch.matmul)
    config: object = None


def matmul_plan(rows: int, in_features: int, out_features: int, capturing: bool = False) -> MatmulPlan | None:
    """None when the Triton kernels cannot take the shape (then the reference runs)."""
    if in_features % 128 or out_features % 128:
        return None
    if rows >= tuning.RECONSTRUCT_MIN_ROWS:
        return MatmulPlan("reconstruct")
    if rows > tuning.fused_max_rows(in_features, out_features):
        return MatmulPlan("dequant")
    return MatmulPlan("fused", tuning.gemm_config(rows, in_features, out_features, capturing))


# ------------------------------------------------------------------ the tensor-core few-row kernel

MMA_MAX_ROWS = 16
_MMA_READY: dict[int, bool] = {}


def use_tensor_core_kernel(rows: int, in_features: int, out_features: int, device: torch.device) -> bool:
    """Whether a fused matmul of ``rows`` rows takes the Gluon tensor-core kernel instead of the Triton ones
    (the rules and their measurements: ``tuning.TENSOR_CORE_FEW_ROWS`` and the ``TENSOR_CORE_*`` below it)."""
    if rows > min(MMA_MAX_ROWS, tuning.TENSOR_CORE_MAX_ROWS) or not tuning.TENSOR_CORE_FEW_ROWS:
        return False
    if rows > 8 and in_features * out_features < tuning.TENSOR_CORE_MANY_ROWS_MIN_WEIGHT:
        return False
    if rows == 1 and in_features * out_features < tuning.TENSOR_CORE_ONE_ROW_MIN_WEIGHT:
        return False
    return mma_ready(device)


def mma_ready(device: torch.device) -> bool:
    """Whether EXL3 matmuls of 1-16 rows on ``device`` take the Gluon tensor-core kernel (kernels/gluon_gemv.py):
    CUDA compute capability 8.0 or newer, a Triton with Gluon, not switched off (``EXL3_TRITON_MMA=0``), and its
    first run on the device matched the PyTorch reference. Decided once per device, outside graph captures."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    ready = _MMA_READY.get(index)
    if ready is None:
        if torch.cuda.is_current_stream_capturing():
            return False  # the check launches and synchronises; warm-up runs before capture decide it
        ready = _MMA_READY[index] = _check_mma(torch.device("cuda", index))
    return ready


def _check_mma(device: torch.device) -> bool:
    import os
    import warnings

    if os.environ.get("EXL3_TRITON_MMA", "1") == "0":
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):  # mma.m16n8k16 with fp16 operands: sm_80 and newer
        return False
    try:
        from .gluon_gemv import exl3_gemm_mma
        from .reference import exl3_matmul_ref
        from .weights import Codebook, Exl3Weight

        g = torch.Generator(device=device).manual_seed(0)
        k, n = 512, 256
        for bits, codebook in ((4, Codebook.MCG), (2.5, Codebook.MUL1), (2, Codebook.THREE_INST)):
            trellis = torch.randint(-32768, 32768, (k // 16, n // 16, int(16 * bits)), generator=g, device=device,
                                    dtype=torch.int32).to(torch.int16)
            w = Exl3Weight(trellis, torch.randn(k, generator=g, device=device).half(),
                           torch.randn(n, generator=g, device=device).half(), bits, codebook,
                           bias=torch.randn(n, generator=g, device=device).half(), key="mma_check")
            x = torch.randn(3, k, generator=g, device=device).half()
            ref = exl3_matmul_ref(x.float(), w).double()
            err = ((exl3_gemm_mma(x, w).double() - ref).norm() / ref.norm()).item()
            if not err < 2e-3:
                warnings.warn(f"exl3_triton: the tensor-core few-row kernel disagrees with the reference on "
                              f"{torch.cuda.get_device_name(device)} (relative error {err:.2e}, {bits} bits); "
                              f"using the Triton kernels")
                return False
        return True
    except Exception as e:  # an older Triton without Gluon, or a compile failure: the Triton kernels run
        warnings.warn(f"exl3_triton: the tensor-core few-row kernel is unavailable ({type(e).__name__}: "
                      f"{str(e)[:200]}); using the Triton kernels")
        return False

