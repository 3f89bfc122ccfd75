"""The fused residual add + RMSNorms kernel (kernels/triton_norm.py) against the unfused PyTorch
ops it replaces (``residual_norm_reference``, what Gemma 4 runs on a CPU) and against the
definition in float64."""

import pytest
import torch

from exl3_triton.arch.blocks.residual_norm import residual_norm_reference

EPS = 1e-6


def _rms64(t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    t = t.double()
    t = t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + EPS)
    return t if w is None else t * w.double()


def _definition(x, y, y_weight, scale, out_weight):
    r = x.double() if x is not None else 0.0
    if y is not None:
        r = r + _rms64(y, y_weight)
    if scale is not None:
        r = r * scale.double()
    return r, _rms64(r, out_weight)


# (x, y, y weight, scale, out weight): the three places in a Gemma layer, the norm alone, a branch alone
CASES = {
    "input norm": (True, False, False, False, True),
    "after attention": (True, True, True, False, True),
    "after mlp with layer_scalar": (True, True, True, True, False),
    "branch alone, unweighted": (False, True, False, False, False),
    "all parts": (True, True, True, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n,lead", [(300, (3,)), (64, (2, 2))])
def test_residual_norm_kernel_matches_the_unfused_ops(triton_kernels, device, case, n, lead):
    has_x, has_y, has_yw, has_scale, has_ow = CASES[case]
    g = torch.Generator().manual_seed(n)
    x = (20 * torch.randn(*lead, n, generator=g)) if has_x else None
    y = torch.randn(*lead, n, generator=g).half() * 50 if has_y else None
    y_weight = torch.rand(n, generator=g) + 0.5 if has_yw else None
    scale = torch.tensor([0.37]) if has_scale else None
    out_weight = torch.rand(n, generator=g) + 0.5 if has_ow else None
    norm_out = has_ow or case == "input norm"
    want_r, want_h = residual_norm_reference(x, y, y_weight, scale, out_weight, EPS, torch.float16, norm_out)
    exact_r, exact_h = _definition(x, y, y_weight, scale, out_weight)

    def dev(t):
        return None if t is None else t.to(device)

    r, h = triton_kernels.norm.residual_norm_triton(dev(x), dev(y), dev(y_weight), dev(scale), dev(out_weight),
                                                    EPS, torch.float16, norm_out)
    assert r.dtype == torch.float32 and r.shape == (*lead, n)
    assert torch.allclose(want_r.double(), exact_r, rtol=1e-5, atol=1e-5)
    assert torch.allclose(r.cpu().double(), exact_r, rtol=1e-5, atol=1e-5)
    if norm_out:
        assert h.dtype == torch.float16 and want_h.dtype == torch.float16
        # each within an fp16 rounding of the definition, so within two of each other
        assert torch.allclose(h.cpu().double(), exact_h, rtol=1e-3, atol=1e-3)
        assert torch.allclose(h.cpu().float(), want_h.float(), rtol=2e-3, atol=2e-3)
    else:
        assert h is None and want_h is None


def test_residual_norm_kernel_rejects_bad_operands(triton_kernels):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="y_weight"):
        triton_kernels.norm.residual_norm_triton(x, x, torch.ones(8, dtype=torch.float16), None, None, EPS,
                                                 torch.float16)
    with pytest.raises(ValueError, match="y needs 8"):
        triton_kernels.norm.residual_norm_triton(x, torch.randn(2, 7), None, None, None, EPS, torch.float16)


@pytest.mark.parametrize("in_dtype,out_dtype,weighted", [(torch.float16, torch.float16, True),
                                                          (torch.float16, torch.float32, True),
                                                          (torch.float32, torch.float16, False)])
def test_rms_norm_cast_kernel_matches_rmsnorm(triton_kernels, device, in_dtype, out_dtype, weighted):
    """``RMSNorm(x, out_dtype)``'s Triton path (no casts around the norm): strided rows of a wider
    projection output (as MLA's split gives them), against the module's PyTorch path and float64."""
    from exl3_triton.arch.blocks.norm import RMSNorm

    g = torch.Generator().manual_seed(7)
    wide = (30 * torch.randn(5, 200 + 24, generator=g)).to(in_dtype)
    x = wide[:, :200]  # row stride 224, contiguous channels
    weight = torch.rand(200, generator=g) + 0.5 if weighted else None
    norm = RMSNorm(weight, EPS)
    want = norm(x, out_dtype)
    assert want.dtype == out_dtype
    exact = _rms64(x, weight)
    got = triton_kernels.norm.rms_norm_cast_triton(x.to(device), None if weight is None else norm.weight.to(device),
                                                   EPS, out_dtype).cpu()
    assert got.dtype == out_dtype and got.shape == x.shape
    tol = 1e-3 if out_dtype == torch.float16 else 1e-5
    assert torch.allclose(got.double(), exact, rtol=tol, atol=tol)
    assert torch.allclose(got.double(), want.double(), rtol=2 * tol, atol=2 * tol)
