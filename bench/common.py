"""Shared helpers for the GPU benchmarks: synthetic weights, timing, result files.

Timing follows the method the kernel issue fixes for comparisons with
ExLlamaV3: CUDA events recorded around each Python call (so per-call dispatch is
included), 10 warm-up calls, the median of 100 timed calls, and weights rotated
among enough copies to exceed the L2 cache. ``time_graph`` times the same calls
captured in one CUDA graph.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def synthetic_exl3(k: int, n: int, bits: float, codebook, device="cuda", seed: int = 0, bias: bool = False):
    """A random-trellis EXL3 weight of real shape, generated on the device."""
    from exl3_triton.kernels.weights import Codebook, Exl3Weight

    g = torch.Generator(device=device).manual_seed(seed)
    words = int(16 * bits)
    trellis = torch.randint(-32768, 32768, (k // 16, n // 16, words), generator=g, device=device,
                            dtype=torch.int32).to(torch.int16)
    suh = (torch.randn(k, generator=g, device=device) * 0.02).half()
    svh = (torch.randn(n, generator=g, device=device) * 0.02).half()
    # a bias of the outputs' own size (|x W| ~ 0.01-0.04 for randn x at these scales): a bias of ~1 would dominate the
    # output's norm and hide errors of x W from the relative-error checks
    b = (torch.randn(n, generator=g, device=device) * 0.02).half() if bias else None
    return Exl3Weight(trellis, suh, svh, bits, Codebook(codebook), bias=b, key=f"synthetic_{k}x{n}")


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def l2_bytes(device="cuda") -> int:
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "L2_cache_size", 50 << 20)


def rotation_count(bytes_per_copy: int, device="cuda", minimum: int = 2, maximum: int = 16) -> int:
    """Copies needed so that cycling through them streams > 2x L2 from memory."""
    return max(minimum, min(maximum, math.ceil(2 * l2_bytes(device) / max(1, bytes_per_copy)) + 1))


def time_eager(fn, n_rot: int, warmup: int = 10, iters: int = 100) -> dict:
    """Median/p10/p90 microseconds of ``fn(i % n_rot)``, events around each Python call."""
    for i in range(warmup):
        fn(i % n_rot)
    torch.cuda.synchronize()
    events = []
    for i in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(i % n_rot)
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    us = sorted(s.elapsed_time(e) * 1000 for s, e in events)
    return {"median_us": statistics.median(us), "p10_us": us[len(us) // 10], "p90_us": us[9 * len(us) // 10]}


def time_graph(fn, n_rot: int, replays: int = 20) -> dict:
    """Microseconds per call of ``n_rot`` calls captured in one CUDA graph (median over replays)."""
    for i in range(n_rot):  # compile / allocate outside the capture
        fn(i)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n_rot):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_rot):
            fn(i)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        per_call.append(s.elapsed_time(e) * 1000 / n_rot)
    return {"median_us": statistics.median(per_call)}


def copy_bandwidth(nbytes: int = 1 << 30, device="cuda") -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return 2 * nbytes / statistics.median(times) / 1e9


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "l2_mb": l2_bytes() / 2**20,
        "memory_gb": props.total_memory / 2**30,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }


class Results:
    """A JSON results file rewritten after every record, so a cut-off run keeps what it measured."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta, "sections": {}}
        self.t0 = time.time()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def add(self, section: str, record: dict) -> None:
        self.data["sections"].setdefault(section, []).append(record)
        self.save()
        print(f"[{time.time() - self.t0:6.1f}s] {section}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def elapsed(self) -> float:
        return time.time() - self.t0
