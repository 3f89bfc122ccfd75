"""The lightning indexer's query kernel (kernels/triton_rope.py ``leading_rope_triton``) against its
PyTorch path (``lightning_indexer.queries_reference``, what the golden OpenPanguV2 tests run on a
CPU) and the NEOX rotation written out by hand."""

import pytest
import torch

from exl3_triton.arch.blocks.lightning_indexer import queries_reference
from exl3_triton.arch.blocks.rope import RopeConfig, RotaryEmbedding, fold_sin, inverse_frequencies

HEADS, D, ROPE = 3, 16, 8


def _by_hand(q, cos, sin):
    """Pairs (i, i + ROPE/2) of each head's leading ROPE dims rotated by the plain (unfolded) sin."""
    q = q.double().view(q.shape[0], HEADS, D).clone()
    half = ROPE // 2
    c, s = cos.double()[:, None, :half], sin.double()[:, None, :half]
    a, b = q[..., :half].clone(), q[..., half:ROPE].clone()
    q[..., :half], q[..., half:ROPE] = a * c - b * s, b * c + a * s
    return q


@pytest.mark.parametrize("with_weights", [True, False])
def test_leading_rope_kernel_matches_the_indexer_queries(triton_kernels, device, with_weights):
    g = torch.Generator().manual_seed(3)
    positions = torch.tensor([0, 5, 77, 1000])
    q = (2 * torch.randn(4, HEADS * D + 8, generator=g)).half()[:, :HEADS * D]  # strided rows
    w = torch.randn(4, 5, generator=g).half()
    cos, sin = RotaryEmbedding(inverse_frequencies(RopeConfig(theta=1000.0), ROPE))(positions)
    want_q, want_w = queries_reference(q, w, cos, fold_sin(sin), HEADS)
    assert torch.allclose(want_q.double(), _by_hand(q, cos, sin), rtol=1e-5, atol=1e-5)
    got_q, got_w = triton_kernels.rope.leading_rope_triton(q.to(device), w.to(device) if with_weights else None,
                                                           cos.to(device), fold_sin(sin).to(device), HEADS)
    assert got_q.dtype == torch.float32 and got_q.shape == (4, HEADS, D)
    assert torch.allclose(got_q.cpu(), want_q, rtol=1e-6, atol=1e-6)
    if with_weights:
        assert torch.equal(got_w.cpu(), want_w)
    else:
        assert got_w is None


def test_leading_rope_kernel_rejects_a_rope_wider_than_a_head(triton_kernels, device):
    cos = torch.ones(2, 2 * D, device=device)
    with pytest.raises(ValueError, match="cos and sin"):
        triton_kernels.rope.leading_rope_triton(torch.zeros(2, HEADS * D, device=device), None, cos, cos, HEADS)
