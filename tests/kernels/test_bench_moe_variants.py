"""The ``moe_variants`` section of bench/kernels.py at a tiny shape: every MoE decode schedule it will time must
pass its reference check (NaN-poisoned output against ``exl3_moe_ref``; on the CPU through Triton's interpreter,
untimed; on a GPU also timed), and the report must render each one."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import report  # noqa: E402


def test_moe_variants_section_checks_every_variant(bench_kernels, device, tmp_path):
    results = bench_kernels.Results(tmp_path / "r.json", {"gpu": device})
    bench = bench_kernels.Bench(results, budget=600, device=device)
    # the routing-weighted projection (the in-kernel sum); the unweighted path is the same code minus the sum
    shapes = [("tiny down", 128, 128, True)]
    bench.moe_variants(shapes=shapes, bits_list=(4,), token_counts=(1,), num_experts=3, top_k=2)
    records = json.loads((tmp_path / "r.json").read_text())["sections"]["moe_variants"]
    names = list(bench_kernels.moe_variant_configs())
    for name, *_ in shapes:  # every variant, in order, none skipped, each passing the check
        assert [r["variant"] for r in records if r["projection"] == name] == names
    for r in records:
        assert "error" not in r, r
        assert r["rel_err"] < bench_kernels.MATMUL_TOL, r
    # each variant selects a different schedule
    assert len({r["config"] for r in records}) == len(names)
    table = report._moe_variants(records)
    assert table[0].count("|") == len(names) + 4 and len(table) == 2 + len(shapes) + 1
