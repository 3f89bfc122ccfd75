"""Kernel tests run the Triton kernels under Triton's interpreter when there is no GPU
(``tests/conftest.py`` switches it on before anything imports Triton)."""

import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def triton_kernels():
    from exl3_triton.kernels import triton_ops

    ops = triton_ops.load()
    if ops is None:
        pytest.fail(f"Triton kernels unavailable: {triton_ops.unavailable_reason()}")
    return ops


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def bench_kernels(triton_kernels):
    """bench/kernels.py as a module, for the logic tests of its sections (tiny shapes, interpreter on a CPU)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
