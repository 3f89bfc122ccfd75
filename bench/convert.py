"""Time the converter's core on one large linear: "an 8192 x 8192 linear at 4 bits takes seconds" (GPU).

Synthetic weight (Gaussian with uneven channel scales) and a synthetic Hessian
(correlated inputs), on CUDA by default. Reports the time of each stage:
Hessian preparation (sign flips, Hadamard, block LDL), regularisation + the
global scale search, LDLQ with the Viterbi tile encoder, and packing, plus
the tiles/s of the encoder alone. Not run in CI (needs a GPU).

    python bench/convert.py --size 8192 --bits 4 --codebook mcg --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def main() -> int:
    from exl3_triton.convert.hessian import HessianAccumulator, prepare_hessian
    from exl3_triton.convert.quantize_linear import LinearToQuantize, QuantizeOptions, quantize_linears
    from exl3_triton.convert.tile_encoder import encode_tiles
    from exl3_triton.kernels.weights import Codebook

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=8192, help="k = n of the square weight")
    p.add_argument("--bits", type=float, default=4)
    p.add_argument("--codebook", default="mcg", choices=["mcg", "mul1", "3inst"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--scale-search", default="full", choices=["full", "fast", "none"])
    p.add_argument("--memory-budget-mb", type=int, default=8192)
    p.add_argument("--encoder-tiles", type=int, default=4096, help="random tiles for the encoder-only figure")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args()

    device = torch.device(args.device)
    cb = {"mcg": Codebook.MCG, "mul1": Codebook.MUL1, "3inst": Codebook.THREE_INST}[args.codebook]
    g = torch.Generator(device="cpu").manual_seed(0)
    k = n = args.size
    weight = (torch.randn(n, k, generator=g) * (0.5 + torch.rand(k, generator=g))).to(device) / k**0.5
    x = torch.randn(4 * k, k, generator=g).to(device)
    x = x + 0.3 * torch.roll(x, 1, dims=1)  # correlated features

    # warm-up: codebook table, kernels
    encode_tiles(torch.randn(4, 256, device=device), args.bits, cb)

    acc = HessianAccumulator(k, device)
    _, t_capture = timed(device, lambda: acc.add(x))
    prepared, t_prepare = timed(device, lambda: prepare_hessian(acc.finalize(), torch.Generator().manual_seed(1)))
    options = QuantizeOptions(args.bits, cb, scale_search=args.scale_search,
                              memory_budget=args.memory_budget_mb << 20)
    result, t_quant = timed(device, lambda: quantize_linears([LinearToQuantize("bench", weight)], prepared, options,
                                                             torch.Generator().manual_seed(2), device=device))
    tiles = torch.randn(args.encoder_tiles, 256, device=device)
    _, t_tiles = timed(device, lambda: encode_tiles(tiles, args.bits, cb, memory_budget=options.memory_budget))
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": args.size, "bits": args.bits, "codebook": args.codebook, "scale_search": args.scale_search,
        "hessian_capture_s": t_capture, "hessian_prepare_s": t_prepare,
        "quantize_linear_s": t_quant, "encoder_tiles_per_s": tiles.shape[0] / t_tiles,
        "relative_weight_error": result[0].predicted_error, "proxy_error": result[0].proxy_error,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
