"""DeepSeek-V4 DSpark block drafting on the GPU: greedy output with drafting against plain greedy
decoding (CUDA-graph decode steps write the drafter's main-kv rings), acceptance, and the drafts
after a partial acceptance against a fresh run, on the golden tiny DSV4 plus random DSpark weights
whose markov head is fitted to the plain output (tests/test_dspark.py builds the same model).

    python bench/dspark_check.py [--golden DIR] [--device cuda] [--dtype float16] [--out DIR]

As in bench/spec_check.py: on the GPU a verification step multiplies more rows than a plain decode
step, so a near-tie of the random model can flip an arg-max; the script reports the first
difference and the target's top-2 logit gap there instead of failing on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import REPO, Results, environment  # noqa: E402

import exl3_triton  # noqa: E402
from exl3_triton import Generator, Job  # noqa: E402
from exl3_triton.runtime.drafting_options import DraftOptions  # noqa: E402
from tests.test_dspark import (BLOCK, _always_confident, _bigram_markov, _consecutive_proposals,  # noqa: E402
                               _dspark_checkpoint, _fresh_draft, _ids)


def _golden_default() -> Path:
    for p in (os.environ.get("EXL3_TRITON_GOLDEN"), REPO.parent / "shared" / "golden", REPO / "shared" / "golden"):
        if p and Path(p).is_dir():
            return Path(p)
    return REPO.parent / "shared" / "golden"


def _run(model, prompts, n, page_size):
    gen = Generator(model, max_batch_size=len(prompts), max_seq_len=256, page_size=page_size)
    jobs = [gen.enqueue(Job(p, max_new_tokens=n, stop_tokens=[])) for p in prompts]
    t0 = time.perf_counter()
    list(gen.iterate())
    if model.options.device.type == "cuda":
        torch.cuda.synchronize()
    return [j.output_ids for j in jobs], gen, time.perf_counter() - t0


def _first_difference(model, prompt, a, b):
    """Index of the first differing token and the target's top-2 logit gap there (a near-tie or not)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            logits = model.forward(torch.tensor(prompt + a[:i], device=model.options.device))[-1].float()
            top = torch.topk(logits, 2).values
            return i, float(top[0] - top[1])
    return None, None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--golden", type=Path, default=_golden_default())
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    page_size = 256 if dev.type == "cuda" else 128
    res = Results(args.out / "dspark_check.json", environment() if dev.type == "cuda" else {"device": str(dev)})
    ids = _ids(args.golden)
    prompts = [ids[:30], ids[40:53], ids[60:85], ids[100:105]]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        trunk = exl3_triton.load(args.golden / "hf" / "dsv4_native", device=dev, dtype=dtype)
        plain, _, t_plain = _run(trunk, prompts, args.new_tokens, page_size)
        _dspark_checkpoint(args.golden, Path(tmp) / "m", markov=_bigram_markov(plain), confidence=_always_confident())
        model = exl3_triton.load(Path(tmp) / "m", device=dev, dtype=dtype)
        gen = Generator(model, max_batch_size=len(prompts), max_seq_len=256, page_size=page_size,
                        draft=DraftOptions(mode="mtp", num_tokens=BLOCK))
        proposals, original = [], gen.drafter.propose

        def recording(job, k):
            drafts = original(job, k)
            proposals.append((job.id, list(job.tokens), drafts))
            return drafts

        gen.drafter.propose = recording
        jobs = [gen.enqueue(Job(p, max_new_tokens=args.new_tokens, stop_tokens=[])) for p in prompts]
        t0 = time.perf_counter()
        list(gen.iterate())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_draft = time.perf_counter() - t0
        drafted = [j.output_ids for j in jobs]
        for b, (p, a, d) in enumerate(zip(prompts, plain, drafted)):
            at, gap = _first_difference(trunk, p, a, d)
            res.add("greedy", {"job": b, "equal": a == d, "first_difference": at, "top2_gap_there": gap})
            ok &= a == d or (gap is not None and gap < 1e-2)
        stats = gen.draft_stats.as_dict()
        res.add("acceptance", dict(stats, time_plain_s=t_plain, time_drafted_s=t_draft))
        ok &= stats["draft_accept"] > 0

        # drafts after a partial acceptance against a fresh run over the verified tokens
        checked = same = 0
        for (before, drafts, _), (after, next_drafts, _) in _consecutive_proposals(proposals, proposals):
            if drafts and len(after) - len(before) <= len(drafts) and checked < 8:
                fresh = _fresh_draft(model, after).tokens[0].tolist()[:len(next_drafts)]
                checked, same = checked + 1, same + (fresh == next_drafts)
        res.add("rollback", {"checked": checked, "equal_to_fresh_run": same})
        ok &= checked > 0 and same == checked
    res.add("verdict", {"ok": bool(ok)})
    print("dspark_check:", "OK" if ok else "FAILED", stats)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
