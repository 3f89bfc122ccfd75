"""The MLA decode key-side kernel (kernels/triton_mla_keys.py) against the PyTorch decode path it
replaces (``mla.store_keys_reference``, what the golden OpenPanguV2 tests run on a CPU): the
latent after its MoME conv and norm, the rotated k_pe and the indexer key, stored at ``dest``."""

import pytest
import torch

from exl3_triton.arch.blocks.lightning_indexer import LightningIndexer
from exl3_triton.arch.blocks.mla import store_keys_reference
from exl3_triton.arch.blocks.norm import RMSNorm
from exl3_triton.arch.blocks.rope import RotaryEmbedding, fold_sin, inverse_frequencies, RopeConfig

RANK, ROPE, IDX = 40, 8, 16  # a latent width that is not a power of two


def _case(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # rows: a sequence start (conv term off), two consecutive positions of one sequence in one step
    # (out of order), a ring wrap-around, and a row whose entry is not stored (dest -1)
    seq_slots = torch.tensor([0, 1, 1, 2, 0])
    positions = torch.tensor([1, 41, 40, 33, 7])
    dest = torch.tensor([3, 9, 8, 12, -1])
    kv = (3 * torch.randn(5, RANK + ROPE + 6, generator=g)).to(dtype)[:, :RANK + ROPE]  # strided rows
    ring = torch.randn(3, 32, RANK, generator=g).to(dtype)
    weight = 0.3 * torch.randn(3, RANK, generator=g)
    norm = RMSNorm(torch.rand(RANK, generator=g) + 0.5, 1e-6)
    k_idx = (2 * torch.randn(5, IDX, generator=g)).to(dtype)
    indexer = LightningIndexer(None, None, RMSNorm(torch.rand(IDX, generator=g) + 0.5, 1e-6), None, num_heads=2,
                               head_dim=IDX, top_k=4)
    cos, sin = RotaryEmbedding(inverse_frequencies(RopeConfig(theta=100.0), ROPE))(positions)
    caches = [torch.zeros(16, w, dtype=dtype) for w in (RANK, ROPE, IDX)]
    return seq_slots, positions, dest, kv, ring, weight, norm, k_idx, indexer, cos, fold_sin(sin), caches


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("with_conv,with_index", [(True, True), (True, False), (False, False)])
def test_mla_store_keys_kernel_matches_the_pytorch_decode_path(triton_kernels, device, dtype, with_conv, with_index):
    seq_slots, positions, dest, kv, ring, weight, norm, k_idx, indexer, cos, sin, caches = _case(dtype, 5)

    def run(store, on, dest):
        rings, cache = ring.clone().to(on), [c.clone().to(on) for c in caches]
        conv = (rings, weight.to(on), seq_slots.to(on)) if with_conv else None
        index = (k_idx.to(on), indexer.to(on), cache[2]) if with_index else None
        store(kv.to(on), RANK, conv, norm.to(on), positions.to(on), cos.to(on), sin.to(on), dest.to(on),
              cache[0], cache[1], index)
        return rings.cpu(), [c.cpu() for c in cache]

    # the PyTorch path stores every row (a decode step's rows all have a cache row): row 4 goes to the
    # scratch row 15 there, which the kernel must leave alone
    want_ring, want = run(store_keys_reference, "cpu", torch.where(dest < 0, 15, dest))
    got_ring, got = run(triton_kernels.mla_keys.mla_store_keys_triton, device, dest)
    assert torch.equal(got_ring, want_ring)  # the latent's inputs, stored exactly
    written = torch.zeros(16, dtype=torch.bool)
    written[dest[dest >= 0]] = True
    assert (want[0][written].abs().sum(-1) > 0).all()
    tol = 2e-3 if dtype == torch.float16 else 2e-5  # an fp16 rounding apart at most
    for name, g_, w_ in zip(("latent", "k_pe", "indexer key"), got, want):
        if name == "indexer key" and not with_index:
            assert not g_.any()
            continue
        assert not g_[~written].any(), name  # row 4 (dest -1) wrote nothing
        assert torch.allclose(g_[written].float(), w_[written].float(), rtol=tol, atol=tol), name


def test_mla_store_keys_kernel_rejects_a_bad_cache(triton_kernels, device):
    seq_slots, positions, dest, kv, ring, weight, norm, k_idx, indexer, cos, sin, caches = _case(torch.float32, 1)
    with pytest.raises(ValueError, match="k_pe cache"):
        triton_kernels.mla_keys.mla_store_keys_triton(kv.to(device), RANK, None, norm.to(device),
                                                      positions.to(device), cos.to(device), sin.to(device),
                                                      dest.to(device), caches[0].to(device),
                                                      torch.zeros(16, ROPE + 1, device=device))
