"""Where a decode step's time goes: kernels launched per step and the costliest ops (GPU).

    python bench/profile_decode.py --arch openpangu_v2 --synthetic tiny [--batch 1] [--out DIR]

Runs a few eager decode steps of a synthetic model (bench/synthetic.py) under the PyTorch
profiler after a short prefill and records the number of GPU kernels per step (inside a CUDA
graph each costs a few microseconds of launch gap, so at ~50 layers this count decides whether
a 100 tokens/s target is reachable) and the 25 ops with the most GPU time. JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import open_results, synthetic_name  # noqa: E402
from synthetic import SyntheticCheckpoint  # noqa: E402

from exl3_triton.model import load_checkpoint  # noqa: E402
from exl3_triton.runtime.cache import PagedCache  # noqa: E402
from exl3_triton.runtime.runner import ModelRunner, StepItem  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=None)
    p.add_argument("--synthetic", default="tiny")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/profile_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    name = synthetic_name(args.arch, args.synthetic)
    res = open_results("profile", name, args.out)
    model = load_checkpoint(SyntheticCheckpoint(name), device="cuda")
    net = model.network
    total = args.prompt_len + args.steps + 8
    page = 64
    pages = -(-total // page)
    cache = PagedCache(net.cache_spec(), num_pages=args.batch * pages + 2, page_size=page, max_seqs=args.batch + 1)
    runner = ModelRunner(net, cache, max_pages_per_seq=pages, use_cuda_graphs=False)
    seqs = [cache.new_sequence() for _ in range(args.batch)]
    g = torch.Generator().manual_seed(0)
    for s in seqs:
        cache.reserve(s, total)
        runner.run([StepItem(s, torch.randint(0, net.vocab_size, (args.prompt_len,), generator=g).tolist(), True)])
    step = [StepItem(s, [1], True) for s in seqs]
    runner.run(step)  # warm-up: compiles the decode-path kernels
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            runner.run(step)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages()]
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    gpu_us = sum(e.self_device_time_total for e in events)
    res.add("step", {"model": name, "batch": args.batch, "layers": len(net.cache_spec()),
                     "kernels_per_step": kernels / args.steps, "gpu_ms_per_step": gpu_us / args.steps / 1000})
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:25]
    for e in top:
        res.add("top_ops", {"op": e.key[:80], "calls_per_step": e.count / args.steps,
                            "gpu_us_per_step": e.self_device_time_total / args.steps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
