"""Decode speed against the cache capacity and the filled context (runtime issue; MLA models above all).

    python3 bench/long_context.py --arch openpangu_v2 --synthetic flash [--capacity 32768] [--contexts 128,8192]

bench/decode.py sizes the cache to the prompt plus the timed steps. A user's generator is
configured for a long ``max_seq_len``; a decode step whose attention work follows the
capacity rather than the filled length slows down for everyone. This times batch-1 decode
with the cache sized to ``--capacity`` at each filled length of ``--contexts``, and once
with the small cache for comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import decode_speed, open_results, synthetic_name  # noqa: E402
from synthetic import SyntheticCheckpoint  # noqa: E402

from exl3_triton.model import load_checkpoint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="openpangu_v2")
    p.add_argument("--synthetic", default="flash")
    p.add_argument("--bits", type=float, default=4)
    p.add_argument("--head-bits", type=float, default=8)
    p.add_argument("--expert-bits", type=float, default=None)
    p.add_argument("--capacity", type=int, default=32768)
    p.add_argument("--contexts", default="128,8192")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    name = synthetic_name(args.arch, args.synthetic)
    res = open_results("long-context", name, args.out)
    ckpt = SyntheticCheckpoint(name, bits=args.bits, head_bits=args.head_bits, expert_bits=args.expert_bits)
    model = load_checkpoint(ckpt, device="cuda")
    small = decode_speed(model, 1, args.steps, 128, 128 + args.steps + 32)
    res.add("decode", {"capacity": 128 + args.steps + 32, "context": 128, **small})
    for ctx in (int(c) for c in args.contexts.split(",")):
        rec = decode_speed(model, 1, args.steps, ctx, args.capacity)
        res.add("decode", {"capacity": args.capacity, "context": ctx, **rec})
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
