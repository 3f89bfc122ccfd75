"""Time the converter's core on one large linear: "an 8192 x 8192 linear at 4 bits takes seconds" (GPU).

Synthetic weight (Gaussian with uneven channel scales) and a synthetic Hessian
(correlated inputs), on CUDA by default. Reports the time of each stage:
Hessian preparation (sign flips, Hadamard, block LDL), regularisation + the
global scale search, LDLQ with the Viterbi tile encoder, and packing, plus
the tiles/s of the encoder alone. Not run in CI (needs a GPU).

    python bench/convert.py --size 8192 --bits 4 --codebook mcg --device cuda

Before timing, the Triton tile encoder is checked against the PyTorch one on
random tiles at every ``--check-bits`` rate (all three codebooks): same states
(or, on a tie, the same error), valid tail-biting paths; both encoders' tiles/s
are reported.
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


def check_encoders(device: torch.device, rates: list[float], tiles: int) -> list[dict]:
    """Triton vs PyTorch tile encoder on the same random tiles: states, errors, tail-biting.

    Where the states differ, the errors are compared: the PyTorch encoder forms each cost as
    ``best + x^2 + v^2 - 2 x v`` (cheap on whole arrays) and the kernel as ``best + (v - x)^2``,
    which keeps more digits when ``v`` is close to ``x`` (8 bits), so where paths are within
    rounding of each other the two may pick different ones; "ok" means valid paths, every tile's
    error within 1e-3 (relative) of the reference's and the kernel no worse on average."""
    from exl3_triton.convert.tile_encoder import encode_tiles, is_tail_biting
    from exl3_triton.kernels.reference.codebook import CODEBOOK_RMS
    from exl3_triton.kernels.weights import Codebook

    rows = []
    g = torch.Generator(device="cpu").manual_seed(3)
    for bits in rates:
        for cb in ([Codebook.MUL1] if bits != int(bits) else [Codebook.MCG, Codebook.THREE_INST, Codebook.MUL1]):
            targets = (torch.randn(tiles, 256, generator=g) * CODEBOOK_RMS[cb]).to(device)
            ref = encode_tiles(targets, bits, cb, backend="torch")
            got = encode_tiles(targets, bits, cb, backend="triton")
            rel = (got.sq_error - ref.sq_error) / ref.sq_error.clamp(min=1e-12)  # > 0: Triton's worse
            tail = bool(is_tail_biting(got.states, bits).all())
            row = {"bits": bits, "codebook": cb.name, "tiles": tiles,
                   "same_states": (got.states == ref.states).all(1).float().mean().item(),
                   "max_rel_error_diff": rel.abs().max().item(), "mean_rel_error_diff": rel.mean().item(),
                   "tiles_worse_by_1e-4": int((rel > 1e-4).sum()), "tail_biting": tail,
                   "ok": tail and rel.abs().max().item() < 1e-3 and rel.mean().item() <= 1e-5}
            print(f"encoder check {bits:g} {cb.name}: {row}", flush=True)
            rows.append(row)
    return rows


def time_stages(device: torch.device) -> dict:
    """Wrap the converter's stages with timers (seconds, summed over calls), for the breakdown."""
    from exl3_triton.convert import quantize_linear as ql

    totals: dict = {}

    def wrap(name):
        fn = getattr(ql, name)

        def timed_fn(*a, **k):
            out, t = timed(device, lambda: fn(*a, **k))
            totals[name] = totals.get(name, 0.0) + t
            return out

        setattr(ql, name, timed_fn)

    for name in ("regularize", "search_global_scale", "ldlq", "pack_states", "exl3_weight_ref", "_trace_form"):
        wrap(name)
    return totals


def sweep_encoder(device: torch.device, bits: float, tiles: int, configs: list[tuple[int, int]]) -> list[dict]:
    """Tiles/s of the Triton encoder's loop form per (num_warps, outputs per block); states must not change."""
    from exl3_triton.kernels import triton_viterbi
    from exl3_triton.kernels.weights import Codebook

    targets = torch.randn(tiles, 256, device=device, generator=torch.Generator(device=device).manual_seed(4))
    rows, first = [], None
    for warps, outputs in configs:
        run = lambda: triton_viterbi.viterbi_encode_triton(targets, bits, int(Codebook.MCG), num_warps=warps,
                                                           outputs_per_block=outputs)
        states = run()  # compile
        states, t = timed(device, run)
        first = states if first is None else first
        row = {"num_warps": warps, "outputs_per_block": outputs, "tiles_per_s": tiles / t,
               "same_states": bool(torch.equal(states, first))}
        print(f"encoder sweep {bits:g} bits: {row}", flush=True)
        rows.append(row)
    return rows


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
    p.add_argument("--encoder-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="tile encoder for the linear (auto: Triton on CUDA)")
    p.add_argument("--check-bits", default="1,2,3,4,5,6,8,1.5,2.5,3.5",
                   help="rates at which the Triton encoder is checked against the PyTorch one ('' to skip)")
    p.add_argument("--check-tiles", type=int, default=64)
    p.add_argument("--torch-encoder-tiles", type=int, default=512, help="random tiles for the PyTorch encoder's figure")
    p.add_argument("--sweep", default="", help="Triton encoder schedules to time first, e.g. '8x4096,8x2048'")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args()

    device = torch.device(args.device)
    cb = {"mcg": Codebook.MCG, "mul1": Codebook.MUL1, "3inst": Codebook.THREE_INST}[args.codebook]
    g = torch.Generator(device="cpu").manual_seed(0)
    k = n = args.size
    weight = (torch.randn(n, k, generator=g) * (0.5 + torch.rand(k, generator=g))).to(device) / k**0.5
    x = torch.randn(4 * k, k, generator=g).to(device)
    x = x + 0.3 * torch.roll(x, 1, dims=1)  # correlated features

    sweep = sweep_encoder(device, args.bits, args.encoder_tiles,
                          [tuple(int(v) for v in c.split("x")) for c in args.sweep.split(",") if c])
    checks = check_encoders(device, [float(b) for b in args.check_bits.split(",") if b], args.check_tiles)
    # warm-up: codebook table, kernels
    encode_tiles(torch.randn(4, 256, device=device), args.bits, cb, backend=args.encoder_backend)

    acc = HessianAccumulator(k, device)
    _, t_capture = timed(device, lambda: acc.add(x))
    prepared, t_prepare = timed(device, lambda: prepare_hessian(acc.finalize(), torch.Generator().manual_seed(1)))
    options = QuantizeOptions(args.bits, cb, scale_search=args.scale_search,
                              memory_budget=args.memory_budget_mb << 20, encoder_backend=args.encoder_backend)
    stages = time_stages(device)
    result, t_quant = timed(device, lambda: quantize_linears([LinearToQuantize("bench", weight)], prepared, options,
                                                             torch.Generator().manual_seed(2), device=device))
    tiles = torch.randn(args.encoder_tiles, 256, device=device)
    _, t_tiles = timed(device, lambda: encode_tiles(tiles, args.bits, cb, memory_budget=options.memory_budget,
                                                    backend=args.encoder_backend))
    few = tiles[: args.torch_encoder_tiles]
    _, t_torch = timed(device, lambda: encode_tiles(few, args.bits, cb, memory_budget=options.memory_budget,
                                                    backend="torch"))
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": args.size, "bits": args.bits, "codebook": args.codebook, "scale_search": args.scale_search,
        "hessian_capture_s": t_capture, "hessian_prepare_s": t_prepare,
        "encoder_backend": args.encoder_backend,
        "quantize_linear_s": t_quant, "stage_s": stages, "encoder_tiles_per_s": tiles.shape[0] / t_tiles,
        "torch_encoder_tiles_per_s": few.shape[0] / t_torch, "encoder_checks": checks, "encoder_sweep": sweep,
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
