"""Render a bench/kernels.py results file as the Markdown tables of docs/performance.md.

    python bench/report.py bench/results/kernels-2026-11-22-H100-run8.json
"""

from __future__ import annotations

import json
import sys


def _f(v, digits=1):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def render(data: dict) -> str:
    meta, sec = data["meta"], data["sections"]
    out = [f"GPU {meta['gpu']} ({meta['sms']} SMs, {meta['l2_mb']:.0f} MB L2), torch {meta['torch']}, "
           f"Triton {meta['triton']}, {meta['date']}, command `{meta['command']}`", ""]
    env = (sec.get("env") or [{}])[0]
    if env:
        out += [f"Copy bandwidth (read + write): {env['copy_bandwidth_GBps']:.0f} GB/s. Launch cost per Python call "
                f"(events around an idle GPU): empty Triton kernel {env['empty_triton_launch_us']:.1f} us through "
                f"Triton, {env.get('empty_fast_launch_us', float('nan')):.1f} us through `FastLauncher`.", ""]
    if sec.get("table"):
        out += ["| shape (in x out) | K | rows | ours eager us | ours graph us | fp16 eager us | fp16 graph us | "
                "graph vs fp16 | ExLlamaV3 us (issue) | weight GB/s (graph) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sec["table"]:
            out.append(f"| {r['shape']} | {r['K']:g} | {r['rows']} | {_f(r['eager_us'])} | {_f(r['graph_us'])} | "
                       f"{_f(r['fp16_eager_us'])} | {_f(r['fp16_graph_us'])} | {r['fp16_graph_us'] / r['graph_us']:.2f}x | "
                       f"{r['exllamav3_us_issue']} | {_f(r['weight_GBps_graph'], 0)} |")
        out.append("")
    if sec.get("crossover"):
        keys = []
        for r in sec["crossover"]:
            keys += [k for k in r if k.endswith("graph") and k not in keys]
        out += ["| rows | " + " | ".join(keys) + " | fp16 eager us |", "|---" * (len(keys) + 2) + "|"]
        for r in sec["crossover"]:
            out.append(f"| {r['rows']} | " + " | ".join(_f(r.get(k)) for k in keys) + f" | {_f(r['fp16_eager_us'])} |")
        out.append("")
    if sec.get("large_batch_parts"):
        p = sec["large_batch_parts"][0]
        out += ["Large-batch path at 2048 rows, per part (eager us): " +
                ", ".join(f"{k} {v:.1f}" for k, v in p.items()), ""]
    if sec.get("moe"):
        out += ["| projection | K | tokens | eager us | graph us | weight GB/s (graph) |", "|---|---|---|---|---|---|"]
        for r in sec["moe"]:
            out.append(f"| {r['projection']} {r['shape']} | {r['K']:g} | {r['tokens']} | {_f(r['eager_us'])} | "
                       f"{_f(r['graph_us'])} | {_f(r['weight_GBps_graph'], 0)} |")
        out.append("")
    if sec.get("moe_grouped"):
        out += ["| grouped (prefill) projection | K | tokens | eager us |", "|---|---|---|---|"]
        for r in sec["moe_grouped"]:
            out.append(f"| {r['projection']} | {r['K']:g} | {r['tokens']} | {_f(r['eager_us'])} |")
        out.append("")
    if sec.get("splits"):
        out += ["| shape | rows | split | eager us | graph us |", "|---|---|---|---|---|"]
        for r in sec["splits"]:
            out.append(f"| {r['shape']} | {r['rows']} | {r['split']} | {_f(r['eager_us'])} | {_f(r['graph_us'])} |")
        out.append("")
    if sec.get("gemv_variants_summary"):
        out += _gemv_variants(sec)
    if sec.get("moe_variants"):
        out += _moe_variants(sec["moe_variants"])
    return "\n".join(out)


def _moe_variants(records: list[dict]) -> list[str]:
    """MoE decode schedules (issues 3 / 8): one row per projection, K and token count, one column per variant,
    graph us and the speed-up over the previous loop; failed checks and errors are shown, not dropped."""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    cases = list(dict.fromkeys((r["projection"], r["shape"], r["K"], r["tokens"]) for r in records))
    cell = {((r["projection"], r["shape"], r["K"], r["tokens"]), r["variant"]): r for r in records}

    def show(r):
        if r is None:
            return "-"
        if "error" in r:
            return "error"
        if "graph_us" not in r:
            return f"check failed ({r['rel_err']:.1e})" if r.get("rel_err", 0) >= 2e-3 else "untimed"
        return f"{r['graph_us']:.1f}" + (f" ({r['vs_previous']:.2f}x)" if r.get("vs_previous") else "")

    out = ["| projection | K | tokens | " + " | ".join(variants) + " |", "|---" * (len(variants) + 3) + "|"]
    for case in cases:
        out.append(f"| {case[0]} {case[1]} | {case[2]:g} | {case[3]} | " +
                   " | ".join(show(cell.get((case, v))) for v in variants) + " |")
    return out + [""]


def _gemv_variants(sec: dict) -> list[str]:
    """One-row variants (issue 3): graph us per shape, and the speed-up over today's schedule."""
    rows = sec["gemv_variants_summary"]
    shapes = list(dict.fromkeys(f"{r['shape']} K{r['K']:g}" for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in sec.get("gemv_variants", []) if "variant" in r))
    cell = {(f"{r['shape']} K{r['K']:g}", r["variant"]): r for r in rows}
    out = ["| variant | " + " | ".join(shapes) + " |", "|---" * (len(shapes) + 1) + "|"]
    for v in variants:
        out.append(f"| {v} | " + " | ".join(
            f"{cell[s, v]['graph_us']:.1f} ({cell[s, v]['vs_today']:.2f}x)" if (s, v) in cell else "-"
            for s in shapes) + " |")
    fp16 = {f"{r['shape']} K{r['K']:g}": r.get("fp16_graph_us") for r in rows}
    out += ["| fp16 torch.matmul | " + " | ".join(_f(fp16[s]) for s in shapes) + " |", ""]
    if sec.get("gemv_variants_splits"):
        out += ["| shape | fastest variant at split | graph us |", "|---|---|---|"]
        for r in sec["gemv_variants_splits"]:
            out.append(f"| {r['shape']} K{r['K']:g} | {r['variant']} | {_f(r.get('graph_us'))} |")
        out.append("")
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(render(json.load(open(path))))
