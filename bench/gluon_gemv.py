"""Check, then time, the Gluon tensor-core few-row kernel (kernels/gluon_gemv.py) against the Triton kernels.

    python bench/gluon_gemv.py [--out DIR]

1. Checks ``exl3_gemm_mma`` for every codebook and bit width at 1, 3 and 8 rows, with a bias and for
   concatenated linears (per-member ``suh``), against the PyTorch reference (output poisoned first).
2. Times the public ``exl3_matmul`` at 1, 2, 4 and 8 rows with ``tuning.TENSOR_CORE_FEW_ROWS`` on and off, in
   CUDA graphs with weights rotated past L2, and fp16 ``torch.matmul`` at the same shapes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Results, environment, rel_err, rotation_count, synthetic_exl3, time_graph  # noqa: E402

from exl3_triton.kernels import Codebook, exl3_matmul, mma_ready, tuning  # noqa: E402
from exl3_triton.kernels.gluon_gemv import exl3_gemm_mma  # noqa: E402
from exl3_triton.kernels.reference import exl3_matmul_ref  # noqa: E402
from exl3_triton.kernels.triton_hadamard import exl3_input_rotate  # noqa: E402
from exl3_triton.kernels.weights import SUPPORTED_BITS, concat_exl3  # noqa: E402

TOL = 2e-3


def check(r: Results) -> int:
    bad = 0
    for bits in SUPPORTED_BITS:
        for cb in Codebook:
            if bits != int(bits) and cb != Codebook.MUL1:
                continue
            w = synthetic_exl3(1024, 384, bits, cb, device="cuda", seed=int(bits * 10) + int(cb), bias=True)
            for rows in (1, 3, 8, 13, 16):
                x = torch.randn(rows, 1024, device="cuda").half()
                out = torch.full((rows, 384), float("nan"), dtype=torch.float16, device="cuda")
                err = rel_err(exl3_gemm_mma(x, w, out=out), exl3_matmul_ref(x.float(), w))
                bad += not err < TOL
                r.add("check", {"K": bits, "codebook": cb.label, "rows": rows, "rel_err": err})
    parts = [synthetic_exl3(512, n, 4, Codebook.MCG, device="cuda", seed=50 + n) for n in (256, 128, 384)]
    group = concat_exl3(parts)
    for rows in (1, 5):
        x = torch.randn(rows, 512, device="cuda").half()
        ref = torch.cat([exl3_matmul_ref(x.float(), p) for p in parts], dim=1)
        for in_kernel in (True, False):
            err = rel_err(exl3_gemm_mma(x, group, rotate_in_kernel=in_kernel), ref)
            bad += not err < TOL
            r.add("check", {"grouped": [p.out_features for p in parts], "rows": rows, "rotate_in_kernel": in_kernel,
                            "rel_err": err})
    for bits, cb in ((4, Codebook.MCG), (3, Codebook.THREE_INST), (2.5, Codebook.MUL1)):  # separate rotation
        w = synthetic_exl3(1024, 384, bits, cb, device="cuda", seed=7, bias=True)
        for rows in (1, 6):
            x = torch.randn(rows, 1024, device="cuda").half()
            err = rel_err(exl3_gemm_mma(x, w, rotate_in_kernel=False), exl3_matmul_ref(x.float(), w))
            bad += not err < TOL
            r.add("check", {"K": bits, "codebook": cb.label, "rows": rows, "rotate_in_kernel": False, "rel_err": err})
    print(f"check: {bad} failures, max rel err {max(c['rel_err'] for c in r.data['sections']['check']):.2e}", flush=True)
    return bad


def timing(r: Results, shapes, rows_list=(1, 2, 4, 8, 12, 16)) -> None:
    for k, n, bits in shapes:
        count = rotation_count(int(k * n * bits / 8))
        ws = [synthetic_exl3(k, n, bits, Codebook.MCG, device="cuda", seed=i) for i in range(count)]
        for rows in rows_list:
            xs = [torch.randn(rows, k, device="cuda").half() for _ in ws]
            rec = {"shape": f"{k}x{n}", "K": bits, "rows": rows}
            for flag in (True, False):
                tuning.TENSOR_CORE_FEW_ROWS = flag
                rec["mma_us" if flag else "triton_us"] = time_graph(lambda i: exl3_matmul(xs[i], ws[i]),
                                                                    count)["median_us"]
            tuning.TENSOR_CORE_FEW_ROWS = True
            # the tensor-core kernel itself, whatever the dispatch rules pick (they send some shapes to Triton)
            rec["mma_direct_us"] = time_graph(lambda i: exl3_gemm_mma(xs[i], ws[i]), count)["median_us"]
            wf = [torch.randn(k, n, device="cuda").half() for _ in range(rotation_count(k * n * 2))]
            xf = [torch.randn(rows, k, device="cuda").half() for _ in wf]
            rec["fp16_us"] = time_graph(lambda i: torch.matmul(xf[i], wf[i]), len(wf))["median_us"]
            rec["fp16_over_mma"] = rec["fp16_us"] / rec["mma_us"]
            del wf
            r.add("time", rec)
        del ws
        torch.cuda.empty_cache()


def splits(r: Results) -> None:
    """The K split of the tensor-core kernel against the automatic choice, one and eight rows; and the input
    rotation in the kernel against a separate launch (and the kernel alone on rotated x)."""
    for k, n in ((8192, 8192), (5376, 21504), (21504, 5376), (4096, 14336)):
        count = rotation_count(k * n // 2)
        ws = [synthetic_exl3(k, n, 4, Codebook.MCG, device="cuda", seed=i) for i in range(count)]
        for rows in (1, 8):
            xs = [torch.randn(rows, k, device="cuda").half() for _ in ws]
            rec = {"shape": f"{k}x{n}", "rows": rows, "auto_us": time_graph(lambda i: exl3_matmul(xs[i], ws[i]),
                                                                             count)["median_us"]}
            rec["separate_rotation_us"] = time_graph(
                lambda i: exl3_gemm_mma(xs[i], ws[i], rotate_in_kernel=False), count)["median_us"]
            xr = [exl3_input_rotate(xs[i], ws[i].suh) for i in range(count)]
            rec["kernel_on_rotated_x_us"] = time_graph(lambda i: exl3_gemm_mma(xr[i], ws[i], x_rotated=True),
                                                       count)["median_us"]
            units = k // 128
            for split in [d for d in (2, 3, 4, 6, 7, 8, 12, 14, 16, 21, 24, 28, 32, 42, 48, 64) if units % d == 0]:
                rec[f"sk{split}_us"] = time_graph(lambda i: exl3_gemm_mma(xs[i], ws[i], split_k=split),
                                                  count)["median_us"]
            r.add("splits", rec)
        del ws
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--shapes", default="table", help="table (the kernel issue's), models (8B/31B/Flash shapes) or none")
    ap.add_argument("--rows", default="1,2,4,8,12,16", help="row counts to time")
    ap.add_argument("--no-check", action="store_true", help="skip the check of every format (timing only)")
    args = ap.parse_args()
    meta = environment()
    r = Results(Path(args.out) / f"gluon-gemv-{args.shapes}-{meta['date']}-{meta['gpu'].replace(' ', '_')}.json", meta)
    print("mma_ready:", mma_ready(torch.device("cuda")), flush=True)
    bad = 0 if args.no_check else check(r)
    if args.shapes == "none":  # the check and the split / rotation section only
        shapes = []
    elif args.shapes == "table":
        shapes = [(8192, 8192, 4), (5376, 21504, 4), (21504, 5376, 4), (8192, 8192, 2), (4096, 4096, 4)]
    else:
        shapes = [(4096, 14336, 4), (14336, 4096, 4), (4096, 6144, 4), (5376, 8192, 4), (2560, 7680, 4),
                  (2560, 1536, 4), (4096, 1024, 4)]
    timing(r, shapes, [int(v) for v in args.rows.split(",")])
    if args.shapes == "none":
        splits(r)
    r.save()
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
