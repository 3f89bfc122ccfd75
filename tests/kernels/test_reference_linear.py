"""Hadamard and the rotated EXL3 forward against dense, independently built matrices."""

import pytest
import torch

from exl3_triton.kernels import Codebook, Exl3Weight, exl3_full_weight, exl3_matmul, hadamard_128
from exl3_triton.kernels.reference import exl3_weight_ref, hadamard_128_ref, sylvester
from exl3_triton.kernels.reference.trellis import dequant_inner_ref


def popcount_hadamard(n: int) -> torch.Tensor:
    i = torch.arange(n)
    pc = torch.tensor([bin(a & b).count("1") for a in range(n) for b in range(n)]).view(n, n)
    return ((-1.0) ** pc).double()


def test_sylvester_matches_popcount_definition():
    assert torch.equal(sylvester(128).double(), popcount_hadamard(128))


def test_hadamard_is_orthonormal_and_blockwise():
    x = torch.randn(3, 256, dtype=torch.float64)
    y = hadamard_128_ref(x)
    h = popcount_hadamard(128) / 128**0.5
    expected = torch.cat([x[:, :128] @ h, x[:, 128:] @ h], dim=1)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hadamard_128_ref(y).double(), x, rtol=1e-5, atol=1e-5)  # H = H^-1


def test_hadamard_scales():
    x, a, b = torch.randn(2, 128), torch.randn(128), torch.randn(128)
    torch.testing.assert_close(hadamard_128(x, a, b), hadamard_128_ref(x * a) * b)


def test_hadamard_rejects_bad_width():
    with pytest.raises(ValueError, match="divisible by 128"):
        hadamard_128_ref(torch.randn(4, 100))


def _random_weight(k, n, bits, cb, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    trellis = torch.randint(-32768, 32768, (k // 16, n // 16, int(16 * bits)), generator=g).to(torch.int16)
    suh = (torch.randn(k, generator=g) * 0.1).half()
    svh = (torch.randn(n, generator=g) * 0.1).half()
    b = torch.randn(n, generator=g).half() if bias else None
    return Exl3Weight(trellis, suh, svh, bits, cb, bias=b, key="test")


def test_full_weight_matches_explicit_product():
    w = _random_weight(256, 384, 4, Codebook.MCG)
    h = lambda n: torch.block_diag(*[popcount_hadamard(128) / 128**0.5] * (n // 128))  # noqa: E731
    w_hat = dequant_inner_ref(w.trellis, 4, Codebook.MCG).double()
    expected = torch.diag(w.suh.double()) @ h(256) @ w_hat @ h(384) @ torch.diag(w.svh.double())
    torch.testing.assert_close(exl3_full_weight(w).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,cb", [(2, Codebook.MCG), (3.5, Codebook.MUL1), (6, Codebook.THREE_INST)])
@pytest.mark.parametrize("rows", [1, 5])
def test_rotated_forward_equals_dense(bits, cb, rows):
    w = _random_weight(384, 256, bits, cb, bias=True, seed=rows)
    x = torch.randn(rows, 384)
    y = exl3_matmul(x, w)
    dense = x.double() @ exl3_weight_ref(w).double() + w.bias.double()
    assert ((y.double() - dense).norm() / dense.norm()).item() < 1e-6
