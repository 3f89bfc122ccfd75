"""``ConvertOptions``: every converter option, checked up front with errors that name the option."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import InvalidArgumentError
from ..kernels.weights import HALF_INTEGER_BITS, Codebook
from .quantize_linear import OUT_SCALES_MODES
from .scale_search import SCALE_SEARCH_MODES

CODEBOOKS = {"mcg": Codebook.MCG, "mul1": Codebook.MUL1, "3inst": Codebook.THREE_INST}
UNQUANTIZED_HEAD = 16


@dataclass(frozen=True)
class ConvertOptions:
    """What to produce. ``bits`` is the average over the decoder linears (a mix of rates, see allocation.py).

    ``head_bits``: 1-8, 1.5/2.5/3.5 with MUL1, or 16 to keep the head fp16.
    ``calibrate=False`` skips calibration: no Hessians, no LDLQ, plain MSE (fast, lower quality).
    ``scale_search``: "full" (the reference's), "fast" or "none" (see scale_search.py).
    """

    bits: float
    head_bits: float = 6
    codebook: str = "mul1"
    cal_rows: int = 250
    cal_cols: int = 2048
    calibrate: bool = True
    out_scales: str = "auto"
    scale_search: str = "full"
    device: str = "cpu"
    seed: int = 0
    shard_size_mb: int = 8192
    memory_budget_mb: int = 1024  # Viterbi work buffers per batch of tiles

    def __post_init__(self):
        if self.codebook not in CODEBOOKS:
            raise InvalidArgumentError(f"--codebook {self.codebook!r}: choose one of {', '.join(CODEBOOKS)}")
        if not 1 <= self.bits <= 8:
            raise InvalidArgumentError(f"--bits {self.bits:g} is out of range: the average must be between 1 and 8")
        if self.head_bits != UNQUANTIZED_HEAD:
            if not (1 <= self.head_bits <= 8 and (float(self.head_bits).is_integer()
                                                    or self.head_bits in HALF_INTEGER_BITS)):
                raise InvalidArgumentError(
                    f"--head-bits {self.head_bits:g}: use an integer 1-8, 1.5/2.5/3.5 (MUL1 codebook), "
                    "or 16 to keep the head unquantized")
            if self.head_bits in HALF_INTEGER_BITS and self.codebook != "mul1":
                raise InvalidArgumentError(
                    f"--head-bits {self.head_bits:g} is a half-integer rate, which exists only with the MUL1 "
                    f"codebook; got --codebook {self.codebook}")
        if self.cal_rows < 1 or self.cal_cols < 1:
            raise InvalidArgumentError(f"--cal-rows/--cal-cols must be positive, got {self.cal_rows} x {self.cal_cols}")
        if self.out_scales not in OUT_SCALES_MODES:
            raise InvalidArgumentError(f"--out-scales {self.out_scales!r}: choose one of {', '.join(OUT_SCALES_MODES)}")
        if self.scale_search not in SCALE_SEARCH_MODES:
            raise InvalidArgumentError(
                f"--scale-search {self.scale_search!r}: choose one of {', '.join(SCALE_SEARCH_MODES)}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise InvalidArgumentError(f"--device {self.device!r} is not a device name (cpu, cuda, cuda:N)") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgumentError(f"--device {self.device}: CUDA is not available on this machine")
        if device.type not in ("cpu", "cuda"):
            raise InvalidArgumentError(f"--device {self.device}: the converter runs on cpu or cuda")
        if self.shard_size_mb < 1:
            raise InvalidArgumentError(f"--shard-size must be at least 1 MB, got {self.shard_size_mb}")

    @property
    def codebook_enum(self) -> Codebook:
        return CODEBOOKS[self.codebook]

    @property
    def half_steps(self) -> bool:
        """The reference uses the half-integer rates for sub-4-bit budgets with MUL1 (section 10.1)."""
        return self.codebook == "mul1"

    def identity(self) -> dict:
        """The options that determine the output (a resumed job must match them)."""
        d = asdict(self)
        d.pop("device")  # the result does not depend on where it ran... up to float rounding
        d.pop("memory_budget_mb")
        d.pop("shard_size_mb")
        return d
