"""The Gluon tensor-core few-row kernel (kernels/gluon_gemv.py).

Gluon has no interpreter, so on a CPU the kernel is compiled for sm_90 (Triton ships ptxas) to check what
its design rests on: every operand reaches ``mma`` without moving (the kernel asserts the layout conversions
are trivial, so a Triton that would move them fails to compile), the tensor-core instruction is there, and
nothing spills. On a GPU it is checked against the PyTorch reference for every format.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from exl3_triton.kernels import Codebook, dispatch, tuning
from exl3_triton.kernels.reference import exl3_matmul_ref
from exl3_triton.kernels.weights import SUPPORTED_BITS, concat_exl3

from ..conftest import random_exl3_weight, rel_err

_COMPILE = """
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from exl3_triton.kernels import gluon_gemv as g
from exl3_triton.kernels.triton_decode import lane_layout

out = []
for bits, cb, rp, nch, split, grouped, prerotated in json.loads(sys.argv[1]):
    lay = lane_layout(bits)
    l7, l5, mma, low, high = g.layouts(g.NUM_WARPS)
    fn = g._mma_gemm_kernel
    consts = dict(W32=lay.w32, KA=lay.ka, HALF=lay.half, NLOAD=lay.nload, CB=cb, BTK=g.BTK, TPW=g.TILES_PER_WARP,
                  NW=g.NUM_WARPS, RP=rp, BN=8 if rp <= 8 else 16, NCH=nch, SPLIT_K=split,
                  FINISH_PAIRS=g.FINISH_PAIRS, HAS_BIAS=True, GROUPED=grouped, PREROTATED=prerotated,
                  L7=l7, L5=l5, MMA=mma, LOW=low, HIGH=high)
    pointers = {"x_ptr": "*fp16", "scratch_ptr": "*fp16", "t32_ptr": "*i32", "suh_ptr": "*fp16", "svh_ptr": "*fp16",
                "bias_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32", "lock_ptr": "*i32", "group_ptr": "*i32"}
    signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in fn.arg_names}
    # as a launch specializes: aligned pointers, sizes multiples of 16 (vector loads)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if signature[n] != "constexpr" and n != "rows"}
    k = triton.compile(GluonASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": g.NUM_WARPS, "num_stages": 1,
                                                                  "maxnreg": g.register_cap(consts, consts["BN"])})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        open(cubin, "wb").write(k.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\\d+)", usage))
    out.append({"regs": int(fields["REG"]), "stack": int(fields.get("STACK", 0)), "local": int(fields.get("LOCAL", 0)),
                "hmma": sass.count("HMMA.16816.F32")})
print(json.dumps(out))
"""


def test_operands_reach_the_tensor_cores_without_moving():
    """Compiled for sm_90 with the installed Triton (in a subprocess: this process runs the interpreter), for
    formats with two and three words per lane, one to eight rows, concatenated linears and a separate rotation."""
    configs = [(4, int(Codebook.MCG), 1, 4, 16, False, False), (2.5, int(Codebook.MUL1), 8, 2, 7, True, False),
               (3, int(Codebook.THREE_INST), 2, 8, 3, False, True), (5, int(Codebook.MCG), 4, 1, 1, True, True),
               (4, int(Codebook.MCG), 16, 4, 16, False, True), (2, int(Codebook.THREE_INST), 16, 8, 8, True, True)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(configs)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for config, res in zip(configs, json.loads(done.stdout.splitlines()[-1])):
        assert res["hmma"] >= 8, (config, res)  # 2 tile rows x 4 tiles a warp: 8 mma per step at least
        assert res["stack"] == 0 and res["local"] == 0, (config, res)  # no spills


def test_dispatch_rules(monkeypatch):
    """1-16 rows take the kernel where the device passed its check; one row of a small weight and more than
    ``tuning.TENSOR_CORE_MAX_ROWS`` rows keep the Triton kernels (the measured crossovers in kernels/tuning.py), and so
    does a CPU."""
    cuda = torch.device("cuda", 0)
    assert not dispatch.use_tensor_core_kernel(2, 4096, 4096, torch.device("cpu"))
    monkeypatch.setattr(dispatch, "mma_ready", lambda device: True)
    small = tuning.TENSOR_CORE_ONE_ROW_MIN_WEIGHT // 4096 - 128  # in x out just below the threshold at in=4096
    assert dispatch.use_tensor_core_kernel(1, 4096, 4096, cuda)
    assert not dispatch.use_tensor_core_kernel(1, 4096, small, cuda)
    assert dispatch.use_tensor_core_kernel(2, 4096, small, cuda)
    assert dispatch.use_tensor_core_kernel(1, 14336, 4096, cuda)  # narrow and deep: Llama's down projection
    assert dispatch.use_tensor_core_kernel(1, 21504, 5376, cuda)
    assert dispatch.use_tensor_core_kernel(8, 4096, 4096, cuda)
    assert dispatch.use_tensor_core_kernel(16, 8192, 8192, cuda)
    assert not dispatch.use_tensor_core_kernel(16, 4096, 4096, cuda)  # 9-16 rows of a smaller weight: Triton
    assert not dispatch.use_tensor_core_kernel(17, 8192, 8192, cuda)
    monkeypatch.setattr(tuning, "TENSOR_CORE_MAX_ROWS", 8)
    assert not dispatch.use_tensor_core_kernel(9, 8192, 8192, cuda)
    monkeypatch.setattr(tuning, "TENSOR_CORE_FEW_ROWS", False)
    assert not dispatch.use_tensor_core_kernel(2, 4096, 4096, cuda)


def test_switched_off_by_the_environment(monkeypatch):
    """EXL3_TRITON_MMA=0 keeps the Triton kernels without touching the device."""
    monkeypatch.setenv("EXL3_TRITON_MMA", "0")
    assert dispatch._check_mma(torch.device("cuda", 0)) is False


def test_refuses_more_rows_than_it_holds():
    from exl3_triton.kernels.gluon_gemv import exl3_gemm_mma

    w = random_exl3_weight(256, 128, 4, Codebook.MCG)
    with pytest.raises(ValueError, match="random_256x128_4.*up to 16 rows"):
        exl3_gemm_mma(torch.zeros(17, 256, dtype=torch.float16), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Gluon kernels run on CUDA only")
def test_matches_the_reference_on_cuda():
    from exl3_triton.kernels.gluon_gemv import exl3_gemm_mma

    for bits in SUPPORTED_BITS:
        for cb in Codebook:
            if bits != int(bits) and cb != Codebook.MUL1:
                continue
            w = random_exl3_weight(512, 256, bits, cb, bias=True, seed=int(bits * 10) + int(cb), device="cuda")
            for rows in (1, 3, 8, 13, 16):
                x = torch.randn(rows, 512, device="cuda").half()
                out = torch.full((rows, 256), float("nan"), dtype=torch.float16, device="cuda")
                assert rel_err(exl3_gemm_mma(x, w, out=out), exl3_matmul_ref(x.float(), w)) < 2e-3, (bits, cb, rows)
    parts = [random_exl3_weight(512, n, 4, Codebook.MCG, seed=90 + n, device="cuda") for n in (256, 128)]
    x = torch.randn(5, 512, device="cuda").half()
    ref = torch.cat([exl3_matmul_ref(x.float(), p) for p in parts], dim=1)
    for in_kernel in (True, False):
        assert rel_err(exl3_gemm_mma(x, concat_exl3(parts), rotate_in_kernel=in_kernel), ref) < 2e-3
    # inputs and outputs that are views off the vector alignment the kernel assumes are copied, not misread
    w = random_exl3_weight(512, 256, 4, Codebook.MCG, bias=True, seed=3, device="cuda")
    wide = torch.randn(3, 512 + 9, device="cuda").half()
    x = wide[:, 1:513]  # row stride 521, one element off
    out = torch.full((3 * 256 + 1,), float("nan"), dtype=torch.float16, device="cuda")[1:].view(3, 256)
    y = exl3_gemm_mma(x, w, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(out, exl3_matmul_ref(x.float(), w)) < 2e-3
