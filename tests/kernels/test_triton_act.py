"""The fused ``act(gate) * up`` kernel (kernels/triton_act.py) against PyTorch's activations
followed by the product (``gated_activation_reference``, what the CPU runs) and the formulas in
float64."""

import math

import pytest
import torch

from exl3_triton.arch.blocks.mlp import gated_activation_reference


def _definition(gate, up, activation):
    g = gate.double()
    if activation == "silu":
        a = g / (1 + torch.exp(-g))
    else:
        a = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    return a * up.double()


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype,n", [(torch.float16, 1500), (torch.float32, 96)])
def test_gated_activation_kernel(triton_kernels, device, activation, dtype, n):
    g = torch.Generator().manual_seed(n)
    both = torch.randn(3, 2 * n, generator=g) * 6  # large |gate| too: tanh / exp saturation
    gate, up = both[:, :n].to(dtype), both[:, n:].to(dtype)  # strided rows, as slices of one projection
    exact = _definition(gate, up, activation)
    want = gated_activation_reference(gate, up, activation)
    got = triton_kernels.act.gated_activation_triton(gate.to(device), up.to(device), activation).cpu()
    assert got.dtype == dtype and got.shape == gate.shape
    tol = 2e-3 if dtype == torch.float16 else 1e-5  # one rounding of the result to the dtype
    scale = exact.abs().clamp(min=1)
    assert ((got.double() - exact) / scale).abs().max() < tol
    assert ((want.double() - exact) / scale).abs().max() < 2 * tol


def test_gated_activation_kernel_rejects_an_activation_it_lacks(triton_kernels):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="'gelu'"):
        triton_kernels.act.gated_activation_triton(x, x, "gelu")


def test_softcap_kernel(triton_kernels, device):
    from exl3_triton.arch.blocks.softcap import softcap_reference

    logits = (torch.randn(3, 1000, generator=torch.Generator().manual_seed(1)) * 40).half()  # far beyond cap too
    exact = torch.tanh(logits.double() / 30.0) * 30.0
    got = triton_kernels.act.softcap_triton(logits.to(device), 30.0).cpu()
    assert got.dtype == torch.float32 and got.shape == logits.shape
    assert (got.double() - exact).abs().max() < 1e-5
    assert (softcap_reference(logits, 30.0).double() - exact).abs().max() < 1e-5
