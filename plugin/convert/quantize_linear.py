"""Quantize one linear layer (or several sharing an input) to EXL3 tensors.

Format reference: shared ``exl3-format.md`` sections 6.3 - 6.6.

    W [k, n] (= HF weight^T, zero-padded to multiples of 128)
      -> regularise:  W_reg = Hk . diag(su)^-1 . W . diag(sv)^-1 . Hn      (rows and columns ~ codebook RMS)
      -> global scale: W_reg *= g, su /= g                                  (g from test-encoding sample tiles)
      -> LDLQ: encode 16-row blocks from last to first, each corrected by the
         error of the blocks already done, through the block-LDL factor of H
      -> pack the chosen states; suh = fp16(su), svh = fp16(sv)

so that the stored weight decodes to ``diag(suh) . Hk . W_hat . Hn . diag(svh)``
(section 3.5). Without calibration data the same loop runs without the error
feedback (the reference's "fallback" mode) and the scale search uses plain MSE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.reference.codebook import CODEBOOK_RMS
from ..kernels.reference.hadamard import hadamard_128_ref
from ..kernels.reference.linear import exl3_weight_ref
from ..kernels.reference.trellis import matrix_to_tiles, tiles_to_matrix
from ..kernels.weights import MCG_MULTIPLIER, MUL1_MULTIPLIER, Codebook, Exl3Weight
from .hessian import LDL_BLOCK, PreparedHessian, random_signs
from .scale_search import search_global_scale
from .tile_encoder import encode_tiles, pack_states

OUT_SCALES_MODES = ("always", "never", "auto")
# "auto": fold output-channel RMS into svh unless the layer's input is very
# irregular: the top 2% of channels (by sqrt of the Hessian diagonal) carrying
# 15% or more of the total (the reference's rule, 1.4.x).
SKEW_TOP_FRACTION = 1 / 50
SKEW_LIMIT = 0.15


@dataclass(frozen=True)
class QuantizeOptions:
    bits: float
    codebook: Codebook
    out_scales: str = "auto"
    scale_search: str = "full"  # "full", "fast" or "none", see scale_search.py
    memory_budget: int = 1 << 30  # bytes of Viterbi work buffers per batch of tiles
    encoder_backend: str = "auto"  # tile encoder: "auto" (Triton on CUDA), "torch" or "triton"


@dataclass
class QuantizedLinear:
    """The stored tensors of one EXL3 linear plus what the converter knows about its quality.

    ``predicted_error`` is ``||W_q - W|| / ||W||`` over the unpadded weight,
    with ``W_q`` rebuilt from the encoder's own decoded values (not from the
    packed trellis), so that decoding the written file and comparing checks
    the whole path from encoder to disk.
    """

    key: str
    tensors: dict[str, torch.Tensor]  # suffix ("trellis", "suh", ...) -> tensor
    bits: float
    codebook: Codebook
    predicted_error: float
    proxy_error: float | None  # tr(E H E^T) / tr(W H W^T) in the rotated domain; None without calibration
    global_scale: float
    out_scales_applied: bool
    extra: dict = field(default_factory=dict)


def padded(n: int, multiple: int = 128) -> int:
    return -(-n // multiple) * multiple


def _channel_rms(w: torch.Tensor, dim: int) -> torch.Tensor:
    return w.square().mean(dim=dim).sqrt()


def _input_skew(diag: torch.Tensor) -> float:
    root = diag.clamp(min=0).sqrt().sort(descending=True).values
    cutoff = root.shape[0] // 50
    return (root[:cutoff].sum() / root.sum()).item()


@dataclass
class Regularized:
    weight: torch.Tensor  # fp32 [k, n], W_reg
    su: torch.Tensor  # fp32 [k]
    sv: torch.Tensor  # fp32 [n]
    out_scales_applied: bool


def regularize(
    w: torch.Tensor,
    su0: torch.Tensor,
    sv0: torch.Tensor,
    codebook: Codebook,
    out_scales: str,
    hessian_diag: torch.Tensor | None,
) -> Regularized:
    """Bring ``w [k, n]`` to the codebook's distribution (before the global scale), section 6.3."""
    if out_scales == "auto":
        apply = hessian_diag is None or _input_skew(hessian_diag) < SKEW_LIMIT
    else:
        apply = out_scales == "always"

    oc = _channel_rms(w, dim=0)
    mean = oc.mean()
    zero_columns = oc < 1e-30
    sv = sv0.clone()
    if apply and mean > 1e-30:
        oc = oc / mean
        oc[zero_columns] = 0.1
        sv = sv0 * oc + 1e-10
    w = w / sv[None, :]
    sv[zero_columns] = 0.0  # dead output channels decode to exactly zero
    w = hadamard_128_ref(w)  # . Hn

    ic = _channel_rms(w, dim=1)
    ic[ic < 1e-30] = 0.1
    # The reference's sign convention (a negative normalisation) is kept so that
    # our suh/svh look like its own.
    su = su0 * ic / (-CODEBOOK_RMS[codebook]) + 1e-10
    w = w / su[:, None]
    w = hadamard_128_ref(w.T).T  # Hk .
    return Regularized(w, su, sv, apply)


def ldlq(
    w_reg: torch.Tensor,
    ldl: torch.Tensor | None,
    bits: float,
    codebook: Codebook,
    *,
    memory_budget: int = 1 << 30,
    progress=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``w_reg [k, n]`` one 16-row block at a time, last block first (section 6.6).

    Each block's target is its own rows plus the error of every later block fed
    back through the LDL factor: ``target_R = W_R + sum_{S after R} L[S, R]^T (W_S - Q_S)``.
    With ``ldl=None`` there is no feedback (fallback mode).

    Returns the decoded values fp32 ``[k, n]`` and the states int64 ``[k/16, n/16, 256]``.
    """
    k, n = w_reg.shape
    tiles_k = k // LDL_BLOCK
    if ldl is None:
        # No feedback: every tile is independent, so encode them all in one batch.
        encoded = encode_tiles(matrix_to_tiles(w_reg).reshape(-1, 256), bits, codebook, memory_budget=memory_budget,
                               backend=backend)
        if progress is not None:
            progress(tiles_k, tiles_k)
        states = encoded.states.view(tiles_k, n // 16, 256)
        return tiles_to_matrix(encoded.values.view(tiles_k, n // 16, 256)), states
    values = torch.zeros_like(w_reg)
    states = torch.zeros(tiles_k, n // 16, 256, dtype=torch.int64, device=w_reg.device)
    feedback = torch.zeros_like(w_reg) if ldl is not None else None
    for r in reversed(range(tiles_k)):
        rows = slice(r * LDL_BLOCK, (r + 1) * LDL_BLOCK)
        target = w_reg[rows] if feedback is None else w_reg[rows] + feedback[rows]
        encoded = encode_tiles(matrix_to_tiles(target)[0], bits, codebook, memory_budget=memory_budget,
                               backend=backend)
        values[rows] = tiles_to_matrix(encoded.values[None])
        states[r] = encoded.states
        if feedback is not None and r > 0:
            err = w_reg[rows] - values[rows]
            feedback[: rows.start].addmm_(ldl[rows, : rows.start].T, err)
        if progress is not None:
            progress(tiles_k - r, tiles_k)
    return values, states


def _trace_form(e: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(E^T H E)`` for ``E [k, n]``, ``H [k, k]``."""
    return (e * (h @ e)).sum().item()


def codebook_marker(codebook: Codebook) -> dict[str, torch.Tensor]:
    """The int32 scalar that selects the codebook (none for 3INST), section 2."""
    if codebook == Codebook.MCG:
        return {"mcg": torch.tensor(MCG_MULTIPLIER - (1 << 32), dtype=torch.int32)}
    if codebook == Codebook.MUL1:
        return {"mul1": torch.tensor(MUL1_MULTIPLIER - (1 << 32), dtype=torch.int32)}
    return {}


@dataclass
class LinearToQuantize:
    """One linear of a group sharing an input: its key, HF weight ``[out, in]`` and optional bias."""

    key: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def quantize_linears(
    linears: list[LinearToQuantize],
    hessian: PreparedHessian | None,
    options: QuantizeOptions,
    generator: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    progress=None,
) -> list[QuantizedLinear]:
    """Quantize linears that share one input (and so one Hessian) at the same bits and codebook.

    Each gets its own output signs, scales and global scale; their regularised
    weights are then concatenated along the output dimension and run through
    one LDLQ pass, which is exact (LDLQ treats columns independently given L)
    and gives the tile encoder bigger batches.

    ``hessian=None`` is the uncalibrated path: plain MSE, no error feedback.
    """
    in_features = linears[0].weight.shape[1]
    k = padded(in_features)
    if hessian is not None and hessian.su0.shape[0] != k:
        raise ValueError(f"{linears[0].key}: Hessian is {hessian.su0.shape[0]} wide but the weight needs {k}")
    su0 = hessian.su0 if hessian is not None else random_signs(k, generator).to(device)

    prepared = []
    for lin in linears:
        if lin.weight.shape[1] != in_features:
            raise ValueError(f"{lin.key}: in_features {lin.weight.shape[1]} differs from {linears[0].key}")
        out_features = lin.weight.shape[0]
        w = lin.weight.to(device=device, dtype=torch.float32).T
        w = torch.nn.functional.pad(w, (0, padded(out_features) - out_features, 0, k - in_features))
        sv0 = random_signs(w.shape[1], generator).to(device)
        reg = regularize(w, su0, sv0, options.codebook, options.out_scales,
                         hessian.diag if hessian is not None else None)
        scale = search_global_scale(reg.weight, options.bits, options.codebook, options.scale_search,
                                    memory_budget=options.memory_budget, backend=options.encoder_backend)
        reg.weight *= scale
        reg.su /= scale
        prepared.append((lin, w, reg, scale))

    w_cat = torch.cat([reg.weight for _, _, reg, _ in prepared], dim=1)
    values, states = ldlq(w_cat, hessian.ldl if hessian is not None else None, options.bits, options.codebook,
                          memory_budget=options.memory_budget, progress=progress, backend=options.encoder_backend)

    results = []
    col = 0
    for lin, w, reg, scale in prepared:
        n = w.shape[1]
        q_values, q_states = values[:, col : col + n], states[:, col // 16 : (col + n) // 16]
        col += n
        tensors = {
            "suh": reg.su.half().cpu(),
            "svh": reg.sv.half().cpu(),
            "trellis": pack_states(q_states, options.bits).cpu(),
            **codebook_marker(options.codebook),
        }
        if lin.bias is not None:
            bias = lin.bias.to(torch.float16).cpu()
            tensors["bias"] = torch.nn.functional.pad(bias, (0, n - bias.shape[0]))
        # Rebuilt from the stored suh/svh (fp16, as written) on the working device: on a GPU this
        # takes milliseconds where the CPU took ~3 s for an 8192 x 8192 weight (bench/convert.py).
        rebuilt = exl3_weight_ref(
            Exl3Weight(tensors["trellis"], tensors["suh"].to(q_values.device), tensors["svh"].to(q_values.device),
                       options.bits, options.codebook),
            inner=q_values,
        )
        out_features, in_f = lin.weight.shape
        diff = rebuilt[:in_f, :out_features].double() - w[:in_f, :out_features].double()
        predicted = (diff.norm() / w.double().norm().clamp(min=1e-30)).item()
        proxy = None
        if hessian is not None:
            err = reg.weight - q_values
            proxy = _trace_form(err, hessian.rotated) / max(_trace_form(reg.weight, hessian.rotated), 1e-30)
        results.append(QuantizedLinear(
            key=lin.key, tensors=tensors, bits=options.bits, codebook=options.codebook,
            predicted_error=predicted, proxy_error=proxy, global_scale=scale,
            out_scales_applied=reg.out_scales_applied,
        ))
    return results
