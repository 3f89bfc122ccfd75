"""Global scale search: the factor ``g`` that makes the regularised weight fit the codebook best.

Format reference: shared ``exl3-format.md`` section 6.4.

The trellis codebooks have a fixed spread, so the error of encoding ``g * W_reg``
depends on ``g``. We test-encode a sample of tiles at several scales and keep
the one with the lowest ``mse(Q(g * tiles) / g, tiles)``. The sample is the
reference's: a wrapped diagonal of width 3 over the tile grid (every tile row
and column is represented; outliers tend to be whole channels) plus the tiles
of highest and lowest RMS.

Modes (``--scale-search``):

* ``full``: the reference's schedule. A coarse grid g = 0.1, 0.3, ..., 1.9 on
  every third sampled tile, then 5 points 0.075 apart around the best on all
  sampled tiles, refined by parabolic interpolation (offset clamped to half a
  step), floor 0.01.
* ``fast``: for tests and quick conversions. Because ``regularize`` already
  normalises by the codebook's own RMS (1.2437 for 3INST/MCG, 1.0 for MUL1),
  the optimum sits a little below 1 (see docs/quantization.md for measured
  values), so the coarse stage is skipped and 3 points 0.1 apart around 0.9
  are tried on at most 8 sampled tiles, then refined by parabolic interpolation.
* ``none``: g = 1.
"""

from __future__ import annotations

import torch

from ..kernels.reference.trellis import TC_PERM
from ..kernels.weights import Codebook
from .tile_encoder import encode_tiles

SCALE_SEARCH_MODES = ("full", "fast", "none")
COARSE_GRID = tuple(0.1 + 0.2 * i for i in range(10))
FINE_STEP = 0.075
FAST_CENTER = 0.9
FAST_STEP = 0.1
FAST_MAX_TILES = 8
MIN_SCALE = 0.01


def sample_tiles(w_reg: torch.Tensor, width: int = 3) -> torch.Tensor:
    """Tiles ``[T, 256]`` in sequence order: a wrapped diagonal of ``width`` plus the extreme-RMS tiles."""
    tiles_k, tiles_n = w_reg.shape[0] // 16, w_reg.shape[1] // 16
    grid = w_reg.reshape(tiles_k, 16, tiles_n, 16).permute(0, 2, 1, 3).reshape(tiles_k * tiles_n, 256)
    diag_len = max(tiles_k, tiles_n)
    i = torch.arange(diag_len).repeat_interleave(width)
    j = torch.arange(width).repeat(diag_len)
    diagonal = (i % tiles_k) * tiles_n + (i + j) % tiles_n
    tile_ms = grid.square().mean(dim=1)
    extremes = min(max(8, diag_len * width // 16), (tile_ms.shape[0] + 1) // 2)
    high = torch.topk(tile_ms, extremes).indices.cpu()
    low = torch.topk(tile_ms, extremes, largest=False).indices.cpu()
    picked = torch.cat((diagonal, high, low)).to(w_reg.device)
    return grid[picked][:, TC_PERM.to(w_reg.device)]


def _mse_at(tiles: torch.Tensor, scales: list[float], bits: float, codebook: Codebook, memory_budget: int,
            backend: str) -> list[float]:
    """Encode ``tiles * s`` for every scale in one batch; the per-scale mse of the rescaled result."""
    batch = torch.cat([tiles * s for s in scales])
    values = encode_tiles(batch, bits, codebook, memory_budget=memory_budget, backend=backend).values
    values = values.view(len(scales), *tiles.shape)
    return [((values[i] / s - tiles).square().mean()).item() for i, s in enumerate(scales)]


def _refine(points: list[float], mse: list[float], step: float) -> float:
    best = min(range(len(points)), key=lambda i: mse[i])
    offset = 0.0
    if 0 < best < len(points) - 1:
        y0, y1, y2 = mse[best - 1], mse[best], mse[best + 1]
        denom = y0 - 2 * y1 + y2
        if denom > 0:
            offset = max(-0.5, min(0.5, 0.5 * (y0 - y2) / denom))
    return max(points[best] + offset * step, MIN_SCALE)


def search_global_scale(
    w_reg: torch.Tensor,
    bits: float,
    codebook: Codebook,
    mode: str = "full",
    *,
    memory_budget: int = 1 << 30,
    backend: str = "auto",
) -> float:
    """The global scale ``g`` for ``w_reg`` (see the module docstring for the modes)."""
    if mode not in SCALE_SEARCH_MODES:
        raise ValueError(f"scale search mode {mode!r}; choose one of {SCALE_SEARCH_MODES}")
    if mode == "none" or w_reg.abs().max() == 0:
        return 1.0
    tiles = sample_tiles(w_reg)
    if mode == "fast":
        tiles = tiles[torch.linspace(0, tiles.shape[0] - 1, min(FAST_MAX_TILES, tiles.shape[0])).round().long()]
        points = [FAST_CENTER - FAST_STEP, FAST_CENTER, FAST_CENTER + FAST_STEP]
        return _refine(points, _mse_at(tiles, points, bits, codebook, memory_budget, backend), FAST_STEP)
    coarse = list(COARSE_GRID)
    mse = _mse_at(tiles[::3], coarse, bits, codebook, memory_budget, backend)
    center = coarse[min(range(len(coarse)), key=lambda i: mse[i])]
    fine = [center + FINE_STEP * (i - 2) for i in range(5)]
    return _refine(fine, _mse_at(tiles, fine, bits, codebook, memory_budget, backend), FINE_STEP)
