"""Input Hessians of linear layers, and what the quantizer derives from them.

Format reference: shared ``exl3-format.md`` section 6.2.

For a linear ``y = x W`` with ``W [k, n]``, the quantization error ``E`` costs
``tr(E^T H E)`` on the calibration data, ``H = sum x^T x / count`` over every
input row seen. Linears that read the same input (q/k/v, gate/up) share one
``H``, one set of input sign flips ``su0`` and one LDL factor, exactly as in
the reference converter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.reference.hadamard import hadamard_128_ref

SIGMA_REG = 0.025  # diagonal damping, as a fraction of the mean diagonal
LDL_BLOCK = 16  # LDLQ works on 16-row blocks (one row of tiles)
CHOLESKY_RETRIES = 10


class HessianAccumulator:
    """Running ``sum x^T x`` over the inputs of one linear, in fp32, at the padded width ``features``.

    Inputs narrower than ``features`` are zero-padded (the weight is padded the
    same way, exl3-format.md 2.3). Rows containing inf/NaN are dropped.
    """

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.features = features
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=torch.float32)
        x = x[torch.isfinite(x).all(dim=1)]
        if x.shape[-1] < self.features:
            x = torch.nn.functional.pad(x, (0, self.features - x.shape[-1]))
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def finalize(self, sigma_reg: float = SIGMA_REG) -> torch.Tensor | None:
        """``H / count + sigma_reg * mean(diag) * I``, or None when the data cannot support LDLQ.

        None (the reference's "fallback" mode) means: no rows, a non-finite
        result, or a mean diagonal below 1e-20 (inputs that are all ~zero).
        """
        if self.count == 0:
            return None
        h = self.sum / self.count
        diag_mean = h.diagonal().mean().item()
        if not torch.isfinite(torch.tensor(diag_mean)) or diag_mean < 1e-20:
            return None
        h.diagonal().add_(sigma_reg * diag_mean)
        return h


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """n random +-1 (fp32)."""
    return (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).float()


def rotate_both_sides(h: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``Hk . diag(signs) . H . diag(signs) . Hk`` with ``Hk`` the blockwise 128-point Hadamard."""
    h = h * signs[None, :] * signs[:, None]
    h = hadamard_128_ref(h)  # right: H . Hk
    return hadamard_128_ref(h.T).T  # left: Hk . H  (Hk symmetric)


def block_ldl(h: torch.Tensor, block: int = LDL_BLOCK) -> torch.Tensor:
    """The unit block-lower-triangular factor ``L`` of ``H = L D L^T`` with its diagonal blocks zeroed.

    ``L`` comes from the Cholesky factor with each ``block``-wide column block
    multiplied by the inverse of its diagonal block. If Cholesky fails, the
    diagonal is damped further (by ``2 * sigma_reg * mean(diag)``) up to 10 times.
    """
    n = h.shape[0]
    h = h.double()  # the factor feeds every error-feedback step: keep it accurate
    for attempt in range(CHOLESKY_RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        if attempt == CHOLESKY_RETRIES:
            raise torch.linalg.LinAlgError("Hessian is not positive definite even after damping")
        h = h.clone()
        h.diagonal().add_(2 * SIGMA_REG * h.diagonal().mean())
    m = n // block
    blocks = chol.view(n, m, block)
    diag_blocks = torch.stack([chol[i * block : (i + 1) * block, i * block : (i + 1) * block] for i in range(m)])
    unit = torch.einsum("rmb,mbc->rmc", blocks, torch.linalg.inv(diag_blocks)).reshape(n, n)
    for i in range(m):
        unit[i * block : (i + 1) * block, i * block : (i + 1) * block] = 0
    return unit.float()


@dataclass
class PreparedHessian:
    """What the quantizer needs from one shared Hessian.

    su0       fp32 [k]      input sign flips (shared by every linear reading this input)
    rotated   fp32 [k, k]   Hk . diag(su0) . H . diag(su0) . Hk, for the proxy error
    ldl       fp32 [k, k]   block-LDL factor of ``rotated``, diagonal blocks zero
    diag      fp32 [k]      diagonal of H (damped, unrotated), for the output-scale rule
    """

    su0: torch.Tensor
    rotated: torch.Tensor
    ldl: torch.Tensor
    diag: torch.Tensor


def prepare_hessian(h: torch.Tensor, generator: torch.Generator) -> PreparedHessian:
    su0 = random_signs(h.shape[0], generator).to(h.device)
    rotated = rotate_both_sides(h, su0)
    return PreparedHessian(su0=su0, rotated=rotated, ldl=block_ldl(rotated), diag=h.diagonal().clone())
