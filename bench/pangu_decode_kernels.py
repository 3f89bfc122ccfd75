"""openPangu decode's small kernels (issue 8) on a GPU: each checked against its PyTorch path, then
both timed in CUDA graphs, at openPangu-2.0-Flash's shapes.

    python bench/pangu_decode_kernels.py --out $OUT [--batch 1,8]
    python bench/pangu_decode_kernels.py --tiny --out /tmp/x      # the logic at tiny shapes (CPU: interpreter)

Kernels (their PyTorch paths are what a CPU runs and the golden tests pin):

* ``rms_norm_cast``: ``RMSNorm(x, out_dtype)`` of a half-precision row (q_a's norm; the branch
  output norms with an fp32 result) vs cast + ``F.rms_norm`` + cast;
* ``mome``: the MoME decode conv storing the row's input in its ring vs index_put + gather + mix;
  ``mome_norm``: the same with q_a's RMSNorm after it;
* ``store_keys`` (sliding / DSA layer): MLA's key side in one kernel vs conv, norm, k_pe RoPE,
  indexer key and the cache stores in PyTorch;
* ``index_queries``: the indexer queries' RoPE and casts vs PyTorch.

Rows of one step include consecutive positions of one sequence (drafted tokens verified as decode
rows) from batch 4 on. Writes ``pangu_decode_kernels.json``: per kernel and batch the largest
difference to the PyTorch path (``ok`` within the stated tolerance) and microseconds per call of
both, in a CUDA graph (GPU only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import CONFIGS  # noqa: E402

from exl3_triton.arch.blocks import mla  # noqa: E402
from exl3_triton.arch.blocks.lightning_indexer import LightningIndexer, queries_reference  # noqa: E402
from exl3_triton.arch.blocks.norm import RMSNorm, rms_norm_cast_reference  # noqa: E402
from exl3_triton.arch.blocks.rope import RopeConfig, RotaryEmbedding, fold_sin, inverse_frequencies  # noqa: E402
from exl3_triton.arch.blocks.short_conv import mome_decode_reference  # noqa: E402
from exl3_triton.kernels import triton_ops  # noqa: E402

RING, WIDTH = mla.CONV_RING, 3


def shapes(tiny: bool) -> dict:
    c = CONFIGS["openpangu-tiny" if tiny else "openpangu-flash"]
    return {"q_rank": c["q_lora_rank"], "kv_rank": c["kv_lora_rank"], "rope": c["qk_rope_head_dim"],
            "o_width": c["num_attention_heads"] * c["v_head_dim"], "index_heads": c["index_n_heads"],
            "index_dim": c["index_head_dim"], "eps": c["rms_norm_eps"], "theta": c["rope_theta"]}


def step_rows(batch: int, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``seq_slots``, ``positions``, cache rows of one decode step: from batch 4 on the last four rows
    are four consecutive positions of one sequence (a verified draft), listed out of order."""
    slots = torch.arange(batch)
    pos = torch.randint(WIDTH, 4000, (batch,), generator=g)
    if batch >= 4:
        slots[-4:] = slots[-4]
        pos[-4:] = pos[-4] + torch.tensor([1, 0, 3, 2])
    dest = torch.randperm(4 * batch, generator=g)[:batch]
    return slots.to(device), pos.to(device), dest.to(device)


def compare(got, want) -> float:
    """The largest difference, relative where the reference exceeds 1 (a half-precision rounding of
    a value near 4 is 4e-3)."""
    if isinstance(got, (tuple, list)):
        return max(compare(a, b) for a, b in zip(got, want))
    if not got.numel():
        return 0.0
    want = want.double()
    return float(((got.double() - want).abs() / want.abs().clamp_min(1.0)).max())


def cases(sh: dict, batch: int, dtype, device, g: torch.Generator):
    """``(name, state(), fused(state), reference(state), tolerance)``: ``state()`` makes fresh copies
    of the tensors a kernel writes (rings, caches); ``fused`` / ``reference`` compute into them and
    return what to compare (outputs and the written state)."""
    kernels = triton_ops.load()
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    slots, pos, dest = step_rows(batch, g, device)
    cos, sin = RotaryEmbedding(inverse_frequencies(RopeConfig(theta=sh["theta"]), sh["rope"]).to(device))(pos)
    sin = fold_sin(sin)
    no_state = lambda: None  # noqa: E731

    # RMSNorm: half in, half out (q_a's norm) and half in, fp32 out (the branch output norms)
    for out_dtype in (dtype, torch.float32):
        x, w = (3 * r(batch, sh["q_rank"])).to(dtype), torch.rand(sh["q_rank"], generator=g).to(device) + 0.5
        yield (f"rms_norm_cast_to_{str(out_dtype).split('.')[-1]}", no_state,
               lambda _, x=x, w=w, o=out_dtype: kernels.norm.rms_norm_cast_triton(x, w, sh["eps"], o),
               lambda _, x=x, w=w, o=out_dtype: rms_norm_cast_reference(x, w, sh["eps"], o), 2e-3)

    # MoME on the output projection's input (the widest of the three)
    c = sh["o_width"]
    ring0 = r(batch, RING, c).to(dtype)
    weight = 0.3 * r(WIDTH, c)
    x = r(batch, c).to(dtype)
    yield ("mome", lambda: ring0.clone(),
           lambda ring: (kernels.mome.mome_decode_triton(ring, weight, slots, pos, x, dtype), ring),
           lambda ring: (mome_decode_reference(ring, weight, slots, pos, x, dtype), ring), 2e-3)

    # MoME with q_a's norm (the q latent)
    c = sh["q_rank"]
    q_ring0 = r(batch, RING, c).to(dtype)
    q_weight = 0.3 * r(WIDTH, c)
    qa = r(batch, c).to(dtype)
    q_norm = RMSNorm(torch.rand(c, generator=g) + 0.5, sh["eps"]).to(device)
    yield ("mome_norm", lambda: q_ring0.clone(),
           lambda ring: (kernels.mome.mome_decode_triton(ring, q_weight, slots, pos, qa, dtype, q_norm), ring),
           lambda ring: (mome_decode_reference(ring, q_weight, slots, pos, qa, dtype, q_norm), ring), 4e-3)

    # the key side of a sliding-window layer and of a DSA layer
    rank, rope, idim = sh["kv_rank"], sh["rope"], sh["index_dim"]
    kv = r(batch, rank + rope).to(dtype)
    kv_ring0 = r(batch, RING, rank).to(dtype)
    kv_weight = 0.3 * r(WIDTH, rank)
    norm = RMSNorm(torch.rand(rank, generator=g) + 0.5, sh["eps"]).to(device)
    indexer = LightningIndexer(None, None, RMSNorm(torch.rand(idim, generator=g) + 0.5, sh["eps"]), None,
                               num_heads=sh["index_heads"], head_dim=idim, top_k=16).to(device)
    k_idx = r(batch, idim).to(dtype)

    def key_state():
        return [kv_ring0.clone()] + [torch.zeros(4 * batch, w, dtype=dtype, device=device) for w in (rank, rope, idim)]

    for dsa in (False, True):
        def keys(state, fused: bool, dsa=dsa):
            ring, c_cache, kpe_cache, kidx_cache = state
            index = (k_idx, indexer, kidx_cache) if dsa else None
            if fused:
                kernels.mla_keys.mla_store_keys_triton(kv, rank, (ring, kv_weight, slots), norm, pos, cos,
                                                       sin, dest, c_cache, kpe_cache, index)
            else:
                mla.store_keys_reference(kv, rank, (ring, kv_weight, slots), norm, pos, cos, sin, dest,
                                         c_cache, kpe_cache, index)
            return state
        yield ("store_keys_" + ("dsa" if dsa else "sliding"), key_state, lambda st, k=keys: k(st, True),
               lambda st, k=keys: k(st, False), 4e-3)

    q = r(batch, sh["index_heads"] * idim).to(dtype)
    hw = r(batch, sh["index_heads"]).to(dtype)
    yield ("index_queries", no_state, lambda _: kernels.rope.leading_rope_triton(q, hw, cos, sin, sh["index_heads"]),
           lambda _: queries_reference(q, hw, cos, sin, sh["index_heads"]), 1e-4)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU runs them under the interpreter)")
    args = p.parse_args()
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.float16
    if on_gpu:
        from common import Results, environment, time_graph
        meta = environment()
    else:
        meta = {"device": "cpu (interpreter, no timings)"}
    sh = shapes(args.tiny)
    records = []
    out = Path(args.out) / "pangu_decode_kernels.json"
    results = Results(out, dict(meta, shapes=sh)) if on_gpu else None
    failed = 0
    for batch in [int(b) for b in args.batch.split(",")]:
        g = torch.Generator().manual_seed(batch)
        for name, state, fused, reference, tol in cases(sh, batch, dtype, device, g):
            diff = compare(fused(state()), reference(state()))
            rec = {"kernel": name, "batch": batch, "max_diff": diff, "tolerance": tol, "ok": diff <= tol}
            failed += not rec["ok"]
            if on_gpu:  # each path on its own state, written in place call after call
                mine, theirs = state(), state()
                rec["fused_us"] = time_graph(lambda i: fused(mine), 20)["median_us"]
                rec["pytorch_us"] = time_graph(lambda i: reference(theirs), 20)["median_us"]
                results.add("kernels", rec)
            else:
                records.append(rec)
                print(rec, flush=True)
    if not on_gpu:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": dict(meta, shapes=sh), "sections": {"kernels": records}}, indent=1))
    print(f"{'all kernels match' if not failed else f'{failed} mismatches'}; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
