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


# ------------------------------------------------------------------ whole sites (partials, enter, exit)


def _site(g, streams, width, gamma):
    m = (2 + streams) * streams
    return HyperSite(torch.randn(m, streams * width, generator=g) * 0.3, torch.rand(3, generator=g) + 0.5,
                     torch.randn(m, generator=g), streams, sinkhorn_iters=20,
                     gamma=1 + 0.1 * torch.randn(streams * width, generator=g) if gamma else None)


def _streams(g, rows, streams, width):
    # streams of different magnitudes, as after a few layers (the norm spans all of them)
    return torch.randn(rows, streams, width, generator=g) * torch.linspace(0.5, 3.0, streams)[:, None]


def _close(got, want, what, rtol=1e-5, atol=1e-5):
    assert got.shape == want.shape, what
    assert torch.allclose(got.cpu(), want, rtol=rtol, atol=atol), \
        f"{what}: max abs diff {(got.cpu() - want).abs().max():.3g}"


@pytest.mark.parametrize("width,rows,gamma", [(64, 1, True), (64, 5, False), (192, 3, True), (256, 2, False)])
def test_site_entry_matches_norm_projection_weights_and_collapse(triton_kernels, device, width, rows, gamma):
    g = torch.Generator().manual_seed(width + rows)
    site = _site(g, 4, width, gamma)
    x = _streams(g, rows, 4, width)
    pre, post, comb = site.weights(x)  # CPU tensors: the PyTorch path (rms_norm, matmul, Sinkhorn)
    k = triton_kernels.mhc
    dots, sumsq = k.mhc_site_partials(x.to(device), site.phi.to(device), None if site.gamma is None else
                                      site.gamma.to(device))
    assert dots.shape[1] == k.site_chunk(rows, width)[1]  # the projection really is split into chunks
    got = k.mhc_site_enter(x.to(device), dots, sumsq, site.scale.to(device), site.base.to(device), 4, site.iters,
                           site.eps, site.pre_eps, site.sinkhorn_eps)
    _close(got[1], pre, "pre")
    _close(got[2], post, "post")
    _close(got[3], comb, "comb")
    _close(got[0], HyperSite.collapse(x, pre), "block input")


@pytest.mark.parametrize("width,rows,weight,dtype", [(64, 2, True, torch.float16), (320, 3, False, torch.float32),
                                                     (256, 1, True, torch.bfloat16)])
def test_site_entry_applies_the_blocks_norm(triton_kernels, device, width, rows, weight, dtype):
    """With the block's RMSNorm fused in (the whole row in one program, past 256 columns in a loop)."""
    from exl3_triton.arch.blocks.norm import RMSNorm

    g = torch.Generator().manual_seed(width)
    site = _site(g, 4, width, True)
    norm = RMSNorm(torch.rand(width, generator=g) + 0.5 if weight else None, 1e-5)
    x = _streams(g, rows, 4, width)
    want = norm(HyperSite.collapse(x, site.weights(x)[0])).to(dtype)
    k = triton_kernels.mhc
    part = k.mhc_site_partials(x.to(device), site.phi.to(device), site.gamma.to(device))
    y, *_ = k.mhc_site_enter(x.to(device), *part, site.scale.to(device), site.base.to(device), 4, site.iters,
                             site.eps, site.pre_eps, site.sinkhorn_eps,
                             (None if norm.weight is None else norm.weight.to(device), norm.eps, dtype))
    assert y.dtype == dtype
    # the same fp32 value up to rounding, then one cast: at most one step of the narrow type apart
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}[dtype]
    _close(y.float(), want.float(), "normed block input", rtol=tol, atol=tol)


@pytest.mark.parametrize("rows,tokens_per_program,gamma", [(1, None, True), (5, 2, True), (3, 4, False)])
def test_site_exit_matches_update_and_the_next_sites_partials(triton_kernels, device, rows, tokens_per_program,
                                                             gamma):
    g = torch.Generator().manual_seed(rows)
    width = 96  # not a multiple of the chunk width: the last chunk is partial
    site, nxt = _site(g, 4, width, True), _site(g, 4, width, gamma)
    x = _streams(g, rows, 4, width)
    _, post, comb = site.weights(x)
    out = torch.randn(rows, width, generator=g)
    want = HyperSite.update(x, out, post, comb)
    k = triton_kernels.mhc
    on = [t if t is None else t.to(device) for t in (x, out, post, comb, nxt.phi, nxt.gamma)]
    new, none = k.mhc_site_exit(*on[:4], tokens_per_program=tokens_per_program)
    assert none is None
    _close(new, want, "updated streams")
    new, part = k.mhc_site_exit(*on, tokens_per_program=tokens_per_program)
    _close(new, want, "updated streams (with the next site's partials)")
    # the partials fused into the exit equal those of a separate pass over the new streams
    alone = k.mhc_site_partials(new, on[4], on[5], tokens_per_program=tokens_per_program)
    _close(part[0], alone[0].cpu(), "partial projections", atol=1e-4)
    _close(part[1], alone[1].cpu(), "partial sums of squares", atol=1e-4)
    _, pre2, post2, comb2 = k.mhc_site_enter(new, *part, nxt.scale.to(device), nxt.base.to(device), 4, nxt.iters,
                                             nxt.eps, nxt.pre_eps, nxt.sinkhorn_eps)
    want2 = nxt.weights(want)
    _close(pre2, want2[0], "next pre")
    _close(post2, want2[1], "next post")
    _close(comb2, want2[2], "next comb")


def test_site_kernels_name_what_does_not_fit(triton_kernels):
    k = triton_kernels.mhc
    g = torch.Generator().manual_seed(0)
    site = _site(g, 4, 32, True)
    x = _streams(g, 2, 4, 32)
    with pytest.raises(ValueError, match="phi must be"):
        k.mhc_site_partials(x, site.phi[:, :64], site.gamma)
    with pytest.raises(ValueError, match="power-of-two"):
        k.mhc_site_partials(torch.zeros(2, 3, 32), torch.zeros(15, 96), None)
    with pytest.raises(ValueError, match="fp32 streams"):
        k.mhc_site_partials(x.half(), site.phi, site.gamma)
    with pytest.raises(ValueError, match="block output"):
        k.mhc_site_exit(x, torch.zeros(2, 16), torch.zeros(2, 4), torch.zeros(2, 4, 4))


def test_golden_openpangu_prefix_through_the_site_kernels(triton_kernels, golden, monkeypatch):
    """The fp32 golden openPangu model (Huawei's reference run) with every mHC site on the Triton
    kernels, as on CUDA: the logits of a 4-token prefix still match the reference's (a few tokens:
    the interpreter runs every program of every site)."""
    from safetensors.torch import load_file

    import exl3_triton
    from exl3_triton.arch.blocks import mhc

    k = triton_kernels.mhc
    calls = []
    for attr, fn in (("_fused_site_partials", k.mhc_site_partials), ("_fused_site_enter", k.mhc_site_enter),
                     ("_fused_site_exit", k.mhc_site_exit)):
        def counted(*args, fn=fn, **kw):
            calls.append(fn.__name__)
            return fn(*args, **kw)
        monkeypatch.setattr(mhc, attr, lambda x, counted=counted: counted)
    model = exl3_triton.load(golden / "openpangu" / "A")
    ref = load_file(str(golden / "openpangu" / "A" / "golden.safetensors"))
    net = model.network
    with torch.inference_mode():
        logits = net.head(net.forward_hidden(ref["ids"][None, :4])[0])
    layers = len(net.layers)
    assert calls.count("mhc_site_partials") == layers and calls.count("mhc_site_exit") == 2 * layers
    want = ref["logits"][:4].double()
    err = ((logits.double() - want).norm(dim=-1) / want.norm(dim=-1)).max()
    assert err < 1e-4, f"max row relative error {err:.3g}"
    assert torch.equal(logits.argmax(-1), ref["logits"][:4].argmax(-1))
