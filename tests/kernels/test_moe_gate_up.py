"""Routed experts with gate and up as one MoE launch over 2E experts, against the reference backend."""

import pytest
import torch

from exl3_triton.arch.blocks.moe import RoutedExperts
from exl3_triton.kernels import Codebook
from exl3_triton.kernels.weights import Exl3ExpertStack
from exl3_triton.options import RuntimeOptions

from ..conftest import random_exl3_weight, rel_err


def _stacks(device, up_bits=4, experts=4, hidden=128, inter=256):
    def stack(name, k, n, bits, seed):
        return Exl3ExpertStack.from_weights(
            [random_exl3_weight(k, n, bits, Codebook.MCG, seed=seed + e, device=device) for e in range(experts)],
            key=name)
    return (stack("gate", hidden, inter, 4, 0), stack("up", hidden, inter, up_bits, 50),
            stack("down", inter, hidden, 4, 100))


def _experts(stacks, device, backend):
    return RoutedExperts(hidden_size=128, intermediate_size=256, activation="silu", stacks=stacks,
                         options=RuntimeOptions(device=device, backend=backend))


@pytest.mark.parametrize("tokens", [1, 2])
def test_gate_up_in_one_launch_matches_reference(device, tokens):
    stacks = _stacks(device)
    fused, ref = _experts(stacks, device, "triton"), _experts(stacks, device, "reference")
    assert fused.gate_up is not None and fused.gate_up.num_experts == 8 and ref.gate_up is None
    g = torch.Generator().manual_seed(tokens)
    x = (torch.randn(tokens, 128, generator=g) * 100).half().to(device)  # outputs well inside fp16's normal range
    ids = torch.randint(0, 4, (tokens, 2), generator=g)
    ids[0, 1] = -1  # an unused slot stays unused in the up half too
    w = torch.rand(tokens, 2, generator=g)
    ids, w = ids.to(device), w.to(device)
    assert rel_err(fused(x, ids, w), ref(x, ids, w)) < 2e-3


def test_gate_and_up_of_different_formats_stay_apart(device):
    assert _experts(_stacks(device, up_bits=3), device, "triton").gate_up is None
