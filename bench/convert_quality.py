"""Converter quality against the reference converter (ExLlamaV3 1.6.5) on the golden Llama.

For each configuration, convert ``golden/hf/llama`` with our converter (the
reference's calibration size, 24 x 512 tokens) and compare with the reference's
own conversion in ``golden/exl3/<name>``:

* per linear: relative weight error ``||W_q - W|| / ||W||`` of ours and of the
  reference (decoded with this project's bit-exact reader, against the bf16
  source weight), at the same bits per weight (checked per tensor);
* logits: relative error against the unquantized model over the golden ids.

Device-agnostic: ``--device cuda`` runs the converter on a GPU.

    python bench/convert_quality.py --configs llama_k4_mcg --out bench/results/convert-quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("EXL3_TRITON_GOLDEN", REPO.parent / "shared" / "golden"))

CONFIGS = {  # name: (bits, codebook, head bits)
    "llama_k4_mcg": (4, "mcg", 8),
    "llama_k3_mcg": (3, "mcg", 6),
    "llama_k4_3inst": (4, "3inst", 6),
    "llama_k25_mul1": (2.5, "mul1", 6),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def weight_errors(model_dir: Path, source) -> dict[str, tuple[float, float]]:
    """module key -> (bits, relative weight error) for every EXL3 linear of ``model_dir``."""
    from exl3_triton.checkpoint import Checkpoint
    from exl3_triton.kernels import exl3_full_weight

    ckpt = Checkpoint(model_dir)
    out = {}
    for w in ckpt.iter_exl3_linears():
        ref = source.tensor(f"{w.key}.weight").float()  # [out, in]
        full = exl3_full_weight(w)[: ref.shape[1], : ref.shape[0]].T
        out[w.key] = (w.bits, rel(full, ref))
    return out


def logits_error(model_dir: Path, ids: torch.Tensor, base: torch.Tensor) -> float:
    import exl3_triton

    return rel(exl3_triton.load(model_dir).forward(ids), base)


def run_config(name: str, args) -> dict:
    import exl3_triton
    from exl3_triton.checkpoint import Checkpoint
    from exl3_triton.convert import ConvertOptions, convert_model, stderr_progress

    bits, codebook, head_bits = CONFIGS[name]
    out_dir = Path(args.work) / name
    if out_dir.exists() and not (out_dir / ".work").exists():
        import shutil

        shutil.rmtree(out_dir)
    options = ConvertOptions(bits=bits, head_bits=head_bits, codebook=codebook, cal_rows=24, cal_cols=512,
                             scale_search=args.scale_search, device=args.device, seed=args.seed)
    t0 = time.time()
    result = convert_model(GOLDEN / "hf" / "llama", out_dir, options, progress=stderr_progress)
    seconds = time.time() - t0

    source = Checkpoint(GOLDEN / "hf" / "llama")
    ours = weight_errors(out_dir, source)
    theirs = weight_errors(GOLDEN / "exl3" / name, source)
    ref = load_file(str(GOLDEN / "exl3" / "ref" / f"{name}_ref.safetensors"))
    base = exl3_triton.load(GOLDEN / "hf" / "llama").forward(ref["ids"])
    rows = []
    for key in theirs:
        (qb, qe), (rb, re_) = ours[key], theirs[key]
        rows.append({"key": key, "bits_ours": qb, "bits_ref": rb, "err_ours": qe, "err_ref": re_,
                     "ratio": qe / re_, "predicted": result.records[key].predicted_error,
                     "global_scale": result.records[key].global_scale})
    return {
        "config": name, "bits": bits, "codebook": codebook, "head_bits": head_bits,
        "device": args.device, "scale_search": args.scale_search, "seconds": seconds,
        "linears": rows,
        "max_weight_ratio": max(r["ratio"] for r in rows),
        "mean_weight_ratio": sum(r["ratio"] for r in rows) / len(rows),
        "logits_err_ours": logits_error(out_dir, ref["ids"], base),
        "logits_err_ref": logits_error(GOLDEN / "exl3" / name, ref["ids"], base),
    }


def markdown(results: list[dict]) -> str:
    lines = ["| config | max weight-error ratio | mean ratio | logits err ours | logits err ref | logits ratio | time |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['max_weight_ratio']:.3f} | {r['mean_weight_ratio']:.3f} | "
                     f"{r['logits_err_ours']:.4f} | {r['logits_err_ref']:.4f} | "
                     f"{r['logits_err_ours'] / r['logits_err_ref']:.3f} | {r['seconds']:.0f} s |")
    for r in results:
        lines += ["", f"{r['config']} per linear:", "",
                  "| linear | bits ours/ref | err ours | err ref | ratio | g |", "|---|---|---|---|---|---|"]
        for row in r["linears"]:
            lines.append(f"| {row['key']} | {row['bits_ours']:g}/{row['bits_ref']:g} | {row['err_ours']:.4f} | "
                         f"{row['err_ref']:.4f} | {row['ratio']:.3f} | {row['global_scale']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--scale-search", default="full", choices=["full", "fast", "none"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/exl3-convert-quality", help="where the converted models go")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args()
    results = []
    for name in args.configs:
        results.append(run_config(name, args))
        print(markdown(results[-1:]), flush=True)
    print("\n" + markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
