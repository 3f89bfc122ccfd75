"""Run one fused EXL3 GEMM configuration a few times, for a profiler to catch.

    ncu --section SpeedOfLight --section WarpStateStats -k regex:_exl3_gemm_kernel -c 1 \\
        python bench/profile_gemm.py --rows 16 --block-m 16 --btk 2

Nothing is timed here; use bench/kernels.py for timings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synthetic_exl3  # noqa: E402

from exl3_triton.kernels import Codebook, triton_ops  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=8192)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--bits", type=float, default=4)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--block-m", type=int, default=1)
    p.add_argument("--btk", type=int, default=2)
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--split", type=int, default=None)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--rotate-in-kernel", action="store_true")
    # one-row variants (GemmConfig fields, kernels/triton_gemv.py), e.g. --rotate-in-kernel --async-stages 3 --lane-major
    p.add_argument("--prefetch-steps", type=int, default=None)
    p.add_argument("--async-stages", type=int, default=None)
    p.add_argument("--lane-major", action="store_true")
    p.add_argument("--early-load", action="store_true")
    a = p.parse_args()
    ops = triton_ops.load()
    cfg = ops.gemm.GemmConfig(block_m=a.block_m, btk=a.btk, num_warps=a.warps, split_k=a.split,
                              rotate_in_kernel=a.rotate_in_kernel, prefetch_steps=a.prefetch_steps,
                              async_stages=a.async_stages, lane_major=a.lane_major, early_load=a.early_load)
    w = synthetic_exl3(a.k, a.n, a.bits, Codebook.MCG)
    x = torch.randn(a.rows, a.k, device="cuda").half()
    for _ in range(a.calls):
        ops.gemm.exl3_gemm_triton(x, w, cfg)
    torch.cuda.synchronize()
    print(f"ran {cfg.describe()} x{a.calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
