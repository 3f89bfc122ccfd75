"""Would one launch for the projections that share an input (q/k/v, gate/up) pay? (kernel issue)

    python3 bench/fused_projections.py [--rows 1,2,8] [--bits 4] [--out DIR]

For each model's group of projections reading the same activations, times in CUDA graphs
(weights rotated past L2) the separate EXL3 matmuls one after another against one matmul of
the members concatenated by ``concat_exl3`` (what ``LinearGroup`` runs: each member's columns
rotate the input with its own signs). Each timed call is first checked against the PyTorch
reference of the members, one by one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, environment, rotation_count, synthetic_exl3, time_graph  # noqa: E402

from exl3_triton import kernels  # noqa: E402
from exl3_triton.kernels.reference.linear import exl3_matmul_ref  # noqa: E402
from exl3_triton.kernels.weights import concat_exl3  # noqa: E402

# (name, in_features, [out_features of each projection sharing the input])
GROUPS = [
    ("llama3-8b qkv", 4096, [4096, 1024, 1024]),
    ("llama3-8b gate+up", 4096, [14336, 14336]),
    ("gemma4-31b sliding qkv", 5376, [8192, 4096, 4096]),
    ("gemma4-31b gate+up", 5376, [21504, 21504]),
    ("openpangu shared gate+up", 2560, [1024, 1024]),
    ("openpangu dense gate+up", 2560, [9216, 9216]),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,2,8")
    p.add_argument("--bits", type=float, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or Path(__file__).resolve().parent / "results")
    res = Results(out / "fused-projections.json", environment())
    for name, k, outs in GROUPS:
        n_rot = rotation_count(k * sum(outs) * args.bits // 8)
        parts = [[synthetic_exl3(k, n, args.bits, 1, seed=100 * r + j) for j, n in enumerate(outs)]
                 for r in range(n_rot)]
        whole = [concat_exl3(ws) for ws in parts]
        for rows in (int(x) for x in args.rows.split(",")):
            xs = [torch.randn(rows, k, device="cuda").half() for _ in range(n_rot)]
            errs = []
            for w in parts[0]:
                got, want = kernels.exl3_matmul(xs[0], w), exl3_matmul_ref(xs[0], w)
                errs.append(float((got.float() - want.float()).norm() / want.float().norm()))
            got = kernels.exl3_matmul(xs[0], whole[0]).float()
            want = torch.cat([exl3_matmul_ref(xs[0], w) for w in parts[0]], dim=1).float()
            errs.append(float((got - want).norm() / want.norm()))
            if max(errs) > 2e-3:
                raise RuntimeError(f"{name} rows {rows}: relative error {max(errs):.3g} against the reference")
            separate = time_graph(lambda i: [kernels.exl3_matmul(xs[i], w) for w in parts[i]], n_rot)["median_us"]
            fused = time_graph(lambda i: kernels.exl3_matmul(xs[i], whole[i]), n_rot)["median_us"]
            res.add("groups", {"group": name, "in": k, "outs": outs, "rows": rows, "bits": args.bits,
                               "separate_graph_us": separate, "concatenated_graph_us": fused,
                               "saved_us": separate - fused, "max_rel_err": max(errs)})
        del parts, whole
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
