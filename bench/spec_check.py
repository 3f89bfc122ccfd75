"""Speculative decoding on the GPU: greedy outputs with n-gram and (toy) MTP drafting against plain
greedy decoding, through CUDA-graph verification steps, on a small synthetic model.

    python bench/spec_check.py [--synthetic gemma4-tiny] [--out DIR]

On the GPU the batched kernels round differently for different row counts (a verification
step multiplies 1 + drafts rows where plain decoding multiplies one), so on a random model an
arg-max near-tie can flip; the script reports how many tokens agree before the first
difference and the target's top-2 logit gap there, and checks every accepted draft.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import REPO, Results, environment  # noqa: E402
from synthetic import SyntheticCheckpoint  # noqa: E402

from exl3_triton import Generator, Job  # noqa: E402
from exl3_triton.model import load_checkpoint  # noqa: E402
from exl3_triton.runtime.drafting_options import DraftOptions  # noqa: E402


def run(model, prompts, n, **kw):
    gen = Generator(model, max_batch_size=len(prompts), max_seq_len=256, **kw)
    jobs = [gen.enqueue(Job(p, max_new_tokens=n, stop_tokens=[])) for p in prompts]
    t0 = time.perf_counter()
    list(gen.iterate())
    torch.cuda.synchronize()
    return [j.output_ids for j in jobs], gen, time.perf_counter() - t0


def agreement(a: list[int], b: list[int]) -> int:
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", default="gemma4-tiny")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    meta = environment()
    out_dir = Path(args.out) if args.out else REPO / "bench" / "results"
    res = Results(out_dir / f"spec-check-{args.synthetic}-{meta['date']}.json", meta)
    model = load_checkpoint(SyntheticCheckpoint(args.synthetic, bits=4, head_bits=6), device="cuda")
    vocab = model.network.vocab_size
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, vocab, (12,), generator=g).tolist()
    prompts = [base * 3, torch.randint(0, vocab, (20,), generator=g).tolist(), base[:5] * 4,
               torch.randint(0, vocab, (33,), generator=g).tolist()]
    from tests.mtp_toy import ToyMtpLM

    toy = copy.copy(model)
    toy.network = ToyMtpLM(model.network, 3)
    draft_model = load_checkpoint(SyntheticCheckpoint(args.synthetic, bits=2, head_bits=4), device="cuda")
    for batch in (1, 4):
        plain, _, t_plain = run(model, prompts[:batch], args.tokens)
        for name, m, opts, extra in (("ngram", model, DraftOptions(mode="ngram", num_tokens=4), {}),
                                     ("toy-mtp", toy, DraftOptions(mode="mtp", num_tokens=3), {}),
                                     ("draft-model", model, DraftOptions(mode="model", num_tokens=3),
                                      {"draft_model": draft_model})):
            out, gen, dt = run(m, prompts[:batch], args.tokens, draft=opts, **extra)
            agree = [agreement(a, b) for a, b in zip(out, plain)]
            res.add("speculative_greedy", {
                "drafter": name, "batch": batch, "tokens_per_job": args.tokens,
                "identical_jobs": sum(a == args.tokens for a in agree), "agree_before_first_difference": agree,
                "acceptance_per_depth": gen.draft_stats.acceptance_per_depth,
                "mean_tokens_per_step": gen.draft_stats.mean_tokens_per_step,
                "graphs": sorted(str(k) for k in gen.runner.graphs), "seconds": dt, "plain_seconds": t_plain})
    return 0


if __name__ == "__main__":
    sys.exit(main())
