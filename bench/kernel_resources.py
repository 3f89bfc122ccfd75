"""Compile kernel variants for a GPU target without a GPU and report their resources.

    python bench/kernel_resources.py [--arch 90] [--bits 4] [--codebook 1] [--sass DIR]

Triton's wheel ships ptxas, cuobjdump and nvdisasm, so the fused EXL3 kernels
can be compiled here for sm_90 and inspected: registers per thread, spills,
shared memory, and the SASS instruction mix (how many integer, fp16, fp32,
tensor-core, load and shuffle instructions the kernel holds). That answers
"does this variant spill?" and "what did the decode compile to?" at no device
time (docs/performance.md, notes).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exl3_triton.kernels import triton_gemm, triton_moe  # noqa: E402
from exl3_triton.kernels.triton_decode import lane_layout  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

POINTERS = {
    "x_ptr": "*fp16", "suh_ptr": "*fp16", "svh_ptr": "*fp16", "bias_ptr": "*fp16", "y_ptr": "*fp16",
    "h16_ptr": "*fp16", "t32_ptr": "*i32", "ws_ptr": "*fp32", "lock_ptr": "*i32", "h32_ptr": "*fp32",
    "ids_ptr": "*i32", "rw_ptr": "*fp32", "slots_ptr": "*i32", "block_expert_ptr": "*i32",
    "scratch_ptr": "*fp16", "xh_ptr": "*fp16",
}

# SASS opcode -> class, for the instruction mix
CLASSES = {
    "int": ("IMAD", "IADD3", "LOP3", "SHF", "SEL", "ISETP", "LEA", "PRMT", "IABS", "IMNMX", "VIMNMX", "FLO",
            "POPC", "BMSK", "SGXT", "IDP"),
    "fp16": ("HADD2", "HFMA2", "HMUL2", "HSETP2", "HMNMX2"),
    "fp32": ("FFMA", "FADD", "FMUL", "FSETP", "FSEL", "FMNMX"),
    "convert": ("F2F", "I2F", "F2I", "F2FP", "I2FP", "F2IP"),
    "tensor": ("HMMA", "HGMMA", "IMMA"),
    "load": ("LDG", "LDS", "LDSM", "LD", "LDC", "LDGSTS", "LDGDEPBAR"),
    "store": ("STG", "STS", "ST"),
    "shuffle": ("SHFL",),
    "move": ("MOV", "MOV32I", "S2R", "CS2R", "S2UR", "R2UR", "UMOV"),
}


def compile_variant(fn, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    signature = {n: ("constexpr" if n in constexprs else POINTERS.get(n, "i32")) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resources(kernel) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(TOOLS / "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([str(TOOLS / "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*(?:/\*[0-9a-f]+\*/)?\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m and not line.strip().startswith("."):
            ops[m.group(1).split(".")[0]] += 1
    mix = {c: sum(ops[o] for o in names) for c, names in CLASSES.items()}
    return {"regs": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
            "shared": int(fields.get("SHARED", 0)), "local": int(fields.get("LOCAL", 0)), "mix": mix,
            "instructions": sum(ops.values()), "sass": sass}


def gemm_variants():
    for bm, btk, warps, rot in [(1, 1, 4, True), (1, 2, 4, True), (1, 1, 8, True), (1, 2, 8, True), (1, 4, 8, True),
                                (1, 2, 8, False), (2, 1, 4, False), (2, 2, 4, False), (4, 1, 4, False), (4, 1, 8, False),
                                (4, 2, 8, False), (16, 1, 4, False), (16, 2, 4, False), (16, 4, 4, False),
                                (16, 1, 8, False), (16, 2, 8, False), (16, 4, 8, False),
                                (16, 2, 8, True), (32, 2, 8, False), (64, 2, 8, False), (128, 1, 8, False)]:
        yield (f"gemm {'fma' if bm < 16 else 'dot'}{'+rot' if rot else ''} bm{bm} btk{btk} w{warps}",
               triton_gemm._exl3_gemm_kernel, dict(BLOCK_M=bm, BTK=btk, SPLIT_K=4, ROTATE_IN_KERNEL=rot, NCH=8, FIN_ROWS=min(bm, 4),
                                                   HAS_BIAS=False, PREFETCH=0, LANE_MAJOR=False, EARLY_LOAD=False), warps)
    # the one-row ring loop (kernels/triton_gemv.py): steps in flight x load shape x early first load
    for btk, warps, prefetch, lanes, early in [(1, 4, 1, False, False), (1, 4, 2, False, False), (1, 4, 3, False, False),
                                               (1, 4, 1, True, False), (1, 4, 2, True, False), (1, 4, 3, True, False),
                                               (1, 4, 2, True, True), (2, 4, 2, True, False), (2, 8, 2, True, False),
                                               (4, 8, 1, True, False)]:
        yield (f"gemm fma+rot bm1 btk{btk} w{warps} ring{prefetch}{' lanes' if lanes else ''}{' early' if early else ''}",
               triton_gemm._exl3_gemm_kernel, dict(BLOCK_M=1, BTK=btk, SPLIT_K=4, ROTATE_IN_KERNEL=True, NCH=8, FIN_ROWS=1,
                                                   HAS_BIAS=False, PREFETCH=prefetch, LANE_MAJOR=lanes,
                                                   EARLY_LOAD=early), warps)


def moe_variants():
    yield ("moe decode reduce", triton_moe._exl3_moe_decode_kernel,
           dict(TOPK=8, X_PER_SLOT=True, REDUCE=True, SPLIT_K=2, BTK=2, NCH=8, TOPK_P2=8, SPLIT_GROUP=2), 8)
    yield ("moe grouped bm16", triton_moe._exl3_moe_grouped_kernel,
           dict(HAS_WEIGHTS=False, BLOCK_M=16, BTK=2), 8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--bits", type=float, default=4)
    parser.add_argument("--codebook", type=int, default=1, help="0 3INST, 1 MCG, 2 MUL1")
    parser.add_argument("--ptx", type=int, default=1, help="1: inline-PTX codebook, 0: pure Triton")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--filter", default="", help="only variants whose name contains this")
    parser.add_argument("--sass", default=None, help="directory to write each variant's SASS to")
    args = parser.parse_args()
    layout = lane_layout(args.bits)
    fmt = dict(W32=layout.w32, KA=layout.ka, HALF=layout.half, NLOAD=layout.nload, CB=args.codebook,
               USE_PTX=bool(args.ptx))
    print(f"sm_{args.arch}, K={args.bits:g}, codebook {args.codebook}, ptx={bool(args.ptx)}")
    print(f"{'variant':34} {'regs':>4} {'stack':>5} {'local':>5} {'shared':>7} {'instr':>6}  mix")
    for name, fn, constexprs, warps in [*gemm_variants(), *moe_variants()]:
        if args.filter not in name:
            continue
        try:
            res = resources(compile_variant(fn, {**fmt, **constexprs}, args.arch, warps, args.stages))
        except Exception as e:
            print(f"{name:34} ERROR {str(e)[:200]}")
            continue
        mix = " ".join(f"{k}={v}" for k, v in res["mix"].items() if v)
        print(f"{name:34} {res['regs']:>4} {res['stack']:>5} {res['local']:>5} {res['shared']:>7} "
              f"{res['instructions']:>6}  {mix}")
        if args.sass:
            Path(args.sass).mkdir(parents=True, exist_ok=True)
            (Path(args.sass) / (name.replace(" ", "_") + ".sass")).write_text(res["sass"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
