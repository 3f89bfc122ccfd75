"""Fused rotary embedding + cache write against the reference."""

import pytest
import torch

from exl3_triton.kernels.reference import rope_store_kv_ref

from ..conftest import rel_err


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("hq,hkv,d,dv", [(4, 2, 64, 64), (6, 1, 32, 16)])
def test_rope_store_kv(triton_kernels, device, monkeypatch, hq, hkv, d, dv, per_head):
    """Both grids: one program per (token, head) for a few tokens (decode), one per token past that."""
    monkeypatch.setattr(triton_kernels.rope, "PER_HEAD_MAX_TOKENS", 64 if per_head else 0)
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


@pytest.mark.parametrize("k_eq_v,v_weight,hq,hkv,d", [(True, False, 4, 1, 64), (False, True, 4, 2, 32),
                                                      (False, False, 3, 3, 16)])
def test_norm_rope_store_kv(triton_kernels, device, k_eq_v, v_weight, hq, hkv, d):
    """Per-head norms + RoPE + cache store in one kernel against the norms as modules compute them
    (fp32, rounded to fp16) followed by the reference rotation; with ``k_eq_v`` the values are the
    raw keys (Gemma 4 full layers), normed without a weight."""
    from exl3_triton.kernels.reference import HeadNorms, norm_rope_store_kv_ref

    t, pages, page = 4, 3, 8
    g = torch.Generator().manual_seed(d)
    qkv = (30 * torch.randn(t, (hq + 2 * hkv) * d, generator=g)).half()
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    v = k if k_eq_v else qkv[:, (hq + hkv) * d:].view(t, hkv, d)
    norms = HeadNorms(eps=1e-6, q=True, k=True, v=True, q_weight=torch.rand(d, generator=g) + 0.5,
                      k_weight=torch.rand(d, generator=g) + 0.5,
                      v_weight=torch.rand(d, generator=g) + 0.5 if v_weight else None)
    pos = torch.tensor([0, 5, 700, 4095])
    # a proportional-RoPE-like table: the last quarter of the frequencies is zero (pass-through pairs)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    inv[3 * d // 8:] = 0
    slots = torch.tensor([2, 9, 23, 0])
    caches = [(torch.zeros(pages, page, hkv, d, dtype=torch.float16),
               torch.zeros(pages, page, hkv, d, dtype=torch.float16)) for _ in range(2)]
    q_before = q.clone()
    want = norm_rope_store_kv_ref(q, k, v, pos, inv, slots, *caches[0], norms, scaling=1.0)

    def dev(x):
        return None if x is None else x.to(device)

    dev_norms = HeadNorms(eps=norms.eps, q=True, k=True, v=True, q_weight=dev(norms.q_weight),
                          k_weight=dev(norms.k_weight), v_weight=dev(norms.v_weight))
    k_dev = dev(k)
    cache_dev = [dev(c) for c in caches[1]]
    got = triton_kernels.rope.norm_rope_store_kv_triton(dev(q), k_dev, k_dev if k_eq_v else dev(v), dev(pos),
                                                        dev(inv), dev(slots), *cache_dev, dev_norms)
    assert torch.equal(q, q_before)  # the raw projection is only read
    # normed values are O(1): one fp16 rounding of the fused result apart from the reference's two
    for a, b in ((got, want), (cache_dev[0], caches[0][0]), (cache_dev[1], caches[0][1])):
        assert a.dtype == torch.float16
        assert torch.allclose(a.cpu().float(), b.float(), rtol=4e-3, atol=4e-3)
    # the unrotated pairs hold the normed values themselves: q / rms(q) * w
    qn = q.double() / q.double().pow(2).mean(-1, keepdim=True).sqrt() * norms.q_weight.double()
    half, rot = d // 2, 3 * d // 8
    tail = torch.cat([torch.arange(rot, half), torch.arange(half + rot, d)])
    assert torch.allclose(got.cpu().double()[..., tail], qn[..., tail], rtol=1e-3, atol=1e-3)
