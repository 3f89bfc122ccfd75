"""Fused rotary embedding + cache write against the reference."""

import pytest
import torch

from exl3_triton.kernels.reference import rope_store_kv_ref

from ..conftest import rel_err


@pytest.mark.parametrize("hq,hkv,d,dv", [(4, 2, 64, 64), (6, 1, 32, 16)])
def test_rope_store_kv(triton_kernels, device, hq, hkv, d, dv):
    t, pages, page = 5, 4, 8
    g = torch.Generator().manual_seed(hq)
    qkv = torch.randn(t, (hq + hkv) * d + hkv * dv, generator=g).to(device)  # strided views, like a fused proj
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(t, hkv, dv)
    pos = torch.tensor([0, 7, 100, 3, 4096], device=device)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    slots = torch.tensor([3, 9, 30, 12, 0], device=device)
    caches = [(torch.zeros(pages, page, hkv, d, device=device), torch.zeros(pages, page, hkv, dv, device=device))
              for _ in range(2)]
    want = rope_store_kv_ref(q.clone(), k, v, pos, inv, slots, *caches[0], scaling=0.9)
    got = triton_kernels.rope.rope_store_kv_triton(q.clone(), k, v, pos, inv, slots, *caches[1], scaling=0.9)
    assert rel_err(got, want) < 1e-5
    assert rel_err(caches[1][0], caches[0][0]) < 1e-5 and torch.equal(caches[1][1], caches[0][1])
