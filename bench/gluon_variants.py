"""A/B timing of tensor-core few-row kernel variants (kernels/gluon_gemv.py against a baseline module).

    python bench/gluon_variants.py [--baseline exl3_triton.kernels.gluon_gemv_prev] [--out DIR]

Checks the current kernel on every format (bench/gluon_gemv.check), then times, in CUDA graphs with weights
rotated past L2: each baseline module's ``exl3_gemm_mma`` (a copy of an earlier kernels/gluon_gemv.py placed in
kernels/ for the run), the current one, the current one on x rotated beforehand (the kernel without its rotation),
register caps, programs-per-SM targets, schedules (warps, tile columns per warp, tile rows per step) and other
module constants (``--set``), and fp16 ``torch.matmul``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Results, environment, rel_err, rotation_count, synthetic_exl3, time_graph  # noqa: E402
from gluon_gemv import TOL, check  # noqa: E402

from exl3_triton.kernels import Codebook  # noqa: E402
from exl3_triton.kernels.reference import exl3_matmul_ref  # noqa: E402
from exl3_triton.kernels import gluon_gemv as current  # noqa: E402
from exl3_triton.kernels.triton_hadamard import exl3_input_rotate  # noqa: E402

SHAPES = [(8192, 8192, 4), (5376, 21504, 4), (21504, 5376, 4), (8192, 8192, 2), (4096, 14336, 4), (14336, 4096, 4),
          (4096, 4096, 4), (8192, 8192, 3)]


def apply(combo: dict) -> dict:
    """Set module constants, returning their previous values."""
    previous = {name: getattr(current, name) for name in combo}
    for name, v in combo.items():
        setattr(current, name, v)
    return previous


def label(combo: dict) -> str:
    return "+".join(f"{name}={v}" for name, v in combo.items())


def check_settings(r: Results, combos: list) -> int:
    """Each ``--set`` value against the PyTorch reference before it is timed: formats with each window cut (4-bit
    MCG, 2-bit and 3-bit 3INST, 2.5-bit MUL1), 1/8/13 rows, and K slices of 1-3 chunks (main loops of 4, 8 and 12
    steps, so every remainder of a loop unrolled by two or three)."""
    bad = 0
    for combo in combos:
        previous = apply(combo)
        for bits, cb in ((4, Codebook.MCG), (2, Codebook.THREE_INST), (3, Codebook.THREE_INST),
                         (2.5, Codebook.MUL1)):
            w = synthetic_exl3(1024, 384, bits, cb, device="cuda", seed=11, bias=True)
            for rows in (1, 8, 13):
                x = torch.randn(rows, 1024, device="cuda").half()
                ref = exl3_matmul_ref(x.float(), w)
                for split in (None, 3, 8):
                    out = torch.full((rows, 384), float("nan"), dtype=torch.float16, device="cuda")
                    err = rel_err(current.exl3_gemm_mma(x, w, out=out, split_k=split), ref)
                    bad += not err < TOL
                    r.add("check_settings", {"setting": label(combo), "K": bits, "codebook": cb.label,
                                             "rows": rows, "split_k": split, "rel_err": err})
        apply(previous)
    errs = r.data["sections"].get("check_settings", [])
    if errs:
        print(f"check of settings: {bad} failures, max rel err {max(c['rel_err'] for c in errs):.2e}", flush=True)
    return bad


def variants(r: Results, baselines, shapes, rows_list, maxnregs, per_sms, schedules, settings) -> None:
    for k, n, bits in shapes:
        count = rotation_count(int(k * n * bits / 8))
        ws = [synthetic_exl3(k, n, bits, Codebook.MCG, device="cuda", seed=i) for i in range(count)]
        for rows in rows_list:
            xs = [torch.randn(rows, k, device="cuda").half() for _ in ws]
            rec = {"shape": f"{k}x{n}", "K": bits, "rows": rows}
            for name, mod in baselines.items():
                rec[f"{name}_us"] = time_graph(lambda i: mod.exl3_gemm_mma(xs[i], ws[i]), count)["median_us"]
            rec["current_us"] = time_graph(lambda i: current.exl3_gemm_mma(xs[i], ws[i]), count)["median_us"]
            xr = [exl3_input_rotate(xs[i], ws[i].suh) for i in range(count)]
            rec["current_on_rotated_x_us"] = time_graph(lambda i: current.exl3_gemm_mma(xr[i], ws[i], x_rotated=True),
                                                        count)["median_us"]
            default_cap = current.MAXNREG
            for m in maxnregs:  # 0: ptxas's own choice
                current.MAXNREG = m
                rec[f"maxnreg{m}_us"] = time_graph(lambda i: current.exl3_gemm_mma(xs[i], ws[i]), count)["median_us"]
            current.MAXNREG = default_cap
            default_per_sm = current.PROGRAMS_PER_SM
            for p in per_sms:
                current.PROGRAMS_PER_SM = p
                rec[f"per_sm{p}_us"] = time_graph(lambda i: current.exl3_gemm_mma(xs[i], ws[i]), count)["median_us"]
            current.PROGRAMS_PER_SM = default_per_sm
            default_schedule = (current.NUM_WARPS, current.TILES_PER_WARP, current.BTK)
            for nw, tpw, btk in schedules:
                current.NUM_WARPS, current.TILES_PER_WARP, current.BTK = nw, tpw, btk
                rec[f"w{nw}t{tpw}b{btk}_us"] = time_graph(lambda i: current.exl3_gemm_mma(xs[i], ws[i]),
                                                          count)["median_us"]
            current.NUM_WARPS, current.TILES_PER_WARP, current.BTK = default_schedule
            for combo in settings:  # other module constants read at launch, alone or together
                previous = apply(combo)
                rec[f"{label(combo)}_us"] = time_graph(lambda i: current.exl3_gemm_mma(xs[i], ws[i]),
                                                       count)["median_us"]
                apply(previous)
            wf = [torch.randn(k, n, device="cuda").half() for _ in range(rotation_count(k * n * 2))]
            xf = [torch.randn(rows, k, device="cuda").half() for _ in wf]
            rec["fp16_us"] = time_graph(lambda i: torch.matmul(xf[i], wf[i]), len(wf))["median_us"]
            wf = None
            rec["fp16_over_current"] = rec["fp16_us"] / rec["current_us"]
            print(rec, flush=True)
            r.add("variants", rec)
        ws = None  # free before the next shape
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--baseline", default="", help="comma list of modules with a baseline exl3_gemm_mma")
    ap.add_argument("--schedules", default="", help="comma list of warps:tiles_per_warp:btk schedules to try")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--maxnreg", default="", help="comma list of register caps to try")
    ap.add_argument("--per-sm", default="", help="comma list of PROGRAMS_PER_SM targets to try")
    ap.add_argument("--set", action="append", default=[], help="NAME=v1,v2: integer module constants to try")
    ap.add_argument("--combo", action="append", default=[], help="NAME=v:NAME=v: module constants set together")
    ap.add_argument("--shapes", default="", help="kxnxbits,... (default: the built-in list)")
    ap.add_argument("--tag", default="variants")
    args = ap.parse_args()
    meta = environment()
    r = Results(Path(args.out) / f"gluon-{args.tag}-{meta['date']}-{meta['gpu'].replace(' ', '_')}.json", meta)
    bad = check(r)
    baselines = {m.rsplit(".", 1)[-1]: importlib.import_module(m) for m in args.baseline.split(",") if m}
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    parse = lambda a, b, c: (int(a), int(b), float(c) if "." in c else int(c))  # noqa: E731
    shapes = SHAPES if not args.shapes else [parse(*v.split("x")) for v in args.shapes.split(",")]
    schedules = [tuple(int(v) for v in sch.split(":")) for sch in args.schedules.split(",") if sch]
    settings = [{kv.split("=")[0]: v} for kv in args.set for v in ints(kv.split("=")[1])]
    settings += [{a.split("=")[0]: int(a.split("=")[1]) for a in c.split(":")} for c in args.combo]
    bad += check_settings(r, settings)
    variants(r, baselines, shapes, ints(args.rows), ints(args.maxnreg), ints(args.per_sm), schedules, settings)
    r.save()
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
