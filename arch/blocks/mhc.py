"""mHC: manifold-constrained hyper-connections (DeepSeek-V4 and OpenPanguV2).

The residual stream is ``N`` parallel streams per token, ``X [T, N, D]``, kept in
fp32 (all references do). Around each block "site" (attention, MLP) a small
projection of the RMS-normalised streams yields three sets of weights:

* ``pre [T, N]``:  how the streams collapse into the block's input;
* ``post [T, N]``: how much of the block's output each stream receives;
* ``comb [T, N, N]``: a doubly-stochastic mixing of the old streams
  (``comb[i, j]``: from source stream ``i`` into destination stream ``j``),
  made so by Sinkhorn iterations.

``X'[j] = post[j] * out + sum_i comb[i, j] * X[i]``. The direction matters: the
new stream ``j`` reads column ``j`` (architectures.md §0.6).

At the model's exit ``HyperHead`` collapses the streams with its own
``pre`` weights (no mixing). The embedding enters as ``N`` copies (``expand``).
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import rms_norm


def _normalised(x: torch.Tensor, gamma: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Unweighted RMS over all ``N * D`` values of a token, then Pangu's optional gamma (one
    fused kernel on CUDA: it runs twice per layer in a decode step)."""
    return rms_norm(x.flatten(-2).float(), gamma, eps)


def _triton_kernel(name: str):
    """A getter ``x -> kernels/triton_mhc.py's `name` for x's device``, None where it cannot run (the
    PyTorch path then; bench/count_ops.py stands in for these getters on a CPU)."""
    def get(x: torch.Tensor):
        from ...kernels import triton_ops

        return triton_ops.cuda_kernel(x, "mhc", name)
    get.__name__ = f"_fused_{name}"
    return get


# the site weights alone (``site_weights_reference``)
_fused_weights = _triton_kernel("mhc_weights_triton")
# a whole site in three launches (``run_sites``; references: ``site_*_reference`` below)
_fused_site_partials = _triton_kernel("mhc_site_partials")
_fused_site_enter = _triton_kernel("mhc_site_enter")
_fused_site_exit = _triton_kernel("mhc_site_exit")


def sinkhorn(logits: torch.Tensor, iters: int, eps: float = 1e-6) -> torch.Tensor:
    """``[..., N, N]`` logits -> nearly doubly-stochastic matrix: a row softmax, then
    alternating column / row normalisations (``iters`` column steps in all)."""
    c = torch.softmax(logits, dim=-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def site_weights_reference(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, streams: int, iters: int,
                           pre_eps: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mix [..., (2+N)*N]`` (the projected, normalised streams) -> ``pre``, ``post``, ``comb``."""
    n = streams
    pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
    b_pre, b_post, b_comb = base.split([n, n, n * n])
    pre = torch.sigmoid(pre_w * scale[0] + b_pre) + pre_eps
    post = 2 * torch.sigmoid(post_w * scale[1] + b_post)
    comb = sinkhorn((comb_w * scale[2] + b_comb).unflatten(-1, (n, n)), iters, eps)
    return pre, post, comb


def expand(x: torch.Tensor, streams: int) -> torch.Tensor:
    """Model entry: the embedding ``[T, D]`` copied into every stream -> ``[T, N, D]`` fp32."""
    return x.float().unsqueeze(-2).expand(*x.shape[:-1], streams, x.shape[-1]).contiguous()


class HyperSite(nn.Module):
    """The mHC weights around one block site.

    phi:   ``[(2 + N) * N, N * D]`` projection (V4 ``hc_attn_fn`` / ``hc_ffn_fn``, Pangu ``phi.weight``).
    scale: ``[3]`` multipliers for the pre, post and comb logits (V4 ``hc_*_scale``, Pangu ``branch_alpha``).
    base:  ``[(2 + N) * N]`` offsets in the same order (V4 ``hc_*_base``, Pangu ``branch_beta``).
    gamma: ``[N * D]`` weight of the RMS normalisation (Pangu ``norm_gamma``; None in V4).
    """

    def __init__(self, phi: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, streams: int, *,
                 gamma: torch.Tensor | None = None, eps: float = 1e-6, pre_eps: float = 1e-6,
                 sinkhorn_iters: int = 20, sinkhorn_eps: float = 1e-6):
        super().__init__()
        n = streams
        if phi.shape[0] != (2 + n) * n or base.numel() != (2 + n) * n or scale.numel() != 3:
            raise ValueError(f"mHC site tensors do not fit {n} streams: phi {tuple(phi.shape)}, "
                             f"scale {tuple(scale.shape)}, base {tuple(base.shape)}")
        self.register_buffer("phi", phi.float())
        self.register_buffer("scale", scale.float().reshape(3))
        self.register_buffer("base", base.float().reshape(-1))
        self.register_buffer("gamma", None if gamma is None else gamma.float().reshape(-1))
        self.streams, self.eps, self.pre_eps = n, eps, pre_eps
        self.iters, self.sinkhorn_eps = sinkhorn_iters, sinkhorn_eps

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [T, N, D]`` -> ``pre [T, N]``, ``post [T, N]``, ``comb [T, N, N]`` (fp32)."""
        n = self.streams
        mix = _normalised(x, self.gamma, self.eps) @ self.phi.T
        fused = _fused_weights(x)
        if fused is not None:  # one launch instead of ~130 small ones (decode speed)
            lead = mix.shape[:-1]
            pre, post, comb = fused(mix.reshape(-1, mix.shape[-1]), self.scale, self.base, n, self.iters,
                                    self.pre_eps, self.sinkhorn_eps)
            return pre.view(*lead, n), post.view(*lead, n), comb.view(*lead, n, n)
        return site_weights_reference(mix, self.scale, self.base, n, self.iters, self.pre_eps, self.sinkhorn_eps)

    @staticmethod
    def collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """The block's input: ``sum_i pre[i] * X[i]`` -> ``[T, D]`` fp32."""
        return torch.einsum("tn,tnd->td", pre, x)

    @staticmethod
    def update(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """``X'[j] = post[j] * out + sum_i comb[i, j] * X[i]`` (the mixing added by the batched
        matmul itself: one kernel fewer per site)."""
        return torch.baddbmm(post.unsqueeze(-1) * out.float().unsqueeze(-2), comb.transpose(-1, -2), x)

    def forward(self, x: torch.Tensor, block) -> torch.Tensor:
        """Run ``block`` (``[T, D] -> [T, D]``) at this site of the residual streams ``x [T, N, D]``."""
        return run_sites(x, (self, block))

    def forward_unfused(self, x: torch.Tensor, block) -> torch.Tensor:
        """``forward`` as separate PyTorch ops (the CPU path, and the oracle of the fused one)."""
        pre, post, comb = self.weights(x)
        return self.update(x, block(self.collapse(x, pre)), post, comb)


def run_sites(x: torch.Tensor, *sites: tuple) -> torch.Tensor:
    """Run consecutive sites on the streams ``x [T, N, D]``: each block at its site, the next site
    reading the streams the previous one left. A site is ``(site, block)`` -- ``block`` maps the
    collapsed input ``[T, D]`` fp32 to its output ``[T, D]`` -- or ``(site, block, norm, dtype)``:
    ``block`` gets ``norm(collapsed).to(dtype)`` (``norm`` an ``RMSNorm``: the block's input norm).

    On CUDA a site is three Triton launches (kernels/triton_mhc.py): the norm and projection as
    chunk partials, the weights and the collapse (with the block's norm and cast), and the update
    -- which, where another site follows here, also computes that site's partials (one launch
    fewer per pair of sites). Elsewhere each site runs ``HyperSite.forward_unfused``."""
    kernels = (_fused_site_partials(x), _fused_site_enter(x), _fused_site_exit(x))
    if any(k is None for k in kernels):
        for site, block, *norm in sites:
            x = site.forward_unfused(x, block if not norm else _normed(block, *norm))
        return x
    partials, enter, exit_ = kernels
    n, d = x.shape[-2:]
    for site, *_ in sites:
        if site.streams != n or site.phi.shape[1] != n * d:
            raise ValueError(f"mHC site of {site.streams} streams x {site.phi.shape[1] // site.streams} "
                             f"does not fit streams {tuple(x.shape)}")
    part = partials(x, sites[0][0].phi, sites[0][0].gamma)
    for k, (site, block, *norm) in enumerate(sites):
        block_norm = (norm[0].weight, norm[0].eps, norm[1]) if norm else None
        y, _, post, comb = enter(x, *part, site.scale, site.base, n, site.iters, site.eps, site.pre_eps,
                                 site.sinkhorn_eps, block_norm)
        out = block(y)
        nxt = sites[k + 1][0] if k + 1 < len(sites) else None
        x, part = exit_(x, out, post, comb, None if nxt is None else nxt.phi, None if nxt is None else nxt.gamma)
    return x


def _normed(block, norm, dtype: torch.dtype):
    return lambda y: block(norm(y).to(dtype))


# What the three site kernels compute, in PyTorch with one chunk (``S = 1``): bench/count_ops.py runs
# these in their place on a CPU. The kernels are checked against ``HyperSite``'s own PyTorch path.

def site_partials_reference(x: torch.Tensor, phi: torch.Tensor, gamma: torch.Tensor | None):
    """``x [T, N, D]`` -> ``dots [T, 1, M]`` of ``(x * gamma) @ phi^T`` and ``sumsq [T, 1]`` of ``x^2``."""
    flat = x.flatten(-2).float()
    weighted = flat if gamma is None else flat * gamma
    return (weighted @ phi.T).unsqueeze(1), flat.pow(2).sum(-1, keepdim=True)


def site_enter_reference(x: torch.Tensor, dots: torch.Tensor, sumsq: torch.Tensor, scale: torch.Tensor,
                         base: torch.Tensor, streams: int, iters: int, norm_eps: float, pre_eps: float, eps: float,
                         block_norm: tuple[torch.Tensor | None, float, torch.dtype] | None = None):
    """Partials -> the block input ``[T, D]`` (with ``block_norm = (weight, eps, dtype)``: normed and
    cast) and ``pre``, ``post``, ``comb``."""
    n, d = x.shape[-2:]
    rinv = torch.rsqrt(sumsq.sum(1, keepdim=True) / (n * d) + norm_eps)
    mix = dots.sum(1)[:, :(2 + n) * n] * rinv
    pre, post, comb = site_weights_reference(mix, scale, base, streams, iters, pre_eps, eps)
    y = HyperSite.collapse(x, pre)
    if block_norm is not None:
        y = rms_norm(y, block_norm[0], block_norm[1]).to(block_norm[2])
    return y, pre, post, comb


def site_exit_reference(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                        next_phi: torch.Tensor | None = None, next_gamma: torch.Tensor | None = None):
    """The update, and the next site's partials where ``next_phi`` is given."""
    new = HyperSite.update(x, out, post, comb)
    return new, None if next_phi is None else site_partials_reference(new, next_phi, next_gamma)


class HyperHead(nn.Module):
    """Model exit: collapse the streams with ``pre = sigmoid(phi x * scale + base) + pre_eps``.

    phi ``[N, N * D]`` (V4 ``hc_head_fn``), scale ``[1]``, base ``[N]``; gamma as in ``HyperSite``.
    """

    def __init__(self, phi: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, streams: int, *,
                 gamma: torch.Tensor | None = None, eps: float = 1e-6, pre_eps: float = 1e-6):
        super().__init__()
        if phi.shape[0] != streams or base.numel() != streams or scale.numel() != 1:
            raise ValueError(f"mHC head tensors do not fit {streams} streams: phi {tuple(phi.shape)}, "
                             f"scale {tuple(scale.shape)}, base {tuple(base.shape)}")
        self.register_buffer("phi", phi.float())
        self.register_buffer("scale", scale.float().reshape(1))
        self.register_buffer("base", base.float().reshape(-1))
        self.register_buffer("gamma", None if gamma is None else gamma.float().reshape(-1))
        self.eps, self.pre_eps = eps, pre_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = _normalised(x, self.gamma, self.eps) @ self.phi.T
        pre = torch.sigmoid(mix * self.scale + self.base) + self.pre_eps
        return HyperSite.collapse(x, pre)
