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


def _fused_weights(x: torch.Tensor):
    """The Triton site-weights kernel (kernels/triton_mhc.py) for ``x``'s device, or None where it
    cannot run (then ``site_weights_reference``; bench/count_ops.py stands in for it on a CPU)."""
    from ...kernels import triton_ops

    return triton_ops.cuda_kernel(x, "mhc", "mhc_weights_triton")


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
        pre, post, comb = self.weights(x)
        return self.update(x, block(self.collapse(x, pre)), post, comb)


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
