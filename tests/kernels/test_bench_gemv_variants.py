"""The ``gemv_variants`` section of bench/kernels.py at a tiny shape: every one-row variant it will time
must pass its reference check (on the CPU through Triton's interpreter, untimed; on a GPU also timed)."""

import json


def test_gemv_variants_section_checks_every_variant(bench_kernels, device, tmp_path):
    results = bench_kernels.Results(tmp_path / "r.json", {"gpu": device})
    bench = bench_kernels.Bench(results, budget=600, device=device)
    bench.gemv_variants(shapes=[(128, 256, 4)])
    records = json.loads((tmp_path / "r.json").read_text())["sections"]["gemv_variants"]
    names = bench_kernels.gemv_variant_configs()
    assert [r["variant"] for r in records] == list(names)  # every variant, in order, none skipped
    for r in records:
        assert "error" not in r, r
        assert r["rel_err"] < bench_kernels.MATMUL_TOL, r
    # the variants really differ from today's schedule (each selects a different kernel path)
    assert len({r["config"] for r in records}) == len(records)
