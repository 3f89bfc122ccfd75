"""The sigmoid + bias router's selection kernel against ``SigmoidBiasRouter``'s PyTorch path."""

import pytest
import torch

from exl3_triton.arch.blocks.routing import SigmoidBiasRouter


@pytest.mark.parametrize("experts,top_k,bias,normalise", [(256, 8, True, True), (60, 4, False, True),
                                                         (16, 3, True, False)])
def test_selection_matches_the_router(triton_kernels, device, experts, top_k, bias, normalise):
    g = torch.Generator().manual_seed(experts)
    gate = torch.randn(experts, 64, generator=g) * 0.3
    b = torch.randn(experts, generator=g) * 0.1 if bias else None
    router = SigmoidBiasRouter(gate, b, top_k, scaling=2.5, normalise=normalise)
    x = torch.randn(5, 64, generator=g)
    want_ids, want_w = router(x)  # on the CPU: the PyTorch path
    logits = torch.nn.functional.linear(x.float(), router.gate).to(device)
    ids, w = triton_kernels.router.sigmoid_topk_triton(logits, None if b is None else router.bias.to(device),
                                                       top_k, 2.5, normalise)
    assert torch.equal(ids.cpu(), want_ids)  # same experts, in the same (descending) order
    torch.testing.assert_close(w.cpu(), want_w, rtol=1e-6, atol=1e-7)


def test_ties_pick_the_lowest_index(triton_kernels, device):
    logits = torch.zeros(1, 8, device=device)
    logits[0, 5] = 1.0
    ids, w = triton_kernels.router.sigmoid_topk_triton(logits, None, 3, 1.0, True)
    assert ids.tolist() == [[5, 0, 1]]
    torch.testing.assert_close(w.sum().cpu(), torch.tensor(1.0))


def test_bad_input_is_named(triton_kernels, device):
    with pytest.raises(ValueError, match="top_k"):
        triton_kernels.router.sigmoid_topk_triton(torch.zeros(1, 8, device=device), None, 9, 1.0, True)
    with pytest.raises(ValueError, match="bias"):
        triton_kernels.router.sigmoid_topk_triton(torch.zeros(1, 8, device=device), torch.zeros(7, device=device),
                                                  2, 1.0, True)
