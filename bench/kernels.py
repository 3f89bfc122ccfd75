"""Check, then time, the EXL3 Triton kernels on a GPU (kernel issue).

    python bench/kernels.py [--out DIR] [--sections env,exact,gemv,m16,table,crossover,moe,formats]
                            [--budget SECONDS]

Every kernel variant is first checked against the PyTorch reference on fresh
random inputs with its output poisoned (NaN) beforehand; only variants that pass
are timed. Timing: see bench/common.py (events around each Python call, median
of 100 after 10 warm-up calls, weights rotated past L2; and inside a CUDA
graph). fp16 ``torch.matmul`` is timed in the same run. Results go to
``bench/results/kernels-<date>-<gpu>.json`` (or ``--out``), written as they come.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    Results,
    copy_bandwidth,
    environment,
    rel_err,
    rotation_count,
    synthetic_exl3,
    time_eager,
    time_graph,
)

from exl3_triton.kernels import Codebook, Exl3ExpertStack, exl3_matmul, triton_ops  # noqa: E402
from exl3_triton.kernels.launch import FastLauncher  # noqa: E402
from exl3_triton.kernels.reference import dequant_inner_ref, exl3_matmul_ref, exl3_moe_ref  # noqa: E402
from exl3_triton.kernels.weights import SUPPORTED_BITS  # noqa: E402

OPS = triton_ops.load()
GemmConfig = OPS.gemm.GemmConfig
MATMUL_TOL = 2e-3

# The peer figures: ExLlamaV3 CUDA kernels on an H100, MCG, per Python call.
PEER = {  # (k, n, K, rows): (exllamav3_us, fp16_matmul_us)
    (8192, 8192, 4, 1): (68.6, 104.8),
    (5376, 21504, 4, 1): (76.7, 105.0),
    (21504, 5376, 4, 1): (87.3, 95.2),
    (8192, 8192, 2, 1): (57.3, 62.0),
    (8192, 8192, 4, 16): (74.2, 73.1),
    (5376, 21504, 4, 16): (83.5, 98.5),
}


@triton.jit
def _empty_kernel(x_ptr):
    pass


# gemv_variants: the one-row shapes of the issue and of an 8B / 27B model (in x out, bits)
GEMV_VARIANT_SHAPES = [(8192, 8192, 4), (5376, 21504, 4), (21504, 5376, 4), (4096, 4096, 4), (4096, 14336, 4),
                       (4096, 1024, 4), (8192, 8192, 2)]


def gemv_variant_configs() -> dict:
    """Named one-row schedules: today's (kernels/tuning.py) and the variants (GemmConfig.prefetch_steps,
    lane_major, early_load, async_stages; kernels/triton_gemv.py), one change at a time, then combined."""
    today = GemmConfig(block_m=1, btk=1, num_warps=4, rotate_in_kernel=True)
    return {
        "today": today,
        "lanes ring1": replace(today, prefetch_steps=1, lane_major=True),  # load shape alone
        "ring2": replace(today, prefetch_steps=2),  # steps in flight alone (register ring)
        "ring3": replace(today, prefetch_steps=3),
        "lanes ring3": replace(today, prefetch_steps=3, lane_major=True),
        "lanes ring3 early": replace(today, prefetch_steps=3, lane_major=True, early_load=True),
        "async2": replace(today, async_stages=2),  # cp.async: 1 step ahead in shared memory
        "async3": replace(today, async_stages=3),
        "async4": replace(today, async_stages=4),
        "lanes async3": replace(today, async_stages=3, lane_major=True),
        "lanes async4": replace(today, async_stages=4, lane_major=True),
        "lanes async3 btk2 w4": replace(today, async_stages=3, lane_major=True, btk=2),  # larger steps
        "lanes async3 btk2 w8": replace(today, async_stages=3, lane_major=True, btk=2, num_warps=8),
        "lanes async4 w2": replace(today, async_stages=4, lane_major=True, num_warps=2),  # fewer warps
        # the default capped at 64 registers (no spills, compiled for sm_90 with Triton 3.6): 8 programs per SM
        # instead of 7, so 1024 programs are one wave, not 1.11 (Nsight Compute, docs/performance.md)
        "lanes ring3 early r64": replace(today, prefetch_steps=3, lane_major=True, early_load=True, max_registers=64),
    }


# moe_variants: MoE decode projections (name, in, out, routing-weighted sum of per-slot inputs), 8 of 256 experts
MOE_VARIANT_SHAPES = [("openpangu gate/up", 2560, 1024, False), ("openpangu down", 1024, 2560, True),
                      ("deepseek-v4 gate/up", 4096, 2048, False), ("deepseek-v4 down", 2048, 4096, True)]


def moe_variant_configs() -> dict:
    """Named MoE decode schedules (kernels/triton_moe.py ``MoeDecodeConfig``): the previous loop, the dense
    one-row default's ring loop ("lanes ring3 early", kernels/tuning.py ONE_ROW_LOOP), then one change at a time
    on the ring: no early loads, several column blocks per program on one rotated slice, the rotation in a
    separate launch, fewer K slices (longer loops, a shorter reduction), larger steps, fewer steps in flight
    (an 8-step slice reloads its last step 3 times in the ring's last group); and the old loop without
    its per-program rotation (how much of its time the rotation is)."""
    MoeDecodeConfig = OPS.moe.MoeDecodeConfig
    previous = MoeDecodeConfig(btk=2, num_warps=8)
    ring = MoeDecodeConfig(btk=1, num_warps=4, prefetch_steps=3, lane_major=True, early_load=True)
    return {
        "previous": previous,
        "lanes ring3 early": ring,
        "lanes ring3": replace(ring, early_load=False),
        "lanes ring3 early cols2": replace(ring, col_blocks=2),
        "lanes ring3 early cols4": replace(ring, col_blocks=4),
        "lanes ring3 rot-launch": replace(ring, early_load=False, rotate_in_kernel=False),
        "lanes ring3 early sk4": replace(ring, split_k=4),
        "lanes ring3 early sk2": replace(ring, split_k=2),
        "lanes ring2 early btk2": replace(ring, btk=2, prefetch_steps=2),
        "lanes ring1 early": replace(ring, prefetch_steps=1),  # short slices: fewer wasted reloads at the end
        "previous rot-launch": replace(previous, rotate_in_kernel=False),
    }


class Bench:
    def __init__(self, results: Results, budget: float, device: str = "cuda"):
        self.r = results
        self.budget = budget
        self.device = device  # "cpu" only for the logic test of the sections (Triton's interpreter)
        self.best: dict[str, GemmConfig] = {}
        self.moe_bits = (4, 2)  # moe_variants' bit widths (--moe-bits)
        self.only_variants: list[str] = []  # gemv_variants: these names (and today's) only (--variants)

    def out_of_time(self) -> bool:
        return self.r.elapsed() > self.budget

    # ---------------------------------------------------------- helpers

    def weights(self, k, n, bits, cb=Codebook.MCG):
        nbytes = k * n * bits / 8
        return [synthetic_exl3(k, n, bits, cb, seed=i) for i in range(rotation_count(int(nbytes)))]

    def check_gemm(self, cfg, k, n, bits, cb, rows) -> float:
        w = synthetic_exl3(k, n, bits, cb, device=self.device, seed=1234, bias=True)
        x = torch.randn(rows, k, device=self.device).half()
        out = torch.full((rows, n), float("nan"), dtype=torch.float16, device=self.device)
        y = OPS.gemm.exl3_gemm_triton(x, w, cfg, out=out)
        if self.device == "cuda":
            torch.cuda.synchronize()
        if not torch.isfinite(y).all():
            return float("inf")
        return rel_err(y, exl3_matmul_ref(x.float(), w))

    def time_gemm(self, cfg, k, n, bits, rows, cb=Codebook.MCG, graph=True) -> dict:
        ws = self.weights(k, n, bits, cb)
        xs = [torch.randn(rows, k, device="cuda").half() for _ in ws]
        fn = lambda i: OPS.gemm.exl3_gemm_triton(xs[i], ws[i], cfg)  # noqa: E731
        rec = {"eager_us": time_eager(fn, len(ws))["median_us"]}
        if graph:
            rec["graph_us"] = time_graph(fn, len(ws))["median_us"]
        return rec

    def time_fp16(self, k, n, rows, graph=True) -> dict:
        count = rotation_count(k * n * 2)
        ws = [torch.randn(k, n, device="cuda").half() for _ in range(count)]
        xs = [torch.randn(rows, k, device="cuda").half() for _ in range(count)]
        fn = lambda i: torch.matmul(xs[i], ws[i])  # noqa: E731
        rec = {"fp16_eager_us": time_eager(fn, count)["median_us"]}
        if graph:
            rec["fp16_graph_us"] = time_graph(fn, count)["median_us"]
        del ws
        torch.cuda.empty_cache()
        return rec

    def variants(self, section, rows, k, n, bits, configs):
        """Check each config, time the good ones (eager and in a graph); return the fastest in a graph."""
        best = None
        for cfg in configs:
            if self.out_of_time():
                break
            try:
                err = self.check_gemm(cfg, k, n, bits, Codebook.MCG, rows)
            except Exception as e:  # a variant that does not compile is reported, not fatal
                self.r.add(section, {"config": cfg.describe(), "error": f"{type(e).__name__}: {str(e)[:300]}"})
                continue
            rec = {"config": cfg.describe(), "rows": rows, "shape": f"{k}x{n}", "K": bits, "rel_err": err}
            if err < MATMUL_TOL:
                rec.update(self.time_gemm(cfg, k, n, bits, rows))
                if best is None or rec["graph_us"] < best[1]:
                    best = (cfg, rec["graph_us"])
            self.r.add(section, rec)
        return best[0] if best else None

    # ---------------------------------------------------------- sections

    def env(self):
        bw = copy_bandwidth()
        x = torch.empty(1, device="cuda")
        launch = time_eager(lambda i: _empty_kernel[(1,)](x), 1)["median_us"]
        fast = FastLauncher(_empty_kernel)
        fast_launch = time_eager(lambda i: fast((1,), x), 1)["median_us"]
        # the wrapper's own cost: a tiny fused call, eager vs in a graph
        w = [synthetic_exl3(128, 128, 4, Codebook.MCG)]
        xt = torch.randn(1, 128, device="cuda").half()
        cfg = GemmConfig(block_m=1, btk=2, rotate_in_kernel=True)
        tiny = lambda i: OPS.gemm.exl3_gemm_triton(xt, w[0], cfg)  # noqa: E731
        self.r.add("env", {"copy_bandwidth_GBps": bw, "empty_triton_launch_us": launch,
                           "empty_fast_launch_us": fast_launch,
                           "tiny_gemv_eager_us": time_eager(tiny, 1)["median_us"],
                           "tiny_gemv_graph_us": time_graph(tiny, 1)["median_us"]})
        self.copy_bw = bw

    def exact(self):
        for bits in SUPPORTED_BITS:
            for cb in Codebook:
                if bits != int(bits) and cb != Codebook.MUL1:
                    continue
                # the pure-Triton decode is checked on a subset (the interpreter tests cover all)
                for ptx in ((True, False) if bits in (4, 2.5) else (True,)):
                    w = synthetic_exl3(256, 384, bits, cb, seed=int(bits * 10))
                    out = torch.full((256, 384), float("nan"), dtype=torch.float16, device="cuda")
                    got = OPS.dequant.dequant_inner_triton(w, out=out, use_ptx=ptx)
                    ok = torch.equal(got.view(torch.int16), dequant_inner_ref(w.trellis, bits, cb).view(torch.int16))
                    self.r.add("exact", {"K": bits, "codebook": cb.label, "ptx": ptx, "bit_exact": ok})
        # dequant throughput on a large matrix
        for bits in (2, 4):
            ws = self.weights(8192, 8192, bits)
            outs = [torch.empty(8192, 8192, dtype=torch.float16, device="cuda") for _ in range(2)]
            t = time_eager(lambda i: OPS.dequant.dequant_inner_triton(ws[i], out=outs[i % 2]), len(ws))["median_us"]
            moved = 8192 * 8192 * (2 + bits / 8)
            self.r.add("dequant_speed", {"shape": "8192x8192", "K": bits, "us": t, "GBps": moved / t / 1e3})
            del ws, outs
            torch.cuda.empty_cache()

    def gemv(self):
        # contenders from earlier runs (docs/performance.md, notes); all compile without spills
        cfgs = [GemmConfig(block_m=1, btk=2, num_warps=4), GemmConfig(block_m=1, btk=2, num_warps=8),
                GemmConfig(block_m=1, btk=1, num_warps=4, rotate_in_kernel=True),
                GemmConfig(block_m=1, btk=2, num_warps=4, rotate_in_kernel=True)]
        self.best["1"] = self.variants("gemv_variants", 1, 8192, 8192, 4, cfgs)

    def gemv_shapes(self):
        """One-row schedules on the table's shapes and an 8B model's: graph times of the fused kernel
        (the source of the one-row choice in kernels/tuning.py)."""
        cfgs = [GemmConfig(block_m=1, btk=btk, num_warps=warps, rotate_in_kernel=True)
                for btk, warps in ((1, 4), (2, 4))]
        for k, n, bits in [(8192, 8192, 4), (5376, 21504, 4), (21504, 5376, 4), (8192, 8192, 2), (4096, 4096, 4),
                           (4096, 14336, 4), (14336, 4096, 4), (2560, 7680, 4), (4096, 1024, 4)]:
            ws = self.weights(k, n, bits)
            xs = [torch.randn(1, k, device="cuda").half() for _ in ws]
            for cfg in cfgs:
                if self.out_of_time():
                    return
                rec = {"shape": f"{k}x{n}", "K": bits, "rows": 1, "config": cfg.describe()}
                rec["rel_err"] = self.check_gemm(cfg, k, n, bits, Codebook.MCG, 1)
                if rec["rel_err"] < MATMUL_TOL:
                    fn = lambda i: OPS.gemm.exl3_gemm_triton(xs[i], ws[i], cfg)  # noqa: E731
                    rec["graph_us"] = time_graph(fn, len(ws))["median_us"]
                    rec["weight_GBps_graph"] = k * n * bits / 8 / rec["graph_us"] / 1e3
                self.r.add("gemv_shapes", rec)
            del ws
            torch.cuda.empty_cache()

    def gemv_variants(self, shapes=GEMV_VARIANT_SHAPES):
        """One-row kernel: today's schedule against the variants of kernels/triton_gemv.py (issue 3;
        docs/performance.md, "One-row kernel: load layout and bytes in flight"), in CUDA graphs, with
        fp16 torch.matmul in the same run; then the K-split count for the fastest variant, since
        deeper prefetching changes how many programs per SM are worth having."""
        configs = gemv_variant_configs()
        if self.only_variants:
            configs = {name: cfg for name, cfg in configs.items() if name in self.only_variants or name == "today"}
        for k, n, bits in shapes:
            if self.out_of_time():
                return
            times = self._time_gemv_configs("gemv_variants", k, n, bits, configs)
            fp16 = self.time_fp16(k, n, 1) if self.device == "cuda" else {}
            base = times.get("today")
            for name, us in sorted(times.items(), key=lambda kv: kv[1]):
                self.r.add("gemv_variants_summary", {
                    "shape": f"{k}x{n}", "K": bits, "variant": name, "graph_us": us,
                    "vs_today": base / us if base else None, "fp16_graph_us": fp16.get("fp16_graph_us"),
                    "vs_fp16": fp16["fp16_graph_us"] / us if fp16.get("fp16_graph_us") else None})
            if len(times) > 1:  # the fastest variant at other K splits
                best = min((v for v in times if v != "today"), key=times.get)
                splits = {f"{best} sk{sk}": replace(configs[best], split_k=sk) for sk in (4, 8, 16, 32)}
                self._time_gemv_configs("gemv_variants_splits", k, n, bits, splits)

    def _time_gemv_configs(self, section, k, n, bits, configs: dict) -> dict:
        """Check each named one-row config (poisoned output vs the reference), time the good ones in a
        graph; returns {name: graph us}."""
        ws = self.weights(k, n, bits) if self.device == "cuda" else []
        xs = [torch.randn(1, k, device=self.device).half() for _ in ws]
        times = {}
        for name, cfg in configs.items():
            if self.out_of_time():
                break
            rec = {"shape": f"{k}x{n}", "K": bits, "rows": 1, "variant": name, "config": cfg.describe()}
            try:
                rec["rel_err"] = self.check_gemm(cfg, k, n, bits, Codebook.MCG, 1)
                if rec["rel_err"] < MATMUL_TOL and ws:
                    fn = lambda i: OPS.gemm.exl3_gemm_triton(xs[i], ws[i], cfg)  # noqa: E731
                    rec["graph_us"] = time_graph(fn, len(ws))["median_us"]
                    rec["weight_GBps_graph"] = k * n * bits / 8 / rec["graph_us"] / 1e3
                    times[name] = rec["graph_us"]
            except Exception as e:  # a variant that does not compile is reported, not fatal
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            self.r.add(section, rec)
        del ws, xs
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return times

    def occupancy(self):
        """One-row kernel: K slices (programs per SM) against a register cap (programs resident per SM)."""
        base = GemmConfig(block_m=1, btk=1, num_warps=4, rotate_in_kernel=True)
        for k, n in [(8192, 8192), (4096, 4096), (4096, 14336), (14336, 4096), (5376, 21504), (4096, 1024)]:
            ws = self.weights(k, n, 4)
            xs = [torch.randn(1, k, device="cuda").half() for _ in ws]
            for regs in (None, 64, 72):
                for split in (None, 4, 8, 16, 32):
                    if self.out_of_time():
                        return
                    cfg = replace(base, split_k=split, max_registers=regs)
                    rec = {"shape": f"{k}x{n}", "rows": 1, "split": split, "max_registers": regs,
                           "config": cfg.describe()}
                    try:
                        rec["rel_err"] = self.check_gemm(cfg, k, n, 4, Codebook.MCG, 1)
                        if rec["rel_err"] < MATMUL_TOL:
                            fn = lambda i: OPS.gemm.exl3_gemm_triton(xs[i], ws[i], cfg)  # noqa: E731
                            rec["graph_us"] = time_graph(fn, len(ws))["median_us"]
                    except Exception as e:
                        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    self.r.add("occupancy", rec)
            del ws
            torch.cuda.empty_cache()

    def _faster(self, a, b, rows) -> bool:
        return self.time_gemm(a, 8192, 8192, 4, rows)["graph_us"] < self.time_gemm(b, 8192, 8192, 4, rows)["graph_us"]

    def m16(self):
        cfgs = [GemmConfig(block_m=16, btk=2, num_warps=4), GemmConfig(block_m=16, btk=2, num_warps=8),
                GemmConfig(block_m=16, btk=1, num_warps=4)]
        self.best["16"] = self.variants("m16_variants", 16, 8192, 8192, 4, cfgs)

    def splits(self):
        """Split-K sweep on the table's shapes, to set the split rule from measurements."""
        for (k, n, bits, rows) in [(8192, 8192, 4, 1), (5376, 21504, 4, 1), (21504, 5376, 4, 1),
                                   (8192, 8192, 4, 16), (5376, 21504, 4, 16)]:
            base = self.best.get(str(rows)) or GemmConfig(block_m=1 if rows == 1 else 16)
            for split in (1, 2, 4, 8, 16, 32):
                if self.out_of_time():
                    return
                cfg = replace(base, split_k=split)
                rec = {"shape": f"{k}x{n}", "rows": rows, "split": split, "config": cfg.describe()}
                rec.update(self.time_gemm(cfg, k, n, bits, rows))
                self.r.add("splits", rec)

    def table(self):
        """The issue's shapes through the public entry point, as users call it."""
        for (k, n, bits, rows), (peer_us, peer_fp16) in PEER.items():
            if self.out_of_time():
                break
            w = synthetic_exl3(k, n, bits, Codebook.MCG, seed=1234, bias=True)
            x = torch.randn(rows, k, device="cuda").half()
            err = rel_err(exl3_matmul(x, w, backend="triton"), exl3_matmul_ref(x.float(), w))
            ws = self.weights(k, n, bits)
            xs = [torch.randn(rows, k, device="cuda").half() for _ in ws]
            fn = lambda i: exl3_matmul(xs[i], ws[i], backend="triton")  # noqa: E731
            rec = {"shape": f"{k}x{n}", "K": bits, "rows": rows, "rel_err": err,
                   "exllamav3_us_issue": peer_us, "fp16_us_issue": peer_fp16,
                   "eager_us": time_eager(fn, len(ws))["median_us"], "graph_us": time_graph(fn, len(ws))["median_us"]}
            rec.update(self.time_fp16(k, n, rows))
            rec["weight_GBps_graph"] = k * n * bits / 8 / rec["graph_us"] / 1e3
            rec["vs_fp16_graph"] = rec["fp16_graph_us"] / rec["graph_us"]
            rec["vs_fp16_eager"] = rec["fp16_eager_us"] / rec["eager_us"]
            self.r.add("table", rec)
            del ws
            torch.cuda.empty_cache()

    def crossover(self):
        k = n = 8192
        fused = {1: self.best.get("1") or GemmConfig(block_m=1, btk=2), 2: GemmConfig(block_m=2, btk=1, num_warps=4),
                 4: GemmConfig(block_m=4, btk=1, num_warps=8),
                 16: self.best.get("16") or GemmConfig(block_m=16, btk=2, num_warps=4),
                 32: GemmConfig(block_m=32, btk=1), 64: GemmConfig(block_m=64, btk=1)}
        ws = self.weights(k, n, 4)

        def dequant(i, x):
            return exl3_matmul(x, ws[i], backend="triton", _force_path="dequant")

        def reconstruct(i, x):
            return exl3_matmul(x, ws[i], backend="triton", _force_path="reconstruct")

        for rows in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048):
            if self.out_of_time():
                break
            xs = [torch.randn(rows, k, device="cuda").half() for _ in ws]
            rec = {"rows": rows}
            cands = {f"fused bm{bm}": c for bm, c in fused.items()
                     if (bm <= rows <= 4 * bm or (bm == 16 and rows <= 16)) and rows <= 128}
            for name, cfg in cands.items():
                fn = lambda i: OPS.gemm.exl3_gemm_triton(xs[i], ws[i], cfg)  # noqa: E731
                rec[name] = time_eager(fn, len(ws))["median_us"]
                rec[name + " graph"] = time_graph(fn, len(ws))["median_us"]
            if rows >= 8:
                rec["dequant+matmul"] = time_eager(lambda i: dequant(i, xs[i]), len(ws))["median_us"]
                rec["dequant+matmul graph"] = time_graph(lambda i: dequant(i, xs[i]), len(ws))["median_us"]
            if rows >= 64:
                rec["reconstruct+matmul"] = time_eager(lambda i: reconstruct(i, xs[i]), len(ws))["median_us"]
                rec["reconstruct+matmul graph"] = time_graph(lambda i: reconstruct(i, xs[i]), len(ws))["median_us"]
            rec.update(self.time_fp16(k, n, rows, graph=False))
            self.r.add("crossover", rec)
        x = torch.randn(300, k, device="cuda").half()
        ref = exl3_matmul_ref(x.float(), ws[0])
        self.r.add("crossover_check", {"dequant_rel_err": rel_err(dequant(0, x), ref),
                                       "reconstruct_rel_err": rel_err(reconstruct(0, x), ref)})
        # where the time of the large-batch path goes (2048 rows)
        xs = [torch.randn(2048, k, device="cuda").half() for _ in ws]
        w_hat = OPS.dequant.dequant_inner_triton(ws[0])
        acc = torch.matmul(xs[0], w_hat)
        parts = {
            "rotate_in": lambda i: OPS.hadamard.exl3_input_rotate(xs[i], ws[i].suh),
            "dequant": lambda i: OPS.dequant.dequant_inner_triton(ws[i], out=w_hat),
            "matmul": lambda i: torch.matmul(xs[i], w_hat),
            "rotate_out": lambda i: OPS.hadamard.exl3_output_rotate(acc, ws[i].svh, None, torch.float16),
            "reconstruct": lambda i: OPS.reconstruct.reconstruct_weight_triton(ws[i], out=w_hat),
        }
        self.r.add("large_batch_parts", {name: time_eager(fn, len(ws))["median_us"] for name, fn in parts.items()})
        del ws
        torch.cuda.empty_cache()

    def dot_lanes(self):
        """Several rows (2, 4: FMA loop; 16, 32: tensor cores): lane-major word loads (one tile per warp-level
        load) against the default load layout, in CUDA graphs, fp16 torch.matmul in the same run."""
        bases = {2: OPS.gemm.GemmConfig(block_m=2, btk=1, num_warps=4),
                 4: OPS.gemm.GemmConfig(block_m=4, btk=2, num_warps=4, rotate_in_kernel=True),
                 16: OPS.gemm.GemmConfig(block_m=16, btk=2, num_warps=4),
                 32: OPS.gemm.GemmConfig(block_m=32, btk=1, num_warps=8)}
        for rows in (2, 4, 16, 32):
            base = replace(bases[rows], lane_major=False)
            configs = {"today": base, "lanes": replace(base, lane_major=True)}
            for k, n in ((8192, 8192), (5376, 21504), (21504, 5376), (4096, 14336), (4096, 4096)):
                if self.out_of_time():
                    return
                ws = self.weights(k, n, 4)
                xs = [torch.randn(rows, k, device="cuda").half() for _ in ws]
                rec = {"rows": rows, "shape": f"{k}x{n}"}
                for name, cfg in configs.items():
                    rec[f"{name}_rel_err"] = self.check_gemm(cfg, k, n, 4, Codebook.MCG, rows)
                    if rec[f"{name}_rel_err"] < MATMUL_TOL:
                        rec[f"{name}_graph_us"] = time_graph(lambda i: OPS.gemm.exl3_gemm_triton(xs[i], ws[i], cfg),
                                                             len(ws))["median_us"]
                rec.update(self.time_fp16(k, n, rows))
                self.r.add("dot_lanes", rec)
                del ws

    def two_rows(self):
        """Two rows (a step verifying one drafted token, batch 2): the FMA loop of 2-row blocks against a
        4-row FMA block and a 16-row tensor-core block with lane-major loads, in CUDA graphs."""
        configs = {"bm2": OPS.gemm.GemmConfig(block_m=2, btk=1, num_warps=4),
                   "bm4 lanes rot": OPS.gemm.GemmConfig(block_m=4, btk=2, num_warps=4, rotate_in_kernel=True,
                                                        lane_major=True),
                   "bm16 lanes": OPS.gemm.GemmConfig(block_m=16, btk=2, num_warps=4, lane_major=True)}
        for k, n in ((8192, 8192), (5376, 21504), (21504, 5376), (4096, 14336), (4096, 4096), (2560, 7680),
                     (2560, 2560), (4096, 1024)):
            if self.out_of_time():
                return
            ws = self.weights(k, n, 4)
            xs = [torch.randn(2, k, device="cuda").half() for _ in ws]
            rec = {"rows": 2, "shape": f"{k}x{n}"}
            for name, cfg in configs.items():
                rec[f"{name} rel_err"] = self.check_gemm(cfg, k, n, 4, Codebook.MCG, 2)
                if rec[f"{name} rel_err"] < MATMUL_TOL:
                    rec[f"{name} graph_us"] = time_graph(lambda i: OPS.gemm.exl3_gemm_triton(xs[i], ws[i], cfg),
                                                         len(ws))["median_us"]
            self.r.add("two_rows", rec)
            del ws

    def rotations(self):
        """The large-batch path's two Hadamard launches per schedule: checked against the PyTorch
        reference (ExLlamaV3's rounding points), then timed; GB/s counts bytes read + written."""
        from exl3_triton.kernels.reference.hadamard import hadamard_128_ref

        schedules = {
            "previous": {},  # set per shape below: the schedule before MANY_ROWS_SCHEDULE
            "H in registers": dict(h_in_registers=True),
            "H in registers, 2 blocks": dict(h_in_registers=True, row_blocks=2),
            "H in registers, 4 blocks": dict(h_in_registers=True, row_blocks=4),
            "H loaded, 4 blocks": dict(row_blocks=4),
            "H in registers, 8 warps": dict(h_in_registers=True, num_warps=8),
            "H in registers, 64 rows x 4": dict(h_in_registers=True, block_r=64, row_blocks=4),
            "H in registers, 128 rows x 4, 8 warps": dict(h_in_registers=True, row_blocks=4, num_warps=8),
        }
        for rows, k in ((2048, 8192), (8192, 4096), (512, 4096)):
            schedules["previous"] = dict(block_r=128 if rows >= 1024 else 64, row_blocks=1, h_in_registers=False)
            if self.out_of_time():
                break
            n_rot = 3
            xs = [torch.randn(rows, k, device=self.device).half() for _ in range(n_rot)]
            suh = [torch.randn(k, device=self.device).sign().half() for _ in range(n_rot)]
            accs = [torch.randn(rows, k, device=self.device).half() for _ in range(n_rot)]
            ref_in = hadamard_128_ref((xs[0].float() * suh[0].float()).half().float()).half()
            ref_out = hadamard_128_ref(accs[0].float(), post_scale=suh[0]).half()
            nbytes = 2 * rows * k * 2
            for name, sched in schedules.items():
                got_in = OPS.hadamard.exl3_input_rotate(xs[0], suh[0], schedule=sched)
                got_out = OPS.hadamard.exl3_output_rotate(accs[0], suh[0], None, torch.float16, schedule=sched)
                rec = {"rows": rows, "k": k, "schedule": name, "err_in": rel_err(got_in, ref_in),
                       "err_out": rel_err(got_out, ref_out)}
                for side, fn in (("in", lambda i: OPS.hadamard.exl3_input_rotate(xs[i], suh[i], schedule=sched)),
                                 ("out", lambda i: OPS.hadamard.exl3_output_rotate(accs[i], suh[i], None,
                                                                                   torch.float16, schedule=sched))):
                    t = time_graph(fn, n_rot)["median_us"]
                    rec[f"{side}_graph_us"] = t
                    rec[f"{side}_GBps"] = nbytes / t / 1e3
                self.r.add("rotations", rec)
                print(f"rotations: {rec}", flush=True)

    def moe(self):
        shapes = [("openpangu gate/up", 2560, 1024, False), ("openpangu down", 1024, 2560, True),
                  ("deepseek-v4 gate/up", 4096, 2048, False)]
        for name, k, n, weighted in shapes:
            for bits in (4, 2):
                if self.out_of_time():
                    return
                stack = Exl3ExpertStack.from_weights(
                    [synthetic_exl3(k, n, bits, Codebook.MCG, seed=i) for i in range(256)], key=name)
                for tokens in (1, 4, 8):
                    g = torch.Generator(device="cuda").manual_seed(tokens)
                    n_rot = 8
                    ids = [torch.stack([torch.randperm(256, generator=g, device="cuda")[:8] for _ in range(tokens)])
                           for _ in range(n_rot)]
                    rws = [torch.rand(tokens, 8, device="cuda", generator=g) for _ in range(n_rot)]
                    shape_x = (tokens, 8, k) if weighted else (tokens, k)
                    xs = [torch.randn(*shape_x, device="cuda").half() for _ in range(n_rot)]
                    run = lambda i: OPS.moe.exl3_moe_triton(xs[i], stack, ids[i], rws[i] if weighted else None)  # noqa
                    y = run(0)
                    err = rel_err(y, exl3_moe_ref(xs[0].float(), stack, ids[0], rws[0] if weighted else None))
                    rec = {"projection": name, "K": bits, "tokens": tokens, "shape": f"{k}x{n}", "rel_err": err,
                           "eager_us": time_eager(run, n_rot)["median_us"], "graph_us": time_graph(run, n_rot)["median_us"]}
                    active = len(torch.unique(ids[0]))
                    rec["weight_GBps_graph"] = active * k * n * bits / 8 / rec["graph_us"] / 1e3
                    self.r.add("moe", rec)
                if bits == 4:  # prefill: many tokens, grouped by expert
                    for tokens in (16, 128, 1024):
                        g = torch.Generator(device="cuda").manual_seed(tokens)
                        idg = torch.stack([torch.randperm(256, generator=g, device="cuda")[:8] for _ in range(tokens)])
                        rwg = torch.rand(tokens, 8, device="cuda", generator=g)
                        xg = torch.randn(*((tokens, 8, k) if weighted else (tokens, k)), device="cuda").half()
                        run = lambda i: OPS.moe.exl3_moe_triton(xg, stack, idg, rwg if weighted else None,  # noqa
                                                                schedule="grouped")
                        err = rel_err(run(0), exl3_moe_ref(xg.float(), stack, idg, rwg if weighted else None))
                        self.r.add("moe_grouped", {"projection": name, "K": bits, "tokens": tokens, "rel_err": err,
                                                   "eager_us": time_eager(run, 1)["median_us"]})
                del stack
                torch.cuda.empty_cache()

    def moe_variants(self, shapes=MOE_VARIANT_SHAPES, bits_list=None, token_counts=(1, 4, 8), num_experts=256,
                     top_k=8):
        """MoE decode (issue 3 / 8): every ``moe_variant_configs`` schedule checked against ``exl3_moe_ref`` (output
        poisoned with NaN first), then timed in CUDA graphs; per case also the speed-up over the previous loop."""
        configs = moe_variant_configs()
        cuda = self.device == "cuda"
        for bits in bits_list or self.moe_bits:  # all shapes at 4 bits first: what a cut budget leaves out is the 2-bit half
            for name, k, n, weighted in shapes:
                if self.out_of_time():
                    return
                stack = Exl3ExpertStack.from_weights(
                    [synthetic_exl3(k, n, bits, Codebook.MCG, device=self.device, seed=i) for i in range(num_experts)],
                    key=name)
                for tokens in token_counts:
                    g = torch.Generator(device=self.device).manual_seed(tokens)
                    n_rot = 8 if cuda else 1  # each call routes to other experts: weights leave L2 between calls
                    ids = [torch.stack([torch.randperm(num_experts, generator=g, device=self.device)[:top_k]
                                        for _ in range(tokens)]) for _ in range(n_rot)]
                    rws = [torch.rand(tokens, top_k, device=self.device, generator=g) if weighted else None
                           for _ in range(n_rot)]
                    shape_x = (tokens, top_k, k) if weighted else (tokens, k)
                    xs = [torch.randn(*shape_x, device=self.device).half() for _ in range(n_rot)]
                    out_shape = (tokens, n) if weighted else (tokens, top_k, n)
                    ref = exl3_moe_ref(xs[0].float(), stack, ids[0], rws[0])
                    active = len(torch.unique(ids[0]))
                    times = {}
                    for variant, cfg in configs.items():
                        if self.out_of_time():
                            break
                        rec = {"projection": name, "shape": f"{k}x{n}", "K": bits, "tokens": tokens,
                               "variant": variant, "config": cfg.describe()}
                        try:
                            out = torch.full(out_shape, float("nan"), dtype=torch.float16, device=self.device)
                            y = OPS.moe.exl3_moe_triton(xs[0], stack, ids[0], rws[0], schedule="decode", decode=cfg,
                                                        out=out)
                            rec["rel_err"] = rel_err(y, ref) if torch.isfinite(y).all() else float("inf")
                            if rec["rel_err"] < MATMUL_TOL and cuda:
                                run = lambda i: OPS.moe.exl3_moe_triton(xs[i], stack, ids[i], rws[i],  # noqa: E731
                                                                        schedule="decode", decode=cfg)
                                rec["graph_us"] = time_graph(run, n_rot)["median_us"]
                                rec["weight_GBps_graph"] = active * k * n * bits / 8 / rec["graph_us"] / 1e3
                                times[variant] = rec["graph_us"]
                        except Exception as e:  # a variant that does not compile is reported, not fatal
                            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        if "previous" in times and variant in times:
                            rec["vs_previous"] = times["previous"] / times[variant]
                        self.r.add("moe_variants", rec)
                del stack
                if cuda:
                    torch.cuda.empty_cache()

    def formats(self):
        cfg = self.best.get("1") or GemmConfig(block_m=1, rotate_in_kernel=True)
        cfg16 = self.best.get("16") or GemmConfig()
        for bits in SUPPORTED_BITS:
            for cb in Codebook:
                if (bits != int(bits) and cb != Codebook.MUL1) or self.out_of_time():
                    continue
                for rows, c in ((1, cfg), (16, cfg16)):
                    err = self.check_gemm(c, 1024, 768, bits, cb, rows)
                    self.r.add("formats", {"K": bits, "codebook": cb.label, "rows": rows, "rel_err": err,
                                           "ok": err < MATMUL_TOL})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="results directory (default bench/results)")
    parser.add_argument("--sections", default="env,exact,gemv,m16,splits,table,crossover,moe,formats",
                        help="also: gemv_shapes, occupancy, gemv_variants (one-row variants, issue 3), "
                        "moe_variants (MoE decode schedules, issues 3 and 8)")
    parser.add_argument("--budget", type=float, default=500, help="seconds after which remaining sections are skipped")
    parser.add_argument("--moe-bits", default="4,2", help="bit widths of the moe_variants section, in order")
    parser.add_argument("--variants", default="", help="gemv_variants: only these (comma-separated names) and today's")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    meta = environment()
    out_dir = Path(args.out) if args.out else REPO / "bench" / "results"
    name = f"kernels-{meta['date']}-{meta['gpu'].replace(' ', '_')}.json"
    bench = Bench(Results(out_dir / name, meta), args.budget)
    bench.only_variants = [v for v in args.variants.split(",") if v]
    bench.moe_bits = tuple(float(b) if "." in b else int(b) for b in args.moe_bits.split(","))
    for section in args.sections.split(","):
        if bench.out_of_time():
            print(f"budget spent, skipping {section}")
            continue
        try:
            getattr(bench, section)()
        except Exception as e:
            import traceback

            traceback.print_exc()
            bench.r.add("errors", {"section": section, "error": f"{type(e).__name__}: {str(e)[:500]}"})
    print(f"results: {out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
