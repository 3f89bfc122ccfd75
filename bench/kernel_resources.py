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
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exl3_triton.kernels import triton_gemm, triton_moe  # noqa: E402
from exl3_triton.kernels.triton_decode import lane_layout  # noqa: E402
from exl3_triton.kernels.triton_gemv import lanes_arrangement  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

POINTERS = {
    "x_ptr": "*fp16", "suh_ptr": "*fp16", "svh_ptr": "*fp16", "bias_ptr": "*fp16", "y_ptr": "*fp16",
    "h16_ptr": "*fp16", "t32_ptr": "*i32", "ws_ptr": "*fp32", "lock_ptr": "*i32", "h32_ptr": "*fp32",
    "ids_ptr": "*i32", "rw_ptr": "*fp32", "slots_ptr": "*i32", "block_expert_ptr": "*i32",
    "scratch_ptr": "*fp16", "xh_ptr": "*fp16", "group_ptr": "*i32",
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
    fields["SHARED"] = max(int(fields.get("SHARED", 0)), kernel.metadata.shared)  # Triton's is dynamic
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*(?:/\*[0-9a-f]+\*/)?\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m and not line.strip().startswith("."):
            ops[m.group(1).split(".")[0]] += 1
    mix = {c: sum(ops[o] for o in names) for c, names in CLASSES.items()}
    return {"regs": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
            "shared": int(fields.get("SHARED", 0)), "local": int(fields.get("LOCAL", 0)), "mix": mix,
            "instructions": sum(ops.values()), "sass": sass}


def main_loop(sass: str) -> dict:
    """The innermost loop with the most global loads (the main loop), from SASS text.

    Reports its instructions, its LDGs and, per LDG, how many instructions later the
    loaded register is first read, and whether that read sits in the same iteration
    (the load's latency then has to hide behind fewer instructions) or the next one.
    A MOV as first reader means the value is copied to another register: the copy
    waits for the load, so it, not the real use, is where a warp stalls.
    """
    lines = []
    for raw in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", raw)
        if label:
            lines.append(("label", label.group(1)))
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s*((?:@!?U?P\w+\s+)?)([A-Z][A-Z0-9_.]*)\s*(.*?);", raw)
        if m:
            lines.append(("ins", m.group(2), m.group(3), m.group(1)))
    best = None
    for i, item in enumerate(lines):
        if item[0] != "ins" or not item[1].startswith("BRA"):
            continue
        target = re.search(r"\((\.L_x_\d+)\)", item[2])
        starts = [j for j, it in enumerate(lines[:i]) if it[0] == "label" and target and it[1] == target.group(1)]
        if not starts:
            continue
        body = [it for it in lines[starts[0] + 1:i + 1] if it[0] == "ins"]
        ldg = sum(1 for it in body if it[1].split(".")[0] in ("LDG", "LDGSTS"))
        if ldg and (best is None or ldg > best[0] or (ldg == best[0] and len(body) < len(best[1]))):
            best = (ldg, body)
    if best is None:
        return {}
    body = best[1]
    loads = []
    for k, it in enumerate(body):
        if it[1].split(".")[0] != "LDG":  # register loads (LDGSTS copies to shared memory)
            continue
        dest = it[2].split(",")[0].strip()
        width = 2 if ".64" in it[1] else 4 if ".128" in it[1] else 1
        base = int(dest[1:])
        regs = [f"R{base + r}" for r in range(width)]
        for d in range(1, len(body) + 1):
            nxt = body[(k + d) % len(body)]
            operands = nxt[2].split(",")
            srcs = ",".join(operands if nxt[1].startswith(("ST", "BRA")) else operands[1:])
            if any(re.search(rf"\b{r}\b", srcs) for r in regs):
                loads.append({"load": f"{it[1]} {dest}", "first_read": nxt[1], "after": d,
                              "same_iteration": k + d < len(body)})
                break
    ops = collections.Counter(it[1].split(".")[0] for it in body)
    return {"instructions": len(body), "ldg": ops["LDG"], "ldgsts": ops["LDGSTS"], "lds": ops["LDS"],
            "loads": loads}


# the one-row variants' switches, off (kernels/triton_gemm.py, GemmConfig.prefetch_steps etc.)
LANE_MAJOR = lanes_arrangement()  # GemmConfig.lane_major for the installed Triton
ONE_ROW_DEFAULTS = dict(PREFETCH=0, LANES=0, EARLY_LOAD=False, ASYNC_STAGES=0, GROUPED=False)


def gemm_variants():
    for bm, btk, warps, rot in [(1, 1, 4, True), (1, 2, 4, True), (1, 1, 8, True), (1, 2, 8, True), (1, 4, 8, True),
                                (1, 2, 8, False), (2, 1, 4, False), (2, 2, 4, False), (4, 1, 4, False), (4, 1, 8, False),
                                (4, 2, 8, False), (16, 1, 4, False), (16, 2, 4, False), (16, 4, 4, False),
                                (16, 1, 8, False), (16, 2, 8, False), (16, 4, 8, False),
                                (16, 2, 8, True), (32, 2, 8, False), (64, 2, 8, False), (128, 1, 8, False)]:
        yield (f"gemm {'fma' if bm < 16 else 'dot'}{'+rot' if rot else ''} bm{bm} btk{btk} w{warps}",
               triton_gemm._exl3_gemm_kernel, dict(BLOCK_M=bm, BTK=btk, SPLIT_K=4, ROTATE_IN_KERNEL=rot, NCH=8, FIN_ROWS=min(bm, 4),
                                                   HAS_BIAS=False, **ONE_ROW_DEFAULTS), warps)
    # the one-row loops of kernels/triton_gemv.py: ring (steps in flight) or cp.async stages, x load shape
    lanes = dict(LANES=LANE_MAJOR)
    for btk, warps, variant in [(1, 4, dict(PREFETCH=1)), (1, 4, dict(PREFETCH=2)), (1, 4, dict(PREFETCH=3)),
                                (1, 4, dict(PREFETCH=1, **lanes)), (1, 4, dict(PREFETCH=2, **lanes)),
                                (1, 4, dict(PREFETCH=3, **lanes)), (1, 4, dict(PREFETCH=2, EARLY_LOAD=True, **lanes)),
                                (2, 4, dict(PREFETCH=2, **lanes)), (2, 8, dict(PREFETCH=2, **lanes)),
                                (4, 8, dict(PREFETCH=1, **lanes)), (1, 4, dict(ASYNC_STAGES=2)),
                                (1, 4, dict(ASYNC_STAGES=3)), (1, 4, dict(ASYNC_STAGES=4)),
                                (1, 4, dict(ASYNC_STAGES=3, **lanes)), (1, 4, dict(ASYNC_STAGES=4, **lanes)),
                                (2, 4, dict(ASYNC_STAGES=3, **lanes)), (2, 8, dict(ASYNC_STAGES=3, **lanes))]:
        tags = (f"{' ring%d' % variant['PREFETCH'] if 'PREFETCH' in variant else ''}"
                f"{' async%d' % variant['ASYNC_STAGES'] if 'ASYNC_STAGES' in variant else ''}"
                f"{' lanes' if variant.get('LANES') else ''}{' early' if variant.get('EARLY_LOAD') else ''}")
        yield (f"gemm fma+rot bm1 btk{btk} w{warps}{tags}", triton_gemm._exl3_gemm_kernel,
               dict(BLOCK_M=1, BTK=btk, SPLIT_K=4, ROTATE_IN_KERNEL=True, NCH=8, FIN_ROWS=1, HAS_BIAS=False,
                    **{**ONE_ROW_DEFAULTS, **variant}), warps)


# the MoE decode kernel's MoeDecodeConfig switches, off (every constexpr is named: a missing one would be compiled
# as a runtime argument)
MOE_DECODE_DEFAULTS = dict(PREFETCH=0, LANES=0, EARLY_LOAD=False, COL_BLOCKS=1, ROTATE_IN_KERNEL=True, MEMBERS=1)


def moe_variants():
    previous = dict(TOPK=8, X_PER_SLOT=True, REDUCE=True, SPLIT_K=2, BTK=2, NCH=8, TOPK_P2=8, SPLIT_GROUP=2,
                    **MOE_DECODE_DEFAULTS)
    yield ("moe decode reduce", triton_moe._exl3_moe_decode_kernel, previous, 8)
    # the decode schedule's MoeDecodeConfig variants: the dense one-row ring loop, column blocks, rotation launch
    ring = dict(previous, BTK=1, NCH=4, PREFETCH=3, LANES=LANE_MAJOR, EARLY_LOAD=True)
    yield ("moe decode reduce ring3 lanes early", triton_moe._exl3_moe_decode_kernel, ring, 4)
    yield ("moe decode reduce ring3 lanes early cols2", triton_moe._exl3_moe_decode_kernel,
           dict(ring, COL_BLOCKS=2), 4)
    yield ("moe decode ring3 lanes rot-launch", triton_moe._exl3_moe_decode_kernel,
           dict(ring, X_PER_SLOT=False, REDUCE=False, EARLY_LOAD=False, ROTATE_IN_KERNEL=False), 4)
    yield ("moe grouped bm16", triton_moe._exl3_moe_grouped_kernel,
           dict(HAS_WEIGHTS=False, BLOCK_M=16, BTK=2, LANES=0), 8)


@triton.jit
def _gather_probe(t32_ptr, lock_ptr):  # parameter names typed by POINTERS
    a = tl.arange(0, 4)[:, None, None]
    b = tl.arange(0, 8)[None, :, None]
    c = tl.arange(0, 8)[None, None, :]
    v = tl.load(t32_ptr + (a * 97 + b * 13 + c * 41) % 251)  # no axis provably contiguous
    tl.store(lock_ptr + a * 64 + b * 8 + c, v)


def coalesce_order(arch: int) -> str:
    """The layout Triton's coalescing pass gives a gather load with no contiguous axis: which axes the
    threads of a warp spread over first (kernels/triton_gemv.py, ``lanes_arrangement``)."""
    kernel = compile_variant(_gather_probe, {}, arch, 4, 1)
    load = re.search(r"tt\.load[^\n]*#(blocked\d*)", kernel.asm["ttgir"]).group(1)
    return re.search(r"#%s = (#ttg\.blocked<[^\n]*>)" % load, kernel.asm["ttgir"]).group(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--bits", type=float, default=4)
    parser.add_argument("--codebook", type=int, default=1, help="0 3INST, 1 MCG, 2 MUL1")
    parser.add_argument("--ptx", type=int, default=1, help="1: inline-PTX codebook, 0: pure Triton")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--filter", default="", help="only variants whose name contains this")
    parser.add_argument("--loop", action="store_true", help="also report the main loop: LDGs and first reads")
    parser.add_argument("--sass", default=None, help="directory to write each variant's SASS to")
    parser.add_argument("--coalesce-order", action="store_true",
                        help="print the thread order Triton gives a gather load, then stop")
    args = parser.parse_args()
    if args.coalesce_order:
        print(f"Triton {triton.__version__}: {coalesce_order(args.arch)}")
        return 0
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
        if args.loop:
            loop = main_loop(res["sass"])
            reads = ", ".join(f"{ld['first_read']}+{ld['after']}{'' if ld['same_iteration'] else '(next)'}"
                              for ld in loop.get("loads", []))
            print(f"    main loop: {loop.get('instructions')} instructions, {loop.get('ldg')} LDG, "
                  f"{loop.get('ldgsts')} LDGSTS, {loop.get('lds')} LDS; first reads: {reads}")
        if args.sass:
            Path(args.sass).mkdir(parents=True, exist_ok=True)
            (Path(args.sass) / (name.replace(" ", "_") + ".sass")).write_text(res["sass"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
