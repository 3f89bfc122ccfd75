"""bench/reconstruct.py's check, which gates every timing it records: it passes on the real kernel at small sizes
(through Triton's interpreter on a CPU) and catches a wrong one."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "reconstruct.py"


@pytest.fixture(scope="module")
def bench(triton_kernels):
    spec = importlib.util.spec_from_file_location("bench_reconstruct_script", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.OPS = triton_kernels
    return module


def test_check_passes_every_schedule_and_path(bench, device, tmp_path):
    results = bench.Results(tmp_path / "r.json", {"device": device})
    default = dict(bench.OPS.reconstruct.SCHEDULE)
    schedules = [default, {**default, "programs_per_sm": 0, "row_split": 4, "h_from_memory": True}]
    assert bench.check(results, device, schedules) == 0
    records = json.loads((tmp_path / "r.json").read_text())["sections"]["check"]
    # every schedule on the first format, the first schedule on every other; both matmul paths per format; grouped
    formats = len(bench.CHECK_FORMATS)
    assert len(records) == len(schedules) + (formats - 1) + 2 * formats + 1
    assert all(r["rel_err"] < bench.TOL for r in records)


def test_check_catches_a_wrong_weight(bench, device, tmp_path, monkeypatch):
    real = bench.OPS.reconstruct.reconstruct_weight_triton

    def off_by_one_row(w, **kw):  # one row of W left as the poison the check fills it with
        out = real(w, **kw)
        out[-1] = torch.nan
        return out

    monkeypatch.setattr(bench.OPS.reconstruct, "reconstruct_weight_triton", off_by_one_row)
    results = bench.Results(tmp_path / "r.json", {"device": device})
    assert bench.check(results, device, [dict(bench.OPS.reconstruct.SCHEDULE)], formats=bench.CHECK_FORMATS[:1]) >= 2


def test_sweep_schedules_are_valid(bench):
    schedules = bench.sweep_schedules()
    assert schedules[0] == bench.OPS.reconstruct.SCHEDULE
    assert len({json.dumps(s, sort_keys=True) for s in schedules}) == len(schedules)
    assert {s["programs_per_sm"] for s in schedules} == {0, 2, 4}
