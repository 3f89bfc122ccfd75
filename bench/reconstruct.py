"""Check, then time, the full-weight reconstruction (kernels/triton_reconstruct.py) and the large-batch paths.

    python bench/reconstruct.py [--out DIR] [--budget SECONDS] [--quick]

1. Checks ``reconstruct_weight_triton`` against the PyTorch reference's fp32 W (output poisoned with NaN first):
   every schedule the sweep will time on 4-bit MCG, the default on 2-bit 3INST, 2.5-bit MUL1 and 5-bit MCG; and
   ``exl3_matmul`` through each large-batch path against the reference matmul, concatenated linears too.
2. Sweeps the schedule on 8192x8192 at 4 bits (a grid, ``sweep_schedules``), timed in CUDA graphs with weights
   rotated past L2, next to the W_hat dequantization writing the same bytes and the copy bandwidth; then checks
   the winner on every format before anything is timed with it.
3. Times ``exl3_matmul`` at 256-2048 rows through both large-batch paths ("dequant": rotate x, W_hat,
   torch.matmul, rotate the result; "reconstruct": W, torch.matmul) and fp16 ``torch.matmul`` in the same run,
   on 8192x8192 and on the model shapes.

A failed check exits 1 before any timing. ``--quick`` (the CPU test) runs the same code at small sizes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Results, copy_bandwidth, environment, rel_err, rotation_count, synthetic_exl3, time_graph  # noqa: E402,E501

from exl3_triton.kernels import Codebook, exl3_matmul, triton_ops  # noqa: E402
from exl3_triton.kernels.reference import exl3_matmul_ref, exl3_weight_ref  # noqa: E402
from exl3_triton.kernels.weights import concat_exl3  # noqa: E402

TOL = 2e-3
CHECK_FORMATS = ((4, Codebook.MCG), (2, Codebook.THREE_INST), (2.5, Codebook.MUL1), (5, Codebook.MCG))


def sweep_schedules() -> list[dict]:
    """The schedules the sweep times (each is checked first): the default, then a grid over where blocks go
    (programs per SM, 0 = one block per program), warps, row parts and where H comes from."""
    default = dict(OPS.reconstruct.SCHEDULE)
    out = [default]
    for pps in (0, 2, 4):
        for warps in (4, 8):
            for row_split in (1, 2, 4):
                for h_mem in (False, True):
                    s = {**default, "programs_per_sm": pps, "num_warps": warps, "row_split": row_split,
                         "h_from_memory": h_mem}
                    if s not in out:
                        out.append(s)
    return out


def check(r: Results, device: str, schedules: list[dict], formats=CHECK_FORMATS) -> int:
    """Every schedule on the first format (the one the sweep times), the first schedule on every format."""
    bad = 0
    k, n = (512, 384) if device == "cuda" else (256, 256)
    for f, (bits, cb) in enumerate(formats):
        w = synthetic_exl3(k, n, bits, cb, device=device, seed=int(bits * 10) + int(cb), bias=True)
        ref = exl3_weight_ref(w)
        for sched in (schedules if f == 0 else schedules[:1]):
            out = torch.full((k, n), float("nan"), dtype=torch.float16, device=device)
            err = rel_err(OPS.reconstruct.reconstruct_weight_triton(w, out=out, schedule=sched), ref)
            bad += not err < TOL
            r.add("check", {"K": bits, "codebook": cb.label, "schedule": sched, "rel_err": err})
        x = torch.randn(40, k, device=device).half()
        mref = exl3_matmul_ref(x.float(), w)
        for path in ("reconstruct", "dequant"):
            err = rel_err(exl3_matmul(x, w, backend="triton", _force_path=path), mref)
            bad += not err < TOL
            r.add("check", {"K": bits, "codebook": cb.label, "matmul": path, "rows": 40, "rel_err": err})
    parts = [synthetic_exl3(k, m, 4, Codebook.MCG, device=device, seed=50 + m, bias=True) for m in (256, 128, 384)]
    group = concat_exl3(parts)
    x = torch.randn(40, k, device=device).half()
    err = rel_err(exl3_matmul(x, group, backend="triton", _force_path="reconstruct"),
                  torch.cat([exl3_matmul_ref(x.float(), p) for p in parts], dim=1))
    bad += not err < TOL
    r.add("check", {"grouped": [p.out_features for p in parts], "matmul": "reconstruct", "rel_err": err})
    return bad


def sweep(r: Results, k: int, n: int, schedules: list[dict], budget_end: float) -> dict:
    ws = weights(k, n, 4)
    buf = torch.empty(k, n, dtype=torch.float16, device="cuda")
    r.add("sweep_reference", {
        "shape": f"{k}x{n}", "copy_GBps": copy_bandwidth(),
        "dequant_us": time_graph(lambda i: OPS.dequant.dequant_inner_triton(ws[i], out=buf), len(ws))["median_us"],
        "fp16_write_floor_us": (k * n * 2 + k * n // 2) / 2.9e9 * 1e3})
    best, best_us = None, float("inf")
    launcher = OPS.reconstruct._reconstruct
    for s in schedules:
        if r.elapsed() > budget_end:
            break
        launcher.cache.clear()
        OPS.reconstruct.reconstruct_weight_triton(ws[0], out=buf, schedule=s)
        kernel = next(iter(launcher.cache.values()), None)
        us = time_graph(lambda i: OPS.reconstruct.reconstruct_weight_triton(ws[i], out=buf, schedule=s),
                        len(ws))["median_us"]
        r.add("sweep", {"shape": f"{k}x{n}", "schedule": s, "us": us, "GBps": (k * n * 2 + k * n // 2) / us / 1e3,
                        "regs": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None)})
        if us < best_us:
            best, best_us = s, us
    r.add("sweep_best", {"schedule": best, "us": best_us})
    return best


def parts(r: Results, k: int, n: int, rows: int) -> None:
    """Where the reconstruct path's time goes at ``rows`` rows, with and without a bias."""
    ws = weights(k, n, 4)
    buf = torch.empty(k, n, dtype=torch.float16, device="cuda")
    xs = [torch.randn(rows, k, device="cuda").half() for _ in ws]
    bias = ws[0].bias
    rec = {"shape": f"{k}x{n}", "rows": rows}
    fns = {
        "reconstruct": lambda i: OPS.reconstruct.reconstruct_weight_triton(ws[i], out=buf),
        "matmul": lambda i: torch.matmul(xs[i], buf),
        "addmm_bias": lambda i: torch.addmm(bias, xs[i], buf),
        "matmul_then_add_bias": lambda i: torch.matmul(xs[i], buf).add_(bias),
        "reconstruct_into_one_buffer_then_addmm": lambda i: torch.addmm(
            bias, xs[i], OPS.reconstruct.reconstruct_weight_triton(ws[i], out=buf)),
        "exl3_matmul_reconstruct": lambda i: exl3_matmul(xs[i], ws[i], backend="triton", _force_path="reconstruct"),
        "exl3_matmul_dequant": lambda i: exl3_matmul(xs[i], ws[i], backend="triton", _force_path="dequant"),
    }
    for name, fn in fns.items():
        rec[name + "_us"] = time_graph(fn, len(ws))["median_us"]
    r.add("parts", rec)
    del ws, buf, xs
    torch.cuda.empty_cache()


def weights(k: int, n: int, bits: float) -> list:
    count = rotation_count(k * n * bits // 8)
    return [synthetic_exl3(k, n, bits, Codebook.MCG, device="cuda", seed=100 + i, bias=True) for i in range(count)]


def matmuls(r: Results, shapes: list, rows_list: list, schedule: dict | None, budget_end: float) -> None:
    for k, n, bits in shapes:
        ws = weights(k, n, bits)
        buf = torch.empty(k, n, dtype=torch.float16, device="cuda")
        rec_us = time_graph(lambda i: OPS.reconstruct.reconstruct_weight_triton(ws[i], out=buf, schedule=schedule),
                            len(ws))["median_us"]
        deq_us = time_graph(lambda i: OPS.dequant.dequant_inner_triton(ws[i], out=buf), len(ws))["median_us"]
        r.add("weight_pass", {"shape": f"{k}x{n}", "K": bits, "reconstruct_us": rec_us, "dequant_us": deq_us})
        for rows in rows_list:
            if r.elapsed() > budget_end:
                return
            xs = [torch.randn(rows, k, device="cuda").half() for _ in ws]
            wd = torch.randn(k, n, device="cuda").half()
            rec = {"shape": f"{k}x{n}", "K": bits, "rows": rows}
            for path in ("reconstruct", "dequant"):
                rec[path + "_us"] = time_graph(
                    lambda i: exl3_matmul(xs[i], ws[i], backend="triton", _force_path=path), len(ws))["median_us"]
            rec["fp16_us"] = time_graph(lambda i: torch.matmul(xs[i], wd), len(ws))["median_us"]
            rec["reconstruct_vs_fp16"] = rec["reconstruct_us"] / rec["fp16_us"]
            rec["dequant_vs_fp16"] = rec["dequant_us"] / rec["fp16_us"]
            r.add("matmul", rec)
        del ws, buf
        torch.cuda.empty_cache()


def main() -> int:
    global OPS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="results directory (default bench/results)")
    parser.add_argument("--budget", type=float, default=200, help="seconds after which timing stops")
    parser.add_argument("--quick", action="store_true", help="the check only, at small sizes (CPU test)")
    args = parser.parse_args()
    OPS = triton_ops.load()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = environment() if device == "cuda" else {"device": "cpu"}
    out_dir = Path(args.out) if args.out else REPO / "bench" / "results"
    tag = "quick" if args.quick else meta.get("date", "")
    r = Results(out_dir / f"reconstruct-{tag}.json", meta)
    default = dict(OPS.reconstruct.SCHEDULE)
    schedules = sweep_schedules() if not args.quick else [
        default, {**default, "row_split": 1}, {**default, "programs_per_sm": 0, "row_split": 4, "h_from_memory": True},
        {**default, "row_split": 8, "h_from_memory": True}]
    bad = check(r, device, schedules)
    print(f"check: {bad} failed", flush=True)
    if bad:
        return 1
    if args.quick:
        return 0
    best = sweep(r, 8192, 8192, schedules, args.budget * 0.45)
    bad = check(r, device, [best])  # the winner on every format before anything is timed with it
    print(f"check best: {bad} failed", flush=True)
    if bad:
        return 1
    OPS.reconstruct.SCHEDULE = best  # exl3_matmul's reconstruct path below runs the sweep's best
    parts(r, 8192, 8192, 2048)
    matmuls(r, [(8192, 8192, 4)], [256, 512, 1024, 2048], best, args.budget * 0.7)
    matmuls(r, [(5376, 21504, 4), (21504, 5376, 4), (4096, 14336, 4), (14336, 4096, 4), (8192, 8192, 2)], [2048],
            best, args.budget)
    return 0


OPS = None

if __name__ == "__main__":
    sys.exit(main())
