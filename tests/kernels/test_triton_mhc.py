"""The fused mHC site-weights kernel against ``HyperSite.weights``' PyTorch path (itself checked
against a literal transcription of architectures.md §0.6 in tests/test_mhc.py)."""

import pytest
import torch

from exl3_triton.arch.blocks.mhc import HyperSite


@pytest.mark.parametrize("streams,iters,rows", [(4, 20, 7), (2, 5, 3)])
def test_fused_site_weights_match_the_reference(triton_kernels, device, streams, iters, rows):
    g = torch.Generator().manual_seed(streams)
    d, m = 16, (2 + streams) * streams
    site = HyperSite(torch.randn(m, streams * d, generator=g) * 0.3, torch.rand(3, generator=g) + 0.5,
                     torch.randn(m, generator=g), streams, gamma=1 + 0.1 * torch.randn(streams * d, generator=g),
                     sinkhorn_iters=iters)
    x = torch.randn(rows, streams, d, generator=g)
    want = site.weights(x)  # CPU tensors: the PyTorch path
    mix = torch.nn.functional.rms_norm(x.flatten(-2), (streams * d,), eps=site.eps) * site.gamma @ site.phi.T
    got = triton_kernels.mhc.mhc_weights_triton(mix.to(device), site.scale.to(device), site.base.to(device),
                                                streams, iters, site.pre_eps, site.sinkhorn_eps)
    for a, b in zip(got, want):
        assert torch.allclose(a.cpu(), b, rtol=1e-5, atol=1e-6)
    # the last step normalises columns (rows converge only as far as 20 iterations get them)
    assert torch.allclose(got[2].cpu().sum(-2), torch.ones(rows, streams), atol=1e-4)
