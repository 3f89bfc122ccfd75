"""The tensor bundles the kernels operate on.

``Exl3Weight`` is one EXL3-quantized linear layer as it is stored (see
``docs/exl3-format.md`` in the shared docs, section 2):

    trellis  int16 [k/16, n/16, 16*K]  packed trellis bitstreams, one per 16x16 tile of W_hat
    suh      fp16  [k]                 input-side sign x scale
    svh      fp16  [n]                 output-side sign x scale
    bias     fp16  [n] or None

with ``k = in_features``, ``n = out_features`` (padded to multiples of 16;
in practice 128) and ``K`` bits per weight. The dense weight in ``[in, out]``
orientation is ``W = diag(suh) . H . W_hat . H . diag(svh)`` with ``H`` the
block-diagonal orthonormal 128-point Hadamard matrix.

``DenseWeight`` is an unquantized linear layer in Hugging Face orientation
(``weight [out, in]``), so a model can mix both kinds freely.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

# Bits per weight that the format can store. Integer K uses K bits at every
# trellis position; the half-integer rates (ExLlamaV3 >= 1.6, MUL1 only)
# alternate floor(K) and floor(K)+1 bits between even and odd positions.
INTEGER_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
HALF_INTEGER_BITS = (1.5, 2.5, 3.5)
SUPPORTED_BITS = tuple(float(b) for b in INTEGER_BITS) + HALF_INTEGER_BITS


class Codebook(enum.IntEnum):
    """The procedural codebook that maps a 16-bit trellis state to an fp16 value.

    The integer values match ExLlamaV3's ``cb`` template index.
    """

    THREE_INST = 0  # no marker tensor
    MCG = 1  # ``<key>.mcg`` present
    MUL1 = 2  # ``<key>.mul1`` present

    @property
    def label(self) -> str:
        return {0: "3INST", 1: "MCG", 2: "MUL1"}[int(self)]


# The multiplier each marker tensor must hold (stored as int32). ExLlamaV3 never
# reads the value (the constants are compiled into its kernels) but refuses a
# model whose marker holds anything else, and so do we.
MCG_MULTIPLIER = 0xCBAC1FED
MUL1_MULTIPLIER = 0x83DCD12D


def words_per_tile(bits: float) -> int:
    """int16 words per 16x16 tile for ``bits`` per weight (256*K bits / 16)."""
    return int(round(16 * bits))


def bits_from_words(words: int) -> float | None:
    """Bits per weight from the trellis' last dimension, or None if it is not a valid width."""
    bits = words / 16
    return bits if bits in SUPPORTED_BITS else None


def is_half_integer(bits: float) -> bool:
    return bits != int(bits)


@dataclass
class Exl3Weight:
    """One EXL3 linear layer. ``key`` is its module name, used in error messages."""

    trellis: torch.Tensor
    suh: torch.Tensor
    svh: torch.Tensor
    bits: float
    codebook: Codebook
    bias: torch.Tensor | None = None
    key: str = ""
    # Several linears that read the same input (q/k/v, gate/up), concatenated along the output by
    # ``concat_exl3`` so that one launch computes them all: ``suh`` is then ``[members, in]`` (each
    # member rotates the input with its own signs) and member j owns the next ``out_splits[j]``
    # columns. None for a stored linear.
    out_splits: tuple[int, ...] | None = None
    # Derived data that kernels may attach and reuse (decoded tiles, pointer
    # tables). Never part of the stored format.
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def in_features(self) -> int:
        return self.trellis.shape[0] * 16

    @property
    def out_features(self) -> int:
        return self.trellis.shape[1] * 16

    @property
    def device(self) -> torch.device:
        return self.trellis.device

    @property
    def nbytes(self) -> int:
        n = self.trellis.numel() * 2 + self.suh.numel() * 2 + self.svh.numel() * 2
        if self.bias is not None:
            n += self.bias.numel() * self.bias.element_size()
        return n

    def to(self, device: torch.device | str) -> "Exl3Weight":
        """A copy on ``device`` (trellis stays int16, scales fp16, bias fp16)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Exl3Weight(
            trellis=mv(self.trellis),
            suh=mv(self.suh),
            svh=mv(self.svh),
            bits=self.bits,
            codebook=self.codebook,
            bias=mv(self.bias),
            key=self.key,
            out_splits=self.out_splits,
        )

    def member_suh(self) -> torch.Tensor:
        """``suh`` as ``[members, in]`` (one row for a stored linear)."""
        return self.suh.view(-1, self.in_features)


def concat_exl3(weights: list[Exl3Weight], key: str = "") -> Exl3Weight | None:
    """One weight computing every linear of ``weights`` (all reading the same input) in one matmul,
    or None where they cannot share a launch: different bits, codebook, input width or device, or
    an output width the kernels' 128-column blocks would straddle. The trellis tiles are
    concatenated along the output (each 16x16 tile is encoded on its own, so nothing changes in
    them); see ``Exl3Weight.out_splits``."""
    first = weights[0]
    if len(weights) < 2 or any(
            w.bits != first.bits or w.codebook != first.codebook or w.in_features != first.in_features
            or w.device != first.device or w.out_splits is not None or w.out_features % 128 for w in weights):
        return None
    bias = None
    if any(w.bias is not None for w in weights):  # members without one add zeros (exact)
        bias = torch.cat([w.svh.new_zeros(w.out_features) if w.bias is None else w.bias.to(w.svh.dtype)
                          for w in weights])
    return Exl3Weight(
        trellis=torch.cat([w.trellis for w in weights], dim=1),
        suh=torch.stack([w.suh for w in weights]),
        svh=torch.cat([w.svh for w in weights]),
        bits=first.bits, codebook=first.codebook, bias=bias,
        key=key or "+".join(w.key for w in weights),
        out_splits=tuple(w.out_features for w in weights),
    )


@dataclass
class DenseWeight:
    """An unquantized linear layer, ``weight [out, in]`` as in ``torch.nn.Linear``."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    key: str = ""

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        if self.bias is not None:
            n += self.bias.numel() * self.bias.element_size()
        return n

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "DenseWeight":
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return DenseWeight(weight=mv(self.weight), bias=mv(self.bias), key=self.key)


LinearWeight = Exl3Weight | DenseWeight


@dataclass
class Exl3ExpertStack:
    """The experts of one MoE projection, stacked so one kernel launch can index any of them.

    trellis int16 ``[E, k/16, n/16, 16*K]``, suh fp16 ``[E, k]``, svh fp16 ``[E, n]``.
    All experts must share shape, bits and codebook (as ExLlamaV3's converter
    writes them; the stack refuses anything else by name).
    """

    trellis: torch.Tensor
    suh: torch.Tensor
    svh: torch.Tensor
    bits: float
    codebook: Codebook
    key: str = ""

    @property
    def num_experts(self) -> int:
        return self.trellis.shape[0]

    @property
    def in_features(self) -> int:
        return self.trellis.shape[1] * 16

    @property
    def out_features(self) -> int:
        return self.trellis.shape[2] * 16

    @property
    def device(self) -> torch.device:
        return self.trellis.device

    def expert(self, e: int) -> Exl3Weight:
        return Exl3Weight(self.trellis[e], self.suh[e], self.svh[e], self.bits, self.codebook, key=f"{self.key}[{e}]")

    @staticmethod
    def from_weights(weights: list[Exl3Weight], key: str = "") -> "Exl3ExpertStack":
        if not weights:
            raise ValueError(f"{key}: no experts to stack")
        first = weights[0]
        for w in weights:
            same = (w.trellis.shape == first.trellis.shape and w.bits == first.bits and w.codebook == first.codebook)
            if not same:
                raise ValueError(
                    f"{key}: expert {w.key} is {w.bits:g}-bit {w.codebook.label} {list(w.trellis.shape)} but "
                    f"{first.key} is {first.bits:g}-bit {first.codebook.label} {list(first.trellis.shape)}; "
                    "experts of one projection must match")
            if w.bias is not None:
                raise ValueError(f"{key}: expert {w.key} has a bias, which the stacked MoE path does not support")
        return Exl3ExpertStack(
            trellis=torch.stack([w.trellis for w in weights]),
            suh=torch.stack([w.suh for w in weights]),
            svh=torch.stack([w.svh for w in weights]),
            bits=first.bits, codebook=first.codebook, key=key,
        )
