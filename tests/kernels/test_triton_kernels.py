"""Triton kernels against the PyTorch reference (under the interpreter on CPU, small sizes).

Tolerances: decode is bit-exact; matmuls round activations and outputs to fp16
like ExLlamaV3 does, so they are held to relative error < 2e-3 of the fp32
reference.
"""

import pytest
import torch
from safetensors import safe_open

from exl3_triton.checkpoint import Checkpoint
from exl3_triton.errors import InvalidArgumentError
from exl3_triton.kernels import Codebook, Exl3ExpertStack, exl3_full_weight, exl3_matmul, exl3_moe, hadamard_128
from exl3_triton.kernels.reference import (
    dequant_inner_ref,
    exl3_matmul_ref,
    exl3_moe_ref,
    exl3_weight_ref,
    hadamard_128_ref,
)
from exl3_triton.kernels.weights import SUPPORTED_BITS

from ..conftest import GOLDEN_EXL3, random_exl3_weight, rel_err

MATMUL_TOL = 2e-3
ALL_FORMATS = [(b, cb) for b in SUPPORTED_BITS for cb in Codebook if b == int(b) or cb == Codebook.MUL1]


def _poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("bits,cb", ALL_FORMATS, ids=lambda v: str(v))
def test_dequant_bit_exact_every_format(triton_kernels, device, bits, cb):
    w = random_exl3_weight(128, 256, bits, cb, seed=int(bits * 10) + int(cb), device=device)
    out = _poisoned((128, 256), torch.float16, device)
    got = triton_kernels.dequant.dequant_inner_triton(w, out=out)
    assert torch.equal(got.view(torch.int16), dequant_inner_ref(w.trellis, bits, cb).view(torch.int16))


def test_dequant_column_block(triton_kernels, device):
    w = random_exl3_weight(128, 384, 3, Codebook.MCG, device=device)
    full = dequant_inner_ref(w.trellis, 3, Codebook.MCG)
    part = triton_kernels.dequant.dequant_inner_triton(w, col_start=128, col_end=272)
    assert torch.equal(part, full[:, 128:272])


@pytest.mark.parametrize("name", GOLDEN_EXL3)
def test_dequant_golden_trellises(golden, triton_kernels, device, name):
    ckpt = Checkpoint(golden / "exl3" / name)
    ref = safe_open(str(golden / "exl3" / "ref" / f"{name}_ref.safetensors"), "pt")
    for key in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        w = ckpt.exl3_linear(key, device=device)
        got = triton_kernels.dequant.dequant_inner_triton(w)
        assert torch.equal(got.cpu().view(torch.int16), ref.get_tensor(f"wi.{key}").view(torch.int16)), key


def test_full_weight_triton_backend(device):
    w = random_exl3_weight(256, 128, 4, Codebook.MUL1, device=device)
    assert rel_err(exl3_full_weight(w, backend="triton"), exl3_weight_ref(w)) < 1e-5


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_hadamard(triton_kernels, device, rows):  # 3 rows: factored form; 40: tensor-core form
    x = torch.randn(rows, 384, device=device)
    pre, post = torch.randn(384, device=device), torch.randn(384, device=device)
    assert rel_err(hadamard_128(x, pre, post, backend="triton"), hadamard_128_ref(x, pre, post)) < 1e-5
    xh = triton_kernels.hadamard.exl3_input_rotate(x.half(), pre.half())
    expected = hadamard_128_ref((x.half() * pre.half()).float()).half()  # upstream's rounding points
    assert (xh.float() - expected.float()).abs().max() <= 2e-3 * expected.float().abs().max()


@pytest.mark.parametrize("schedule", [dict(h_in_registers=True, row_blocks=2, block_r=64),
                                      dict(row_blocks=4, block_r=64)])
def test_rotation_schedules(triton_kernels, device, schedule):
    # Tensor-core form with H made from the index bits and/or several row blocks per program;
    # 200 rows = 3 full blocks of 64 and a partial one, so the last program's blocks run past the end.
    x = torch.randn(200, 256, device=device)
    pre, post = torch.randn(256, device=device), torch.randn(256, device=device)
    rot = triton_kernels.hadamard
    xh = rot.exl3_input_rotate(x.half(), pre.half(), schedule=schedule)
    expected = hadamard_128_ref((x.half() * pre.half()).float()).half()
    assert (xh.float() - expected.float()).abs().max() <= 2e-3 * expected.float().abs().max()
    y = rot.exl3_output_rotate(x.half(), post.half(), pre.half(), torch.float16, schedule=schedule)
    expected = hadamard_128_ref(x.half().float(), post_scale=post.half()) + pre.half().float()
    assert rel_err(y.float(), expected) < 2e-3


GEMM_CASES = [  # (rows, bits, codebook, config kwargs)
    (1, 4, Codebook.MCG, dict(block_m=1, btk=1)),
    (1, 2, Codebook.MUL1, dict(block_m=1, btk=2, split_k=2)),
    (1, 3.5, Codebook.MUL1, dict(block_m=1, btk=2, rotate_in_kernel=True, split_k=2)),
    (2, 4, Codebook.MCG, dict(block_m=2, btk=1)),
    (3, 3, Codebook.MUL1, dict(block_m=4, btk=1)),
    (9, 2.5, Codebook.MUL1, dict(block_m=4, btk=2, split_k=2)),
    (3, 5, Codebook.THREE_INST, dict(block_m=16, btk=2)),
    (7, 2.5, Codebook.MUL1, dict(block_m=16, btk=1, split_k=4)),
    (5, 6, Codebook.MCG, dict(block_m=16, btk=2, rotate_in_kernel=True)),
    (17, 8, Codebook.MCG, dict(block_m=16, btk=2, split_k=2)),
    (33, 1.5, Codebook.MUL1, dict(block_m=32, btk=2, rotate_in_kernel=True, split_k=2)),
    (18, 4, Codebook.MCG, dict(block_m=16, btk=1, split_k=16)),
    (4, 4, Codebook.MCG, dict(block_m=4, btk=2, rotate_in_kernel=True, split_k=2)),  # verification rows
    # one-row ring loop (kernels/triton_gemv.py): steps in flight, lane-major loads, early first load;
    # 256 features = 16 tile rows, so 3 and 4 register sets leave a partial last group (zero activations)
    (1, 4, Codebook.MCG, dict(block_m=1, btk=1, prefetch_steps=1)),
    (1, 4, Codebook.MCG, dict(block_m=1, btk=1, prefetch_steps=2, lane_major=True, rotate_in_kernel=True)),
    (1, 3.5, Codebook.MUL1, dict(block_m=1, btk=1, prefetch_steps=3)),  # auto split: 1 step a program
    (1, 5, Codebook.THREE_INST, dict(block_m=1, btk=2, prefetch_steps=2, lane_major=True, split_k=2)),
    (1, 2, Codebook.MCG, dict(block_m=1, btk=1, prefetch_steps=3, lane_major=True, rotate_in_kernel=True,
                              early_load=True, split_k=2)),
    (1, 6, Codebook.MUL1, dict(block_m=1, btk=4, prefetch_steps=1, lane_major=True, rotate_in_kernel=True,
                               early_load=True, num_warps=8)),
    # one-row loop pipelined by Triton (cp.async stages on a GPU; the interpreter runs the plain loop)
    (1, 4, Codebook.MCG, dict(block_m=1, btk=1, async_stages=3, rotate_in_kernel=True)),
    (1, 2.5, Codebook.MUL1, dict(block_m=1, btk=2, async_stages=4, lane_major=True, split_k=2)),
]


@pytest.mark.parametrize("rows,bits,cb,cfg", GEMM_CASES, ids=lambda v: str(v))
def test_fused_gemm(triton_kernels, device, rows, bits, cb, cfg):
    w = random_exl3_weight(256, 256, bits, cb, bias=True, seed=rows, device=device)
    x = torch.randn(rows, 256, device=device).half()
    out = _poisoned((rows, 256), torch.float16, device)
    y = triton_kernels.gemm.exl3_gemm_triton(x, w, triton_kernels.gemm.GemmConfig(**cfg), out=out)
    assert torch.isfinite(y).all()
    assert rel_err(y, exl3_matmul_ref(x.float(), w)) < MATMUL_TOL


def test_split_k_is_deterministic_and_counters_reset(triton_kernels, device):
    w = random_exl3_weight(512, 128, 4, Codebook.MCG, device=device)
    x = torch.randn(2, 512, device=device).half()
    cfg = triton_kernels.gemm.GemmConfig(block_m=16, btk=2, split_k=4)
    first = triton_kernels.gemm.exl3_gemm_triton(x, w, cfg)
    again = triton_kernels.gemm.exl3_gemm_triton(x, w, cfg)
    assert torch.equal(first, again)
    locks, _ = triton_kernels.gemm.device_buffers(torch.device(device))
    assert int(locks.abs().sum()) == 0


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 20, 150])  # every plan of the dispatcher
def test_public_matmul_dispatch(device, rows):
    w = random_exl3_weight(256, 384, 4, Codebook.MCG, bias=True, device=device)
    x = torch.randn(2, rows, 256, device=device).half()  # batched leading dims
    y = exl3_matmul(x, w, backend="triton")
    assert y.shape == (2, rows, 384)
    assert rel_err(y, exl3_matmul_ref(x.float(), w)) < MATMUL_TOL


def _odd_sized_weight(device):
    return random_exl3_weight(640, 1152, 3, Codebook.MCG, bias=True, seed=9, device=device)


def test_odd_sized_weight_dequant(triton_kernels, device):
    # Once, not per GEMM configuration below: the dequant kernel takes no configuration.
    w = _odd_sized_weight(device)
    assert torch.equal(triton_kernels.dequant.dequant_inner_triton(w), dequant_inner_ref(w.trellis, 3, Codebook.MCG))


@pytest.mark.parametrize("rows,cfg", [(1, dict(block_m=1, btk=2, rotate_in_kernel=True)), (5, dict(block_m=16, btk=1))])
def test_odd_sized_weight(triton_kernels, device, rows, cfg):
    w = _odd_sized_weight(device)
    x = torch.randn(rows, 640, device=device).half()
    y = triton_kernels.gemm.exl3_gemm_triton(x, w, triton_kernels.gemm.GemmConfig(**cfg))
    assert rel_err(y, exl3_matmul_ref(x.float(), w)) < MATMUL_TOL


def _stack(e, k, n, bits, cb, device):
    return Exl3ExpertStack.from_weights([random_exl3_weight(k, n, bits, cb, seed=i, device=device) for i in range(e)],
                                        key="experts")


@pytest.mark.parametrize("schedule,split_k", [("decode", 1), ("decode", 2), ("grouped", None)])
def test_moe(triton_kernels, device, schedule, split_k):
    stack = _stack(5, 256, 128, 4, Codebook.MCG, device)
    ids = torch.tensor([[4, 1], [1, 1], [0, -1]], device=device)  # a repeated expert and a skipped slot
    rw = torch.rand(3, 2, device=device)
    x = torch.randn(3, 256, device=device).half()
    xs = torch.randn(3, 2, 256, device=device).half()
    moe = triton_kernels.moe.exl3_moe_triton
    proj = moe(x, stack, ids, schedule=schedule, split_k=split_k)
    assert proj.shape == (3, 2, 128)
    ref = exl3_moe_ref(x.float(), stack, ids)
    assert rel_err(proj, ref) < MATMUL_TOL
    comb = moe(xs, stack, ids, rw, schedule=schedule, split_k=split_k)
    assert comb.shape == (3, 128)
    assert rel_err(comb, exl3_moe_ref(xs.float(), stack, ids, rw)) < MATMUL_TOL


def test_moe_decode_sums_many_splits(triton_kernels, device):
    # 16 K slices per slot and 3 experts per token: the finishing program loads the partials of all
    # slots in groups (two groups here) and must still add exactly the reference's terms
    stack = _stack(4, 2048, 128, 2, Codebook.MCG, device)
    ids = torch.tensor([[3, 0, 2], [1, -1, 1]], device=device)
    rw = torch.rand(2, 3, device=device)
    xs = torch.randn(2, 3, 2048, device=device).half()
    moe = triton_kernels.moe.exl3_moe_triton
    # the finish is the same for every loop: one 8-tile step per slice keeps the interpreter quick
    one_step = triton_kernels.moe.MoeDecodeConfig(btk=8, num_warps=4)
    comb = moe(xs, stack, ids, rw, schedule="decode", split_k=16, decode=one_step)
    assert rel_err(comb, exl3_moe_ref(xs.float(), stack, ids, rw)) < MATMUL_TOL
    proj = moe(xs, stack, ids, schedule="decode", split_k=16, decode=one_step)
    assert rel_err(proj, exl3_moe_ref(xs.float(), stack, ids)) < MATMUL_TOL


def test_moe_grouped_many_tokens(device):
    stack = _stack(4, 128, 256, 3, Codebook.MUL1, device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (40, 2), generator=g).to(device)
    rw = torch.rand(40, 2, generator=g).to(device)
    xs = torch.randn(40, 2, 128, generator=g).to(device).half()
    got = exl3_moe(xs, stack, ids, rw, backend="triton")  # 80 slots: grouped schedule
    assert rel_err(got, exl3_moe_ref(xs.float(), stack, ids, rw)) < MATMUL_TOL
    ids[3, 1] = -1  # a dropped slot
    got = exl3_moe(xs, stack, ids, rw, backend="triton")
    assert rel_err(got, exl3_moe_ref(xs.float(), stack, ids, rw)) < MATMUL_TOL


def test_align_slots_layout(triton_kernels, device):
    ids = torch.tensor([[2, 0], [2, 2], [-1, 0]], device=device)
    slots, block_expert = triton_kernels.moe.align_slots(ids, 4, 2)
    blocks = [(int(e), slots[2 * b:2 * b + 2].tolist()) for b, e in enumerate(block_expert) if e >= 0]
    assert blocks == [(0, [1, 5]), (2, [0, 2]), (2, [3, -1])]  # slots in order, padded per expert


def test_expert_stack_rejects_mismatch(device):
    a = random_exl3_weight(128, 128, 4, Codebook.MCG, device=device)
    b = random_exl3_weight(128, 128, 3, Codebook.MCG, device=device)
    with pytest.raises(ValueError, match="must match"):
        Exl3ExpertStack.from_weights([a, b], key="mlp.experts.up")


@pytest.mark.parametrize("cfg,option", [
    (dict(block_m=16, prefetch_steps=2), "block_m=16"),
    (dict(block_m=1, prefetch_steps=4), "got 4"),
    (dict(block_m=1, lane_major=True), "prefetch_steps"),
    (dict(block_m=1, prefetch_steps=1, early_load=True), "rotate_in_kernel"),
    (dict(block_m=1, async_stages=1), "got 1"),
    (dict(block_m=1, async_stages=3, prefetch_steps=2), "replaces"),
])
def test_one_row_variant_options_are_checked(triton_kernels, cfg, option):
    with pytest.raises(InvalidArgumentError, match=option):
        triton_kernels.gemm.GemmConfig(**cfg)


@pytest.mark.parametrize("arrangement", [1, 2])
@pytest.mark.parametrize("rows,block_m,bits,cb,btk", [(16, 16, 4, Codebook.MCG, 2), (20, 16, 3.5, Codebook.MUL1, 1),
                                                      (3, 4, 2, Codebook.THREE_INST, 2), (2, 2, 4, Codebook.MCG, 1)])
def test_several_rows_lane_major_loads(triton_kernels, device, monkeypatch, arrangement, rows, block_m, bits, cb, btk):
    """The several-row loops (tensor cores, FMAs) with lane-major word loads (both axis orders) give the
    reference result."""
    monkeypatch.setattr(triton_kernels.gemm, "lanes_arrangement", lambda: arrangement)
    w = random_exl3_weight(256, 256, bits, cb, bias=True, seed=arrangement, device=device)
    x = torch.randn(rows, 256, device=device).half()
    out = _poisoned((rows, 256), torch.float16, device)
    config = triton_kernels.gemm.GemmConfig(block_m=block_m, btk=btk, lane_major=True, split_k=2)
    y = triton_kernels.gemm.exl3_gemm_triton(x, w, config, out=out)
    assert torch.isfinite(y).all()
    assert rel_err(y, exl3_matmul_ref(x.float(), w)) < MATMUL_TOL


@pytest.mark.parametrize("arrangement", [1, 2])
@pytest.mark.parametrize("cfg", [dict(prefetch_steps=2), dict(async_stages=3)], ids=["ring", "async"])
def test_one_row_lane_arrangements(triton_kernels, device, monkeypatch, arrangement, cfg):
    """Both lane-major axis orders (Triton 3.7+ and Triton 3.6 pick different ones) give the reference result."""
    monkeypatch.setattr(triton_kernels.gemm, "lanes_arrangement", lambda: arrangement)
    w = random_exl3_weight(256, 256, 3, Codebook.MCG, bias=True, seed=arrangement, device=device)
    x = torch.randn(1, 256, device=device).half()
    out = _poisoned((1, 256), torch.float16, device)
    config = triton_kernels.gemm.GemmConfig(block_m=1, btk=2, lane_major=True, split_k=2, **cfg)
    y = triton_kernels.gemm.exl3_gemm_triton(x, w, config, out=out)
    assert torch.isfinite(y).all()
    assert rel_err(y, exl3_matmul_ref(x.float(), w)) < MATMUL_TOL
