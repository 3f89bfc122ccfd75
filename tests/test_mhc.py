"""mHC block against a literal, loop-by-loop transcription of architectures.md §0.6."""

from __future__ import annotations

import math

import pytest
import torch

from exl3_triton.arch.blocks import mhc
from exl3_triton.arch.blocks.mhc import HyperHead, HyperSite, expand, run_sites, sinkhorn
from exl3_triton.arch.blocks.norm import RMSNorm


def _literal_site(x, phi, scale, base, gamma, block, n, iters=20):
    """One token at a time, scalar loops: the spec's formulas as written."""
    out_rows = []
    for t in range(x.shape[0]):
        flat = x[t].reshape(-1).double()
        rms = math.sqrt(float((flat ** 2).mean()) + 1e-6)
        r = flat / rms * (gamma.double() if gamma is not None else 1)
        mix = phi.double() @ r
        sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
        pre = [sig(mix[i] * scale[0] + base[i]) + 1e-6 for i in range(n)]
        post = [2 * sig(mix[n + i] * scale[1] + base[n + i]) for i in range(n)]
        c = [[float(mix[2 * n + i * n + j] * scale[2] + base[2 * n + i * n + j]) for j in range(n)] for i in range(n)]
        for i in range(n):  # row softmax
            m = max(c[i])
            e = [math.exp(v - m) for v in c[i]]
            c[i] = [v / sum(e) + 1e-6 for v in e]

        def col_norm():
            for j in range(n):
                s = sum(c[i][j] for i in range(n)) + 1e-6
                for i in range(n):
                    c[i][j] /= s

        col_norm()
        for _ in range(iters - 1):
            for i in range(n):
                s = sum(c[i]) + 1e-6
                c[i] = [v / s for v in c[i]]
            col_norm()
        y = sum(pre[i] * x[t, i].double() for i in range(n))
        o = block(y.float()).double()
        out_rows.append(torch.stack([post[j] * o + sum(c[i][j] * x[t, i].double() for i in range(n))
                                     for j in range(n)]))
    return torch.stack(out_rows).float()


@pytest.mark.parametrize("with_gamma", [False, True])
def test_site_matches_the_literal_formula(with_gamma):
    g = torch.Generator().manual_seed(0)
    n, d, t = 4, 8, 3
    x = torch.randn(t, n, d, generator=g)
    phi = torch.randn((2 + n) * n, n * d, generator=g) * 0.3
    scale, base = torch.tensor([0.7, 1.3, 2.0]), torch.randn((2 + n) * n, generator=g)
    gamma = torch.rand(n * d, generator=g) + 0.5 if with_gamma else None
    w = torch.randn(d, d, generator=g)
    block = lambda v: torch.tanh(v @ w)  # noqa: E731
    site = HyperSite(phi, scale, base, n, gamma=gamma)
    got = site(x, block)
    want = _literal_site(x, phi, scale, base, gamma, block, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _site_kernels(kind: str):
    """The three site kernels ``run_sites`` takes on CUDA, as run here: the Triton kernels under the
    interpreter, or the PyTorch references bench/count_ops.py stands in with."""
    if kind == "triton":
        from exl3_triton.kernels import triton_ops

        k = triton_ops.load().mhc
        return k.mhc_site_partials, k.mhc_site_enter, k.mhc_site_exit
    return mhc.site_partials_reference, mhc.site_enter_reference, mhc.site_exit_reference


@pytest.mark.parametrize("kind", ["pytorch", "references", "triton"])
def test_consecutive_sites_match_the_literal_formula(kind, monkeypatch):
    """Two sites in a row (attention then MLP): the fused path hands the second site's partials
    from the first site's update."""
    g = torch.Generator().manual_seed(3)
    n, d = 4, 40
    x = torch.randn(5, n, d, generator=g) * 2
    sites, blocks = [], []
    for with_gamma in (True, False):
        phi = torch.randn((2 + n) * n, n * d, generator=g) * 0.3
        scale, base = torch.rand(3, generator=g) + 0.5, torch.randn((2 + n) * n, generator=g)
        gamma = torch.rand(n * d, generator=g) + 0.5 if with_gamma else None
        w = torch.randn(d, d, generator=g) / d ** 0.5
        sites.append((phi, scale, base, gamma))
        blocks.append(lambda v, w=w: torch.tanh(v @ w) * 3)
    if kind != "pytorch":
        for attr, fn in zip(("_fused_site_partials", "_fused_site_enter", "_fused_site_exit"), _site_kernels(kind)):
            monkeypatch.setattr(mhc, attr, lambda x, fn=fn: fn)
    called = []
    # the first block with its input norm handed to the site (fused into the site's kernel on CUDA)
    norm = RMSNorm(torch.rand(d, generator=g) + 0.5, 1e-5)
    got = run_sites(x, (HyperSite(*sites[0][:3], n, gamma=sites[0][3]),
                        lambda v: called.append(v.shape) or blocks[0](v), norm, torch.float32),
                    (HyperSite(*sites[1][:3], n, gamma=sites[1][3]), lambda v: called.append(v.shape) or blocks[1](v)))
    assert called == [(5, d)] * 2
    want = x
    blocks[0] = lambda v, b=blocks[0]: b(norm(v))
    for (phi, scale, base, gamma), block in zip(sites, blocks):
        want = _literal_site(want, phi, scale, base, gamma, block, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_sinkhorn_is_doubly_stochastic():
    # moderate logits (sharp ones need more than 20 iterations to balance the rows, in every reference)
    c = sinkhorn(torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(1)), iters=20)
    torch.testing.assert_close(c.sum(-2), torch.ones(5, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(c.sum(-1), torch.ones(5, 4), atol=1e-3, rtol=0)


def test_head_and_expand():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(3, 8, generator=g)
    x = expand(emb, 4)
    assert x.shape == (3, 4, 8) and torch.equal(x[:, 2], emb)
    phi, base = torch.randn(4, 32, generator=g), torch.randn(4, generator=g)
    head = HyperHead(phi, torch.tensor([0.5]), base, 4)
    xs = torch.randn(3, 4, 8, generator=g)
    flat = xs.reshape(3, 32)
    r = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6)
    pre = torch.sigmoid(r @ phi.T * 0.5 + base) + 1e-6
    torch.testing.assert_close(head(xs), (pre[:, :, None] * xs).sum(1))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="do not fit 4 streams"):
        HyperSite(torch.zeros(23, 32), torch.zeros(3), torch.zeros(24), 4)
