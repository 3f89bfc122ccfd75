"""Kernel schedules and crossovers, measured on the GPU by ``bench/kernels.py``.

Figures and the run they come from are in ``docs/performance.md``. Until a
measurement exists for a setting, the value is marked PROVISIONAL.
"""

from __future__ import annotations

import functools

# PROVISIONAL until measured: rows above this use dequantize + torch.matmul.
FUSED_MAX_ROWS = 128


def fused_max_rows(in_features: int, out_features: int) -> int:
    return FUSED_MAX_ROWS


@functools.lru_cache(maxsize=None)
def gemm_config(rows: int, in_features: int, out_features: int):
    from . import triton_ops

    GemmConfig = triton_ops.load().gemm.GemmConfig  # the Triton modules load on first use

    if rows == 1:
        return GemmConfig(block_m=1, btk=2, num_warps=8, rotate_in_kernel=True)  # PROVISIONAL
    if rows <= 16:
        return GemmConfig(block_m=16, btk=2, num_warps=8)  # PROVISIONAL
    if rows <= 64:
        return GemmConfig(block_m=64, btk=2, num_warps=8)  # PROVISIONAL
    return GemmConfig(block_m=128, btk=1, num_warps=8, num_stages=1)  # PROVISIONAL
