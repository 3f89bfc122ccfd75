"""The MoE decode schedule's variants (``MoeDecodeConfig``: the previous one-row loop, the dense kernel's ring
loop, several column blocks per program, rotation in a separate launch, K splits) against the PyTorch reference
``exl3_moe_ref``, under Triton's interpreter at tiny sizes.

Every call writes into a NaN-poisoned output, so a block no program writes shows up as an error; each variant
runs with routing weights (the in-kernel sum over a token's slots, one input per slot) and without (one input per
token), with a skipped slot (-1), an expert shared by two tokens and two tokens.
"""

import pytest
import torch

from exl3_triton.errors import InvalidArgumentError
from exl3_triton.kernels import Codebook, Exl3ExpertStack
from exl3_triton.kernels.reference import exl3_moe_ref

from ..conftest import random_exl3_weight, rel_err

MATMUL_TOL = 2e-3

RING = dict(btk=1, num_warps=4, prefetch_steps=3, lane_major=True, early_load=True)  # tuning.ONE_ROW_LOOP's
# name: (MoeDecodeConfig fields, bits, codebook, in features, out features). Sizes are as small as each
# variant allows (the interpreter runs a ring program in ~1-2 CPU seconds); between them the cases cover
# 2, 3 and 4 bits, the three codebooks, one and two K slices and one and two column blocks. The previous
# loop alone is covered by test_triton_kernels.py's test_moe.
VARIANTS = {
    "lanes ring3 early": (RING, 4, Codebook.MCG, 128, 128),  # the dense one-row default's loop
    "ring1 btk4 late loads": (dict(btk=4, num_warps=4, prefetch_steps=1), 3, Codebook.THREE_INST, 128, 128),
    "lanes ring2 btk2": (dict(btk=2, num_warps=4, prefetch_steps=2, lane_major=True), 2, Codebook.MUL1, 128, 128),
    "lanes ring3 early cols2": (dict(RING, btk=2, col_blocks=2), 4, Codebook.MUL1, 128, 256),
    "ring1 rotation launch split2": (dict(btk=4, num_warps=4, prefetch_steps=1, rotate_in_kernel=False, split_k=2),
                                     2, Codebook.MCG, 256, 128),
    "previous loop cols2 rotation launch": (dict(btk=2, num_warps=8, col_blocks=2, rotate_in_kernel=False), 3,
                                            Codebook.MCG, 128, 256),
}


def _stack(e, k, n, bits, cb, device):
    return Exl3ExpertStack.from_weights([random_exl3_weight(k, n, bits, cb, seed=10 * i + int(bits), device=device)
                                         for i in range(e)], key="experts.down")


def _run(moe, x, stack, ids, rw, cfg):
    """The decode schedule into a NaN-poisoned output: a block no program writes fails the comparison."""
    t, top_k = ids.shape
    shape = (t, stack.out_features) if rw is not None else (t, top_k, stack.out_features)
    out = torch.full(shape, float("nan"), dtype=torch.float16, device=x.device)
    got = moe(x, stack, ids, rw, schedule="decode", decode=cfg, out=out)
    assert got.shape == shape
    return got


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_variant_matches_reference(triton_kernels, device, name):
    fields, bits, cb, k, n = VARIANTS[name]
    moe = triton_kernels.moe
    cfg = moe.MoeDecodeConfig(**fields)
    g = torch.Generator().manual_seed(3)
    stack = _stack(3, k, n, bits, cb, device)
    ids = torch.tensor([[1, 0], [0, -1]], device=device)  # 2 tokens, top-2: a shared expert and a skipped slot
    x_slot = torch.randn(2, 2, k, generator=g).to(device).half()  # down: one input per slot, weighted sum
    rw = torch.rand(2, 2, generator=g).to(device)
    comb = _run(moe.exl3_moe_triton, x_slot, stack, ids, rw, cfg)
    assert rel_err(comb, exl3_moe_ref(x_slot.float(), stack, ids, rw)) < MATMUL_TOL
    x_token = torch.randn(2, k, generator=g).to(device).half()  # gate/up: one input per token, per-slot outputs
    proj = _run(moe.exl3_moe_triton, x_token, stack, ids, None, cfg)
    assert rel_err(proj, exl3_moe_ref(x_token.float(), stack, ids)) < MATMUL_TOL
    assert torch.all(proj[1, 1] == 0)  # a skipped slot's output is zeros (the reference's convention)


def test_column_blocks_per_program_divide_the_blocks(triton_kernels):
    # col_blocks is capped to a divisor of the weight's column blocks (each program owns whole blocks)
    largest = triton_kernels.moe._largest_divisor
    assert [largest(20, 4), largest(8, 4), largest(3, 2), largest(1, 4), largest(16, 3)] == [4, 4, 1, 1, 2]


@pytest.mark.parametrize("cfg,option", [
    (dict(prefetch_steps=4), "got 4"),
    (dict(lane_major=True), "prefetch_steps"),
    (dict(prefetch_steps=3, early_load=True, rotate_in_kernel=False), "rotate_in_kernel"),
    (dict(btk=3), "btk"),
    (dict(col_blocks=0), "col_blocks"),
])
def test_decode_config_rejects_bad_options(triton_kernels, cfg, option):
    with pytest.raises(InvalidArgumentError, match=option):
        triton_kernels.moe.MoeDecodeConfig(**cfg)


def test_default_decode_config_comes_from_tuning(triton_kernels):
    from exl3_triton.kernels import tuning

    assert tuning.moe_decode_config(2560, 1024) == triton_kernels.moe.MoeDecodeConfig(**tuning.MOE_DECODE)


def test_few_slots_take_fewer_longer_k_slices(triton_kernels):
    """One token's experts (and its gate + up stack) aim for MOE_FEW_SLOTS_SPLIT K slices; more slots keep the
    programs-per-SM rule (split_k None)."""
    from exl3_triton.kernels import tuning

    few = tuning.moe_decode_config(2560, 1024, 8)
    stacked = tuning.moe_decode_config(2560, 1024, 16)
    many = tuning.moe_decode_config(2560, 1024, 32)
    assert few.split_k == stacked.split_k == tuning.MOE_FEW_SLOTS_SPLIT == 4
    assert many.split_k is None and many == triton_kernels.moe.MoeDecodeConfig(**tuning.MOE_DECODE)


def test_reference_members_read_each_part_of_the_stack(device):
    """``members=2`` (gate + up stacked): member m's slots use expert ``id + m * E``; -1 stays skipped. The oracle:
    the two halves of the stack applied separately."""
    g = torch.Generator().manual_seed(5)
    stack = _stack(4, 128, 128, 4, Codebook.MCG, device)
    halves = [Exl3ExpertStack(stack.trellis[i:i + 2], stack.suh[i:i + 2], stack.svh[i:i + 2], 4, Codebook.MCG,
                              key=f"half{i}") for i in (0, 2)]
    ids = torch.tensor([[1, -1], [0, 1]], device=device)
    x = torch.randn(2, 128, generator=g).to(device).half()
    both = exl3_moe_ref(x.float(), stack, ids, members=2)
    assert both.shape == (2, 4, 128)
    for m, half in enumerate(halves):
        assert torch.equal(both[:, 2 * m:2 * m + 2], exl3_moe_ref(x.float(), half, ids))
    with pytest.raises(ValueError, match="members"):
        exl3_moe_ref(x.float(), stack, ids, torch.ones(2, 2, device=device), members=2)


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("path", ["decode", "decode rotation launch", "grouped"])
def test_members_match_reference(triton_kernels, device, id_dtype, path):
    """The decode kernel derives each slot's expert from the token's ids itself (no stacked ids are built);
    the rotation-launch and grouped paths build them. int32 and int64 ids are read as they are."""
    moe = triton_kernels.moe
    g = torch.Generator().manual_seed(7)
    stack = _stack(4, 128, 128, 4, Codebook.MCG, device)
    ids = torch.tensor([[1, -1], [0, 1]], device=device, dtype=id_dtype)
    x = torch.randn(2, 128, generator=g).to(device).half()
    cfg = moe.MoeDecodeConfig(**(dict(RING, rotate_in_kernel=False, early_load=False)
                                 if path == "decode rotation launch" else RING))
    schedule = "grouped" if path == "grouped" else "decode"
    got = moe.exl3_moe_triton(x, stack, ids, schedule=schedule, decode=cfg, members=2)
    want = exl3_moe_ref(x.float(), stack, ids.long(), members=2)
    assert got.shape == want.shape == (2, 4, 128)
    assert rel_err(got, want) < MATMUL_TOL
    assert torch.all(got[0, 1] == 0) and torch.all(got[0, 3] == 0)  # the skipped slot, in both members


@pytest.mark.parametrize("schedule", ["decode", "grouped"])
def test_base_is_added_to_the_weighted_sum(triton_kernels, device, schedule):
    """``base`` (the shared expert's output) joins each token's weighted sum in the kernel; the oracle is the
    reference's sum plus base, computed here by hand from the per-slot outputs."""
    moe = triton_kernels.moe
    g = torch.Generator().manual_seed(11)
    stack = _stack(3, 128, 128, 4, Codebook.MCG, device)
    ids = torch.tensor([[1, 0], [0, -1]], device=device)
    x_slot = torch.randn(2, 2, 128, generator=g).to(device).half()
    rw = torch.rand(2, 2, generator=g).to(device)
    base = torch.randn(2, 128, generator=g).to(device).half()
    per_slot = torch.stack([exl3_moe_ref(x_slot[:, j:j + 1].float(), stack, ids[:, j:j + 1])[:, 0] for j in (0, 1)],
                           dim=1).float()
    want = (per_slot * rw[..., None]).sum(1) + base.float()
    assert rel_err(exl3_moe_ref(x_slot.float(), stack, ids, rw, base=base), want) < 1e-6
    got = moe.exl3_moe_triton(x_slot, stack, ids, rw, schedule=schedule, decode=moe.MoeDecodeConfig(**RING),
                              base=base)
    assert rel_err(got, want) < MATMUL_TOL
    with pytest.raises(ValueError, match="base"):
        moe.exl3_moe_triton(x_slot, stack, ids, rw, base=base[:1])
