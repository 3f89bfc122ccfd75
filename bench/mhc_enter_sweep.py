"""The mHC site-entry kernel with the block's input norm: collapse width and warps (issue 8).

    python3 bench/mhc_enter_sweep.py [--out DIR]

In openPangu-2.0-Flash's decode step the entry kernel with the block norm took ~13 us a call
(1.2 ms a step, profile of 2026-11-23): one program a token walks the 4 x 2560 streams twice in
``NORM_COLLAPSE_BLOCK``-column steps (256 then) with one warp. This times it in CUDA graphs at Flash shapes for
several column widths and warp counts, each output first compared with the default setting's
(tests/kernels/test_triton_mhc.py holds the kernel to the PyTorch path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, environment, time_graph  # noqa: E402

from exl3_triton.kernels import triton_ops  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    mhc = triton_ops.load().mhc
    out = Path(args.out or Path(__file__).resolve().parent / "results")
    res = Results(out / "mhc-enter-sweep.json", environment())
    g = torch.Generator(device="cuda").manual_seed(0)
    for rows in (1, 8):
        n, d, m = 4, 2560, 24
        copies = 64  # 64 x 40 KB of streams per row: past L1, as in a step's 92 sites
        xs = [torch.randn(rows, n, d, generator=g, device="cuda") for _ in range(copies)]
        phi = torch.randn(m, n * d, generator=g, device="cuda") * 0.01
        parts = [mhc.mhc_site_partials(x, phi, None) for x in xs]
        scale, base = torch.ones(3, device="cuda"), torch.zeros(m, device="cuda")
        weight = torch.rand(d, generator=g, device="cuda").half()

        def enter(i):
            return mhc.mhc_site_enter(xs[i], *parts[i], scale, base, n, 20, 1e-6, 1e-6, 1e-6, (weight, 1e-5, torch.float16))

        want = enter(0)[0].float()
        default = (mhc.NORM_COLLAPSE_BLOCK, mhc.NORM_ENTER_WARPS)
        for block in (256, 512, 1024, 2048, 4096):
            for warps in (1, 2, 4, 8):
                mhc.NORM_COLLAPSE_BLOCK, mhc.NORM_ENTER_WARPS = block, warps
                got = enter(0)[0].float()
                err = float((got - want).abs().max() / want.abs().max())
                us = time_graph(enter, copies)["median_us"]
                res.add("enter", {"rows": rows, "collapse_block": block, "warps": warps, "max_rel_diff": err, "us": us})
        mhc.NORM_COLLAPSE_BLOCK, mhc.NORM_ENTER_WARPS = default
    return 0


if __name__ == "__main__":
    sys.exit(main())
