"""Check, then time, the fused mHC site kernels against today's PyTorch ops (issue 8).

    python bench/mhc_sites.py [--out DIR] [--rows 1,2,4,8,16,64,512] [--shapes flash,dsv4] [--budget SECONDS]
                              [--check-only] [--device cpu --width 64 --rows 1,3]   (logic test, interpreter)

One decode layer has two mHC sites back to back (attention, then MLP), each block starting with its
RMSNorm and a cast to fp16. For each shape and row count this measures, in CUDA graphs
(bench/common.py ``time_graph``), one layer's pair of sites with the block after its norm replaced
by a precomputed output (so only the mHC work and the input norms are timed):

* ``pytorch_us``: ``HyperSite.forward_unfused`` twice -- today's path (``F.rms_norm``, the cuBLAS
  projection, the site-weights Triton kernel, the collapse, the update; the block's norm and cast);
* ``fused_us``: ``run_sites`` -- partials, enter (+ the block's norm), exit (+ the next site's
  partials), enter, exit;
* each fused kernel alone, and the chunk width / tokens-per-program variants of the projection.

Each site's ``phi`` is 1 MB at Flash shapes and a model has 92 of them (more than L2), so the
timed calls rotate over enough site copies to stream ``phi`` from memory, as in a decode step.
Before timing, every variant's output (streams after both sites, and the first block's input)
is checked against the PyTorch path on the same inputs (outputs poisoned with NaN first).
Results: ``mhc-sites-<date>-<gpu>.json`` under ``--out`` (default ``$OUT`` or bench/results).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Results, environment, rotation_count, time_graph  # noqa: E402

from exl3_triton.arch.blocks import mhc  # noqa: E402
from exl3_triton.arch.blocks.mhc import HyperSite, run_sites  # noqa: E402
from exl3_triton.arch.blocks.norm import RMSNorm  # noqa: E402
from exl3_triton.kernels import triton_ops  # noqa: E402

SHAPES = {"flash": (4, 2560, True), "dsv4": (4, 4096, False)}  # streams, hidden size, gamma
CHECK_RTOL = 1e-4  # relative to the largest value: fp32 sums in another order
INPUT_RTOL = 2e-3  # the blocks' fp16 inputs: one rounding step apart where the fp32 values straddle one


def make_site(streams: int, width: int, gamma: bool, device, seed: int) -> HyperSite:
    g = torch.Generator(device=device).manual_seed(seed)
    m = (2 + streams) * streams
    return HyperSite(torch.randn(m, streams * width, generator=g, device=device) * 0.02,
                     torch.rand(3, generator=g, device=device) + 0.5, torch.randn(m, generator=g, device=device),
                     streams, sinkhorn_iters=20,
                     gamma=1 + 0.1 * torch.randn(streams * width, generator=g, device=device) if gamma else None)


@contextlib.contextmanager
def kernels_on(device: str):
    """The fused path on ``device`` (on a CPU: the Triton kernels under the interpreter)."""
    k = triton_ops.load().mhc
    saved = [(a, getattr(mhc, a)) for a in ("_fused_site_partials", "_fused_site_enter", "_fused_site_exit")]
    if device != "cuda":
        for (attr, _), fn in zip(saved, (k.mhc_site_partials, k.mhc_site_enter, k.mhc_site_exit)):
            setattr(mhc, attr, lambda x, fn=fn: fn)
    try:
        yield k
    finally:
        for attr, value in saved:
            setattr(mhc, attr, value)


@contextlib.contextmanager
def chunking(k, block_d: int | None = None, tokens: int | None = None, chunk_warps: int | None = None,
             enter_warps: int | None = None):
    """A projection chunk width (``site_chunk``), tokens per program or warps other than the defaults."""
    names = ("SMALL_BATCH_BLOCK_D", "LARGE_BATCH_BLOCK_D", "_tokens_per_program", "CHUNK_WARPS", "ENTER_WARPS")
    saved = [getattr(k, a) for a in names]
    for name, value in zip(names, (block_d, block_d, tokens and (lambda rows, chunks: tokens), chunk_warps,
                                   enter_warps)):
        if value:
            setattr(k, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(k, name, value)


class Layer:
    """Two sites with fixed block outputs, and the inputs to run them on."""

    def __init__(self, streams, width, gamma, rows, device, seed):
        self.sites = (make_site(streams, width, gamma, device, 2 * seed),
                      make_site(streams, width, gamma, device, 2 * seed + 1))
        g = torch.Generator(device=device).manual_seed(seed)
        self.norms = [RMSNorm(torch.rand(width, generator=g, device=device) + 0.5, 1e-5) for _ in range(2)]
        self.x = torch.randn(rows, streams, width, generator=g, device=device)
        self.outs = [torch.randn(rows, width, generator=g, device=device) for _ in range(2)]
        self.inputs = []  # the block inputs seen (checked against each other)

    def pairs(self, record: bool = False):
        def block(k):
            def run(y):
                if record:
                    self.inputs.append(y.clone())
                return self.outs[k]
            return run
        return [(site, block(k), self.norms[k], torch.float16) for k, site in enumerate(self.sites)]

    def pytorch(self, record=False):
        x = self.x
        for site, block, norm, dtype in self.pairs(record):
            x = site.forward_unfused(x, lambda y, block=block, norm=norm, dtype=dtype: block(norm(y).to(dtype)))
        return x

    def fused(self, record=False):
        return run_sites(self.x, *self.pairs(record))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def check(layer: Layer) -> dict:
    layer.inputs.clear()
    want = layer.pytorch(record=True)
    got = layer.fused(record=True)
    errs = {"streams_rel_err": rel(got, want), "block_input_rel_err": max(rel(layer.inputs[2 + i], layer.inputs[i])
                                                                            for i in range(2))}
    errs["ok"] = bool(errs["streams_rel_err"] <= CHECK_RTOL and errs["block_input_rel_err"] <= INPUT_RTOL
                      and torch.isfinite(got).all())
    return errs


def time_layers(fn, layers, device) -> float | None:
    if device != "cuda":
        return None
    return time_graph(lambda i: fn(layers[i]), len(layers))["median_us"]


def run_shape(r: Results, name: str, rows_list, device, check_only: bool, budget: float, width=None):
    streams, d, gamma = SHAPES[name]
    d = width or d
    with kernels_on(device) as k:
        for rows in rows_list:
            if r.elapsed() > budget:
                r.add("skipped", {"shape": name, "rows": rows, "why": "budget"})
                continue
            phi_bytes = (2 + streams) * streams * streams * d * 4
            n_rot = rotation_count(2 * phi_bytes + 4 * rows * streams * d * 4, maximum=64) if device == "cuda" else 1
            layers = [Layer(streams, d, gamma, rows, device, seed) for seed in range(n_rot)]
            rec = {"shape": name, "streams": streams, "width": d, "gamma": gamma, "rows": rows, "rotation": n_rot,
                   "block_d": k.site_chunk(rows, d)[0], "chunks": k.site_chunk(rows, d)[1]}
            rec.update(check(layers[0]))
            if not rec["ok"]:
                r.add("check_failed", rec)
                continue
            if not check_only:
                rec["pytorch_us"] = time_layers(Layer.pytorch, layers, device)
                rec["fused_us"] = time_layers(Layer.fused, layers, device)
                if rec["fused_us"]:
                    rec["speedup"] = rec["pytorch_us"] / rec["fused_us"]
                rec.update(time_kernels(k, layers, device))
            r.add("layer_sites", rec)
            if not check_only:
                variants(r, k, name, layers, rows, d, device)


def time_kernels(k, layers, device) -> dict:
    """Each fused launch alone (inputs precomputed outside the graph)."""
    if device != "cuda":
        return {}
    a = layers[0].sites[0]
    prep = []
    for layer in layers:
        s0, s1 = layer.sites
        part = k.mhc_site_partials(layer.x, s0.phi, s0.gamma)
        y, _, post, comb = k.mhc_site_enter(layer.x, *part, s0.scale, s0.base, a.streams, a.iters, a.eps, a.pre_eps,
                                            a.sinkhorn_eps)
        prep.append((layer, part, post, comb, s0, s1))

    def enter(p, normed):
        return k.mhc_site_enter(p[0].x, *p[1], p[4].scale, p[4].base, a.streams, a.iters, a.eps, a.pre_eps,
                                a.sinkhorn_eps, (p[0].norms[0].weight, 1e-5, torch.float16) if normed else None)
    return {
        "partials_us": time_graph(lambda i: k.mhc_site_partials(prep[i][0].x, prep[i][4].phi, prep[i][4].gamma),
                                  len(prep))["median_us"],
        "enter_us": time_graph(lambda i: enter(prep[i], False), len(prep))["median_us"],
        "enter_normed_us": time_graph(lambda i: enter(prep[i], True), len(prep))["median_us"],
        "exit_next_us": time_graph(lambda i: k.mhc_site_exit(prep[i][0].x, prep[i][0].outs[0], prep[i][2], prep[i][3],
                                                             prep[i][5].phi, prep[i][5].gamma), len(prep))["median_us"],
        "exit_us": time_graph(lambda i: k.mhc_site_exit(prep[i][0].x, prep[i][0].outs[0], prep[i][2], prep[i][3]),
                              len(prep))["median_us"],
    }


def variants(r: Results, k, name, layers, rows, d, device):
    """The projection's chunk width and tokens per program, then the kernels' warps (at the default
    chunking): each checked, then the layer timed."""
    options = [{"block_d": b, "tokens": t} for b in (16, 32, 64, 128) for t in (1, 2, 4, 8, 16)
               if t <= rows and b <= d]
    options += [{"chunk_warps": w} for w in (2, 8)] + [{"enter_warps": w} for w in (2, 4)]
    for opts in options:
        with chunking(k, **opts):
            rec = {"shape": name, "rows": rows, **opts}
            try:
                rec.update(check(layers[0]))
                if rec["ok"]:
                    rec["fused_us"] = time_layers(Layer.fused, layers, device)
            except Exception as e:  # e.g. out of registers / shared memory at a large tile
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            r.add("variants", rec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="results directory (default $OUT or bench/results)")
    p.add_argument("--rows", default="1,2,4,8,16,64,512")
    p.add_argument("--shapes", default="flash,dsv4")
    p.add_argument("--budget", type=float, default=400, help="seconds after which remaining row counts are skipped")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--width", type=int, default=None, help="hidden size instead of the shape's (a CPU logic test)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/mhc_sites.py needs a CUDA GPU (or --device cpu for a logic test)", file=sys.stderr)
        return 2
    meta = environment() if args.device == "cuda" else {"device": args.device, "date": "cpu", "gpu": "cpu"}
    out_dir = Path(args.out) if args.out else REPO / "bench" / "results"
    path = out_dir / f"mhc-sites-{meta['date']}-{meta['gpu'].replace(' ', '_')}.json"
    r = Results(path, meta)
    rows = [int(v) for v in args.rows.split(",")]
    with torch.inference_mode():
        for name in args.shapes.split(","):
            try:
                run_shape(r, name, rows, args.device, args.check_only, args.budget, args.width)
            except Exception as e:
                import traceback

                traceback.print_exc()
                r.add("errors", {"shape": name, "error": f"{type(e).__name__}: {str(e)[:500]}"})
    print(f"results: {path}")
    return 1 if "check_failed" in r.data["sections"] or "errors" in r.data["sections"] else 0


if __name__ == "__main__":
    sys.exit(main())
