"""Where a decode step's GPU time goes: kernel time by kernel name (torch.profiler, eager steps).

    python bench/profile_decode.py --synthetic llama3-8b --bits 4 [--batch 1] [--steps 8] [--out DIR]
    python bench/profile_decode.py --arch openpangu_v2 --synthetic tiny

Eager (not graph) decode steps are profiled so that every kernel is attributed by name; a
CUDA graph replays the same kernels without the host launch gaps. Prints the kernels by total
time per step, the kernel count per step and the summed kernel time per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import forced_acceptance, open_results, synthetic_name  # noqa: E402
from synthetic import SyntheticCheckpoint  # noqa: E402

from exl3_triton import Generator, Job  # noqa: E402
from exl3_triton.model import load_checkpoint  # noqa: E402


def kernel_family(name: str) -> str:
    """Group kernel names that differ only in template arguments / specialisation."""
    for key in ("_exl3_gemm", "exl3_moe", "paged_decode", "rope_store", "rms_norm", "elementwise", "reduce",
                "gemv", "gemm", "sdpa", "flash", "softmax", "cat", "copy", "index", "topk", "sort"):
        if key in name.lower():
            return key
    return name[:60]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=None, help="model family of a synthetic size name (as bench/decode.py)")
    p.add_argument("--synthetic", default="llama3-8b")
    p.add_argument("--bits", type=float, default=4)
    p.add_argument("--head-bits", type=float, default=6)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--mtp", type=int, default=0, help="profile steps with N-token MTP drafting")
    p.add_argument("--forced-accept", type=float, default=0.9, help="with --mtp: acceptance per depth (bench only)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    name = synthetic_name(args.arch, args.synthetic)
    res = open_results(f"profile-b{args.batch}" + (f"-mtp{args.mtp}" if args.mtp else ""), name, args.out)
    model = load_checkpoint(SyntheticCheckpoint(name, bits=args.bits, head_bits=args.head_bits), device="cuda")
    draft = None
    if args.mtp:
        from exl3_triton.runtime import generator as generator_module
        from exl3_triton.runtime.drafting_options import DraftOptions

        generator_module.verify_drafts = forced_acceptance(args.forced_accept)
        draft = DraftOptions(mode="mtp", num_tokens=args.mtp)
    gen = Generator(model, max_batch_size=args.batch, max_seq_len=512, use_cuda_graphs=False, draft=draft)
    vocab = model.network.vocab_size
    jobs = [gen.enqueue(Job(torch.randint(0, vocab, (64,)).tolist(), max_new_tokens=4 * (args.steps + 8), stop_tokens=[]))
            for _ in range(args.batch)]
    while any(not j.output_ids for j in jobs):
        gen.step()
    for _ in range(3):
        gen.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    produced0 = sum(len(j.output_ids) for j in jobs)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            gen.step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1000 / args.steps
    tokens_per_step = (sum(len(j.output_ids) for j in jobs) - produced0) / args.steps
    per_name, per_family, count = defaultdict(float), defaultdict(float), 0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            us = evt.device_time
            per_name[evt.name] += us
            per_family[kernel_family(evt.name)] += us
            count += 1
    steps = args.steps
    total = sum(per_name.values()) / steps
    print(f"{name} batch {args.batch}{f' MTP {args.mtp}' if args.mtp else ''}: {count / steps:.0f} kernels per "
          f"step, {total / 1000:.2f} ms of kernel time per step, {wall_ms:.2f} ms wall (eager, profiled), "
          f"{tokens_per_step:.2f} tokens per step")
    print("by family (us per step):")
    for fam, us in sorted(per_family.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {us / steps:9.1f}  {fam}")
    print("top kernels (us per step):")
    for name, us in sorted(per_name.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {us / steps:9.1f}  {name[:110]}")
    res.add("profile", {"model": name, "batch": args.batch, "mtp": args.mtp, "kernels_per_step": count / steps,
                        "wall_ms_per_step_eager": wall_ms, "tokens_per_step": tokens_per_step,
                        "kernel_ms_per_step": total / 1000,
                        "families_us_per_step": {k: v / steps for k, v in per_family.items()},
                        "top_kernels_us_per_step": dict(sorted(((k, v / steps) for k, v in per_name.items()),
                                                               key=lambda kv: -kv[1])[:40])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
