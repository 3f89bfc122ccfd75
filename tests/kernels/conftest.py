"""Kernel tests run the Triton kernels under Triton's interpreter when there is no GPU
(``tests/conftest.py`` switches it on before anything imports Triton)."""

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
