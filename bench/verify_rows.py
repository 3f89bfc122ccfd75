"""Few-row EXL3 matmuls (what a step verifying 1-3 drafted tokens multiplies): the current schedule
for each row count against 4-row blocks, with and without the in-kernel rotation (GPU, CUDA graphs).

    python bench/verify_rows.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, rotation_count, synthetic_exl3, time_graph  # noqa: E402

from exl3_triton.kernels import tuning  # noqa: E402
from exl3_triton.kernels.triton_ops import load  # noqa: E402
from exl3_triton.kernels.weights import Codebook  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    gemm = load().gemm
    shapes = [(2560, 2560), (2560, 7680), (8192, 8192), (5376, 21504)]
    candidates = {
        "b4": gemm.GemmConfig(block_m=4, btk=2, num_warps=4),
        "b4-btk1": gemm.GemmConfig(block_m=4, btk=1, num_warps=4),
        "b4-rot": gemm.GemmConfig(block_m=4, btk=1, num_warps=4, rotate_in_kernel=True),
        "b2-rot": gemm.GemmConfig(block_m=2, btk=1, num_warps=4, rotate_in_kernel=True),
    }
    results = []
    for k, n in shapes:
        copies = rotation_count(k * n // 2)
        weights = [synthetic_exl3(k, n, 4, Codebook.MCG, seed=i) for i in range(copies)]
        for rows in (2, 3, 4):
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            ref = gemm.exl3_gemm_triton(x, weights[0], tuning.gemm_config(rows, k, n))
            rec = {"shape": f"{k}x{n}", "rows": rows,
                   "current": time_graph(lambda i: gemm.exl3_gemm_triton(x, weights[i % copies],
                                                                         tuning.gemm_config(rows, k, n)),
                                         copies)["median_us"]}
            for name, cfg in candidates.items():
                try:
                    y = gemm.exl3_gemm_triton(x, weights[0], cfg)
                    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                    rec[name] = time_graph(lambda i, c=cfg: gemm.exl3_gemm_triton(x, weights[i % copies], c),
                                           copies)["median_us"]
                    rec[name + "_rel_err_vs_current"] = err
                except Exception as e:  # a schedule the kernel does not support
                    rec[name] = f"unsupported: {type(e).__name__}: {str(e)[:80]}"
            print(json.dumps(rec), flush=True)
            results.append(rec)
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": environment(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
