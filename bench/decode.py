"""End-to-end decode and prefill speed of a synthetic EXL3 model on a GPU (runtime issue).

    python bench/decode.py --synthetic llama3-8b --bits 4 [--batch 1,8,32] [--steps 64]
                           [--prompt-len 128] [--prefill-len 2048] [--out DIR]
    python bench/decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1,8
    python bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
        --mtp 3 --forced-accept 0.9
    python bench/decode.py --arch deepseek_v4 --synthetic flash --bits 4 --expert-bits 2 --batch 1,8
    python bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --max-seq-len 32768

The model has the real shapes and random trellises (bench/synthetic.py). Decode
speed: B jobs with random prompts are prefilled, then ``--steps`` decode steps
(CUDA graphs) are timed with the GPU synchronised before and after: tokens/s =
B * steps / time. The bandwidth bound for batch 1 is the copy bandwidth
(read + write, measured in the same run) over the weight bytes one token reads.
Prefill: one prompt of ``--prefill-len`` tokens in one chunk; time to its first
token. ``--mtp N``: also time decoding with N-token MTP drafting, against the
same run without it. Random weights draft nonsense, so ``--forced-accept P``
(bench only) replaces the verdict of verification: depth d is accepted with
probability P once depth d-1 was, as if the drafts were that good; the MTP layers
and the rollback of rejected positions still do all their real work. Results: JSON in ``--out`` (default bench/results) and a printed table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Results, copy_bandwidth, environment  # noqa: E402
from synthetic import SyntheticCheckpoint  # noqa: E402

from exl3_triton import Generator, Job  # noqa: E402
from exl3_triton.model import load_checkpoint  # noqa: E402


# --arch values whose synthetic configs use a shorter prefix (bench/synthetic.py CONFIGS)
ARCH_PREFIX = {"openpangu_v2": "openpangu"}


def synthetic_name(arch: str | None, synthetic: str) -> str:
    """The bench/synthetic.py CONFIGS key for ``--arch`` and ``--synthetic``."""
    return f"{ARCH_PREFIX.get(arch, arch)}-{synthetic}" if arch else synthetic


def open_results(kind: str, name: str, out: str | None) -> Results:
    meta = environment()
    out_dir = Path(out) if out else REPO / "bench" / "results"
    return Results(out_dir / f"{kind}-{name}-{meta['date']}-{meta['gpu'].replace(' ', '_')}.json", meta)




def forced_acceptance(p: float, seed: int = 0):
    """A stand-in for ``verify_drafts`` accepting each depth with probability ``p`` (bench only)."""
    g = torch.Generator().manual_seed(seed)

    def verify(logits, drafts, row, *, want_logprobs, top_logprobs):
        accepted = 0
        while accepted < len(drafts) and float(torch.rand((), generator=g)) < p:
            accepted += 1
        emitted = list(drafts[:accepted]) + [int(logits[accepted].argmax())]
        return emitted, accepted, [None] * len(emitted), [None] * len(emitted)

    return verify


def decode_speed(model, batch: int, steps: int, prompt_len: int, max_seq_len: int, draft=None) -> dict:
    gen = Generator(model, max_batch_size=batch, max_seq_len=max_seq_len, chunk_size=max(2048, prompt_len),
                    draft=draft)
    vocab = model.network.vocab_size
    g = torch.Generator().manual_seed(batch)
    jobs = [gen.enqueue(Job(torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
                            max_new_tokens=max_seq_len - prompt_len - 1, stop_tokens=[])) for _ in range(batch)]
    while any(not j.output_ids for j in jobs):  # prefill (and capture the decode graph on the first decode)
        gen.step()
    # warm-up decode steps, until no step captures a new CUDA graph (with drafting, steps of several
    # row counts and each MTP depth have graphs of their own): captures must not be timed
    stable = 0
    for _ in range(60):
        before = len(gen.runner.graphs)
        gen.step()
        stable = stable + 1 if len(gen.runner.graphs) == before else 0
        if stable >= (6 if draft is not None else 3):
            break
    torch.cuda.synchronize()
    # each step timed on its own; a step that still captured a graph (a row count first seen late)
    # is left out of the figures and counted in "capture_steps"
    dt, produced, captures = 0.0, 0, 0
    for _ in range(steps):
        before, tokens0 = len(gen.runner.graphs), sum(len(j.output_ids) for j in jobs)
        t0 = time.perf_counter()
        gen.step()
        torch.cuda.synchronize()
        if len(gen.runner.graphs) != before:
            captures += 1
            continue
        dt += time.perf_counter() - t0
        produced += sum(len(j.output_ids) for j in jobs) - tokens0
    steps -= captures
    for j in jobs:
        j.cancel()
    gen.step()
    rec = {"batch": batch, "max_seq_len": max_seq_len, "steps": steps, "capture_steps": captures, "tokens": produced, "seconds": dt, "tokens_per_s": produced / dt,
           "ms_per_step": dt / steps * 1000, "graphs": sorted(str(k) for k in gen.runner.graphs)}
    if draft is not None:
        rec["draft"] = gen.draft_stats.as_dict()
    return rec


def consistency(model, total: int | None = None) -> dict:
    """On the GPU: the cached path (prefill + eager decode, and decode from CUDA graphs) against the
    plain full forward. The sequence is longer than any sliding window, so ring caches wrap; ``total``
    overrides its length (the last 24 tokens are decoded one by one)."""
    from exl3_triton.runtime.cache import PagedCache
    from exl3_triton.runtime.runner import ModelRunner, StepItem

    net = model.network
    windows = [s.window for s in net.cache_spec() if s.window]
    decode_steps = 24
    total = total or max(48, 2 * max(windows, default=0) + decode_steps + 40)
    ids = torch.randint(0, net.vocab_size, (total,), generator=torch.Generator().manual_seed(3)).tolist()
    full = model.forward(torch.tensor(ids))
    prefill = total - decode_steps
    out = {"tokens": total}
    page = 256
    for graphs in (False, True):
        pages = -(-total // page)
        cache = PagedCache(net.cache_spec(), num_pages=pages + 2, page_size=page, max_seqs=2)
        runner = ModelRunner(net, cache, max_pages_per_seq=pages, use_cuda_graphs=graphs)
        seq = cache.new_sequence()
        cache.reserve(seq, len(ids))
        logits = [runner.run([StepItem(seq, ids[:prefill], True)])]
        for t in ids[prefill:]:
            logits.append(runner.run([StepItem(seq, [t], True)]))
        got = torch.cat(logits)
        ref = full[prefill - 1:]
        out["decode_vs_full_rel_err_" + ("graphs" if graphs else "eager")] = ((got - ref).norm() / ref.norm()).item()
        out["argmax_agree_" + ("graphs" if graphs else "eager")] = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return out


def prefill_speed(model, length: int) -> dict:
    gen = Generator(model, max_batch_size=1, max_seq_len=length + 16, chunk_size=length)
    vocab = model.network.vocab_size
    prompt = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(7)).tolist()
    for attempt in range(2):  # the first run compiles kernels
        job = gen.enqueue(Job(prompt, max_new_tokens=1, stop_tokens=[]))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while not job.finished:
            gen.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return {"prompt_tokens": length, "seconds": dt, "tokens_per_s": length / dt, "ttft_ms": dt * 1000}


def ab_tuning(res, model, args, capacity) -> None:
    """``--ab-tuning NAME=VALUE``: the same decode with a tuning constant at its default and at VALUE."""
    import ast

    from exl3_triton.kernels import tuning

    name, _, value = args.ab_tuning.partition("=")
    if not hasattr(tuning, name):
        raise SystemExit(f"--ab-tuning: kernels/tuning.py has no {name!r}")
    default, other = getattr(tuning, name), ast.literal_eval(value)
    for b in (int(x) for x in args.batch.split(",")):
        for rep in range(2):
            for setting in (default, other):
                setattr(tuning, name, setting)
                for cached in (tuning.moe_decode_config, tuning.gemm_config):
                    cached.cache_clear()
                rec = decode_speed(model, b, args.steps, args.prompt_len, capacity(args.prompt_len + args.steps + 32))
                res.add("ab_tuning", {"name": name, "value": repr(setting), "default": setting is default,
                                      "repeat": rep, "batch": b, "tokens_per_s": rec["tokens_per_s"],
                                      "ms_per_step": rec["ms_per_step"]})
                torch.cuda.empty_cache()
    setattr(tuning, name, default)
    for cached in (tuning.moe_decode_config, tuning.gemm_config):
        cached.cache_clear()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=None, help="model family of a synthetic size name (gemma4 + 31b = gemma4-31b)")
    p.add_argument("--synthetic", default="llama3-8b")
    p.add_argument("--rotation-choice", action="store_true",
                   help="also time batch 1 with both graph-time rotation launch choices")
    p.add_argument("--bits", type=float, default=4)
    p.add_argument("--head-bits", type=float, default=6)
    p.add_argument("--expert-bits", type=float, default=None, help="routed experts' bits (default: --bits)")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="the Generator's max_seq_len (cache capacity per sequence; default: prompt + steps + 32). "
                        "Decode kernels sized by the capacity rather than the sequence show up with a large one")
    p.add_argument("--mtp", type=int, default=0, help="also time N-token MTP drafting")
    p.add_argument("--forced-accept", type=float, default=None,
                   help="bench only: accept each drafted depth with this probability instead of verifying")
    p.add_argument("--prefill-rotation-ab", action="store_true",
                   help="also time the prefill with the previous and the current many-row rotation schedule, alternating")
    p.add_argument("--ab-tuning", default=None, metavar="NAME=VALUE",
                   help="decode at each batch size with kernels/tuning.py's NAME at its default and at VALUE (a Python "
                        "literal), alternating, twice each (new graphs each run)")
    p.add_argument("--prefill-ab-tuning", default=None, metavar="NAME=VALUE",
                   help="also time the prefill with kernels/tuning.py's NAME at its default and at VALUE (a Python "
                        "literal), alternating, three times each")
    p.add_argument("--check-tokens", type=int, action="append", default=None,
                   help="length of the cached-vs-full check's sequence (repeatable; default: past every window); "
                        "e.g. 2064 decodes positions 2040-2063, across openPangu's DSA bound of 2048")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    name = synthetic_name(args.arch, args.synthetic)

    def capacity(needed: int) -> int:
        if args.max_seq_len is not None and args.max_seq_len < needed:
            p.error(f"--max-seq-len {args.max_seq_len} is below the {needed} tokens this run needs")
        return args.max_seq_len or needed
    res = open_results("decode", name, args.out)
    bw = copy_bandwidth()
    t0 = time.perf_counter()
    ckpt = SyntheticCheckpoint(name, bits=args.bits, head_bits=args.head_bits, expert_bits=args.expert_bits)
    model = load_checkpoint(ckpt, device="cuda")
    torch.cuda.synchronize()
    weight_gb = ckpt.active_bytes_per_token / 1e9  # MoE: the routed experts a token uses
    res.add("model", {"name": name, "bits": args.bits, "head_bits": args.head_bits, "expert_bits": args.expert_bits,
                      "weight_GB_total": ckpt.weight_bytes / 1e9,
                      "weight_GB_per_token": weight_gb, "copy_bandwidth_GBps": bw,
                      "bound_tokens_per_s": bw / weight_gb, "load_s": time.perf_counter() - t0,
                      "gpu_memory_GB": torch.cuda.memory_allocated() / 1e9})
    for total in args.check_tokens or [None]:
        res.add("check", consistency(model, total))
    from exl3_triton.kernels import tuning

    for rotate_in_kernel in (True, False) if args.rotation_choice else ():  # graph-time launch choice, 1 row
        tuning.GRAPH_ROTATE_IN_KERNEL = rotate_in_kernel
        tuning.gemm_config.cache_clear()
        rec = decode_speed(model, 1, args.steps, args.prompt_len, capacity(args.prompt_len + args.steps + 32))
        res.add("graph_rotation_choice", {"rotate_in_kernel": rotate_in_kernel, "tokens_per_s": rec["tokens_per_s"]})
    if args.ab_tuning:
        ab_tuning(res, model, args, capacity)
    for b in (int(x) for x in args.batch.split(",")):
        rec = decode_speed(model, b, args.steps, args.prompt_len, capacity(args.prompt_len + args.steps + 32))
        rec["bound_fraction"] = rec["tokens_per_s"] / (bw / weight_gb) if b == 1 else None
        rec["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
        res.add("decode", rec)
        torch.cuda.empty_cache()
        if args.mtp:
            from exl3_triton.runtime import generator as generator_module
            from exl3_triton.runtime.drafting_options import DraftOptions

            real_verify = generator_module.verify_drafts
            if args.forced_accept is not None:
                generator_module.verify_drafts = forced_acceptance(args.forced_accept)
            try:
                mtp = decode_speed(model, b, args.steps, args.prompt_len,
                                   capacity(args.prompt_len + 4 * (args.steps + 60) + 32), draft=DraftOptions(mode="mtp", num_tokens=args.mtp))
            finally:
                generator_module.verify_drafts = real_verify
            mtp.update(mtp_tokens=args.mtp, forced_accept=args.forced_accept,
                       speedup=mtp["tokens_per_s"] / rec["tokens_per_s"])
            res.add("decode_mtp", mtp)
            torch.cuda.empty_cache()
    res.add("prefill", prefill_speed(model, args.prefill_len))
    if args.prefill_rotation_ab:
        from exl3_triton.kernels.triton_ops import load

        hadamard = load().hadamard
        current = hadamard.MANY_ROWS
        for rep in range(3):
            for name, many_rows in (("previous", 1 << 40), ("current", current)):
                hadamard.MANY_ROWS = many_rows
                res.add("prefill_rotation_ab", {"schedule": name, "repeat": rep, **prefill_speed(model, args.prefill_len)})
        hadamard.MANY_ROWS = current
    if args.prefill_ab_tuning:
        import ast

        name, _, value = args.prefill_ab_tuning.partition("=")
        if not hasattr(tuning, name):
            raise SystemExit(f"--prefill-ab-tuning: kernels/tuning.py has no {name!r}")
        default, other = getattr(tuning, name), ast.literal_eval(value)
        for rep in range(3):
            for setting in (default, other):
                setattr(tuning, name, setting)
                res.add("prefill_ab_tuning", {"name": name, "value": repr(setting), "default": setting is default,
                                              "repeat": rep, **prefill_speed(model, args.prefill_len)})
        setattr(tuning, name, default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
