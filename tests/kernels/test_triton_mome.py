"""The fused MoME decode kernel (kernels/triton_mome.py) against the PyTorch decode path
(``short_conv.mome_decode_reference``, what the golden OpenPanguV2 tests run on a CPU) and a
plain per-row loop of the convolution's definition."""

import pytest
import torch

from exl3_triton.arch.blocks.short_conv import mome_decode_reference


def _by_definition(ring, weight, seq_slots, positions):
    """``x + sum_k w[k] * x[pos - K + 1 + k]`` per row, the sum only from position K-1 on."""
    k, out = weight.shape[0], []
    for slot, pos in zip(seq_slots.tolist(), positions.tolist()):
        window = torch.stack([ring[slot, (pos - k + 1 + j) % ring.shape[1]].double() for j in range(k)])
        term = (window * weight.double()).sum(0) if pos >= k - 1 else torch.zeros(ring.shape[-1])
        out.append(window[-1] + term)
    return torch.stack(out)


@pytest.mark.parametrize("dtype,channels", [(torch.float32, 40), (torch.float16, 300)])
def test_fused_mome_decode_stores_the_inputs_and_matches_the_reference(triton_kernels, device, dtype, channels):
    g = torch.Generator().manual_seed(channels)
    ring = torch.randn(3, 32, channels, generator=g).to(dtype)
    weight = 0.3 * torch.randn(3, channels, generator=g)
    # the sequence start (positions 0-2: conv term off, then on), ring wrap-around (32, 33), and
    # consecutive positions of one sequence as rows of one step (slot 2, rows out of order: each row
    # must see the inputs of the rows before it in the sequence, not the ring's stale entries)
    seq_slots = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    positions = torch.tensor([0, 1, 2, 32, 31, 33, 70])
    # inputs as a strided view (MLA's latent is the left part of a wider projection), in fp32: the
    # ring's rounding applies to each stored and each window value alike
    x = (2 * torch.randn(7, channels + 5, generator=g))[:, :channels]
    want_ring = ring.clone()
    want = mome_decode_reference(want_ring, weight, seq_slots, positions, x, dtype)
    assert want.dtype == dtype
    # by definition: the inputs stored first, then each row's window
    stored = ring.clone()
    stored[seq_slots, positions % 32] = x.to(dtype)
    assert torch.equal(want_ring, stored)
    exact = _by_definition(stored, weight, seq_slots, positions)
    assert torch.allclose(want.double(), exact, rtol=2e-3 if dtype == torch.float16 else 1e-6, atol=1e-5)
    got_ring = ring.to(device)
    got = triton_kernels.mome.mome_decode_triton(got_ring, weight.to(device), seq_slots.to(device),
                                                 positions.to(device), x.to(device), dtype).cpu()
    assert torch.equal(got_ring.cpu(), stored)
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    else:  # one fp16 rounding step apart at most
        assert torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("weighted", [True, False])
def test_fused_mome_decode_with_the_norm_after_it(triton_kernels, device, weighted):
    """MLA's q latent: ``q_a_norm(x + conv(x))`` in the same kernel, whole rows of a width that is not a
    power of two, rows of one sequence in one step, against the PyTorch path (conv, then the norm)."""
    from exl3_triton.arch.blocks.norm import RMSNorm

    g = torch.Generator().manual_seed(11)
    channels = 200
    ring = torch.randn(2, 32, channels, generator=g).half()
    weight = 0.3 * torch.randn(3, channels, generator=g)
    seq_slots, positions = torch.tensor([0, 1, 1]), torch.tensor([1, 9, 8])
    x = (5 * torch.randn(3, channels, generator=g)).half()
    norm = RMSNorm(torch.rand(channels, generator=g) + 0.5 if weighted else None, 1e-6)
    want_ring = ring.clone()
    want = mome_decode_reference(want_ring, weight, seq_slots, positions, x, torch.float16, norm)
    assert torch.equal(want, norm(mome_decode_reference(ring.clone(), weight, seq_slots, positions, x,
                                                        torch.float16)))
    got_ring = ring.to(device)
    got = triton_kernels.mome.mome_decode_triton(got_ring, weight.to(device), seq_slots.to(device),
                                                 positions.to(device), x.to(device), torch.float16,
                                                 norm.to(device)).cpu()
    assert torch.equal(got_ring.cpu(), want_ring)
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), want.float(), rtol=2e-3, atol=2e-3)


def test_fused_mome_decode_rejects_a_non_fp32_weight(triton_kernels, device):
    ring = torch.zeros(1, 32, 8, device=device)
    one = torch.zeros(1, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="fp32"):
        triton_kernels.mome.mome_decode_triton(ring, torch.zeros(3, 8, dtype=torch.float16, device=device),
                                               one, one, torch.zeros(1, 8, device=device), torch.float32)


def test_openpangu_decode_with_the_fused_decode_kernels_matches_the_golden_logits(triton_kernels, golden,
                                                                                   monkeypatch):
    """MLA's decode path with the MoME kernel, the key-side kernel (kernels/triton_mla_keys.py), the
    indexer's query kernel and the RMSNorm kernel in place of their PyTorch paths (as on a GPU), past
    the window and the indexer's top-k: the golden reference's logits (read golden/openpangu/A)."""
    import exl3_triton
    from exl3_triton.arch.blocks import lightning_indexer, mla, norm
    from safetensors.torch import load_file

    from ..runtime_helpers import cached_logits

    model = exl3_triton.load(golden / "openpangu" / "A")
    ref = load_file(str(golden / "openpangu" / "A" / "golden.safetensors"))
    calls = {"mome": 0, "keys": 0, "queries": 0}

    def counted(name, fn):
        def run(*args):
            calls[name] += 1
            return fn(*args)
        return lambda x: run

    monkeypatch.setattr(mla, "_fused_mome", counted("mome", triton_kernels.mome.mome_decode_triton))
    monkeypatch.setattr(mla, "_fused_store_keys", counted("keys", triton_kernels.mla_keys.mla_store_keys_triton))
    monkeypatch.setattr(lightning_indexer, "_fused_leading_rope",
                        counted("queries", triton_kernels.rope.leading_rope_triton))
    monkeypatch.setattr(norm, "_fused_rms_norm_cast_for", lambda x: triton_kernels.norm.rms_norm_cast_triton)
    ids = ref["ids"][:60].tolist()
    step = cached_logits(model, ids, chunks=[20], page_size=16)
    assert all(calls.values())  # the decode steps went through the kernels
    want = ref["logits"][:60].double()
    assert ((step.double() - want).norm(dim=-1) / want.norm(dim=-1)).max() < 1e-4
    assert torch.equal(step.argmax(-1), ref["logits"][:60].argmax(-1))


def test_short_conv_multiplies_in_fp32_whatever_the_checkpoint_stores():
    """A half-precision conv weight and half-precision inputs: the products and their sum stay fp32
    (Huawei's reference casts up), only the output is rounded to the input's dtype."""
    from exl3_triton.arch.blocks.short_conv import ShortConv

    g = torch.Generator().manual_seed(3)
    weight = (0.3 * torch.randn(64, 1, 3, generator=g)).half()
    windows = (10 * torch.randn(5, 3, 64, generator=g)).half()
    got = ShortConv(weight)(windows, torch.arange(5))
    # the reference's own order of operations, transcribed: cast up, multiply, sum, add, round
    term = (windows.float() * weight[:, 0, :].t().float()).sum(1)
    term[:2] = 0  # positions 0 and 1: the start-of-sequence rule
    want = (windows[:, -1].float() + term).half()
    assert got.dtype == torch.float16
    assert torch.equal(got, want)
