"""Paged attention: the Triton decode kernel and the gather reference against dense attention."""

import pytest
import torch

from exl3_triton.kernels.reference import attention_ref, paged_attention_ref

from ..conftest import rel_err


def _paged(kv_lens, page, hkv, d, dv, seed=0):
    """Random per-sequence K/V scattered into shuffled pages, plus the dense copies."""
    g = torch.Generator().manual_seed(seed)
    pages_needed = [-(-n // page) for n in kv_lens]
    total = sum(pages_needed) + 2
    order = torch.randperm(total, generator=g).tolist()
    k_cache = torch.randn(total, page, hkv, d, generator=g)
    v_cache = torch.randn(total, page, hkv, dv, generator=g)
    table = torch.full((len(kv_lens), max(pages_needed)), -1, dtype=torch.int32)
    dense = []
    for b, n in enumerate(kv_lens):
        ids = [order.pop() for _ in range(pages_needed[b])]
        table[b, :len(ids)] = torch.tensor(ids)
        k = k_cache[ids].reshape(-1, hkv, d)[:n]
        v = v_cache[ids].reshape(-1, hkv, dv)[:n]
        dense.append((k, v))
    return k_cache, v_cache, table, dense


@pytest.mark.parametrize("window", [None, 5])
def test_paged_reference_matches_dense(window):
    kv_lens, q_lens = [7, 19, 1], [3, 19, 1]
    k_cache, v_cache, table, dense = _paged(kv_lens, 4, 2, 8, 8)
    q = torch.randn(sum(q_lens), 6, 8)
    cu = [0, 3, 22, 23]
    pos = torch.cat([torch.arange(n - ql, n) for n, ql in zip(kv_lens, q_lens)])
    got = paged_attention_ref(q, k_cache, v_cache, page_table=table, cu_q=cu, kv_lens=kv_lens, q_positions=pos,
                              scale=0.3, window=window)
    for b, (k, v) in enumerate(dense):
        qb = q[cu[b]:cu[b + 1]].transpose(0, 1)[None]
        want = attention_ref(qb, k.transpose(0, 1)[None], v.transpose(0, 1)[None], pos[cu[b]:cu[b + 1]][None],
                             torch.arange(kv_lens[b])[None], scale=0.3, window=window)[0].transpose(0, 1)
        torch.testing.assert_close(got[cu[b]:cu[b + 1]], want)


@pytest.mark.parametrize("hq,hkv,window", [(4, 2, None), (8, 1, None), (6, 3, 9), (32, 2, None)])
def test_triton_paged_decode(triton_kernels, device, hq, hkv, window):
    kv_lens = [1, 37, 130, 64]
    k_cache, v_cache, table, _ = _paged(kv_lens, 16, hkv, 32, 16, seed=hq)
    k_cache, v_cache, table = k_cache.to(device), v_cache.to(device), table.to(device)
    q = torch.randn(len(kv_lens), hq, 32, device=device)
    lens_t = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    got = triton_kernels.attention.paged_decode_attention(q, k_cache, v_cache, page_table=table, kv_lens=lens_t,
                                                          scale=0.2, window=window)
    want = paged_attention_ref(q, k_cache, v_cache, page_table=table, cu_q=list(range(len(kv_lens) + 1)),
                               kv_lens=kv_lens, q_positions=torch.tensor(kv_lens, device=device) - 1,
                               scale=0.2, window=window)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("splits,window", [(4, None), (8, 40), (2, 5)])
def test_triton_paged_decode_split_keys(triton_kernels, device, splits, window):
    """Key ranges split over programs and combined (FlashDecoding), including splits left empty
    (short sequences, narrow windows) and a window that starts inside a split."""
    kv_lens = [1, 37, 130, 300]
    k_cache, v_cache, table, _ = _paged(kv_lens, 16, 2, 32, 16, seed=splits)
    k_cache, v_cache, table = k_cache.to(device), v_cache.to(device), table.to(device)
    q = torch.randn(len(kv_lens), 8, 32, device=device)
    lens_t = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    got = triton_kernels.attention.paged_decode_attention(q, k_cache, v_cache, page_table=table, kv_lens=lens_t,
                                                          scale=0.2, window=window, splits=splits)
    want = paged_attention_ref(q, k_cache, v_cache, page_table=table, cu_q=list(range(len(kv_lens) + 1)),
                               kv_lens=kv_lens, q_positions=torch.tensor(kv_lens, device=device) - 1,
                               scale=0.2, window=window)
    assert rel_err(got, want) < 1e-5


def test_key_splits_rule(triton_kernels):
    key_splits = triton_kernels.attention.key_splits
    assert key_splits(512, 8, 132) == 1  # short capacity: one program per head
    assert key_splits(32768, 8, 132) == 32  # batch 1, 8 KV heads: ~2 programs per SM
    assert key_splits(32768, 512, 132) == 1  # many sequences already fill the GPU
    assert key_splits(2048, 8, 132) == 4  # never shorter than KEYS_PER_SPLIT keys


@pytest.mark.parametrize("window", [None, 7])
def test_sdpa_core_matches_reference(window):
    """The fused prefill core used on CUDA (run here on the CPU) against the fp32 reference."""
    from exl3_triton.kernels.torch_attention import attention_sdpa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 20, 32, generator=g)
    k, v = torch.randn(2, 2, 50, 32, generator=g), torch.randn(2, 2, 50, 16, generator=g)
    q_pos, k_pos = torch.arange(30, 50).expand(2, 20), torch.arange(50).expand(2, 50)
    got = attention_sdpa(q, k, v, q_pos, k_pos, scale=0.3, window=window)
    torch.testing.assert_close(got, attention_ref(q, k, v, q_pos, k_pos, scale=0.3, window=window),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [256, 512])
def test_triton_paged_decode_over_a_ring(triton_kernels, device, d):
    """Gemma 4's sliding layers: a ring of 2 pages per sequence reached through a page table that
    repeats them (logical page j -> ring page j % 2), window = ring size, wide heads."""
    page, ring, window = 16, 2, 32
    kv_lens = [5, 32, 77, 100]
    g = torch.Generator().manual_seed(d)
    k_ring = torch.randn(len(kv_lens) * ring, page, 1, d, generator=g).to(device)
    v_ring = torch.randn(len(kv_lens) * ring, page, 1, d, generator=g).to(device)
    width = -(-max(kv_lens) // page)
    table = (torch.arange(len(kv_lens))[:, None] * ring + torch.arange(width)[None] % ring).int().to(device)
    q = torch.randn(len(kv_lens), 4, d, generator=g).to(device)
    lens_t = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    got = triton_kernels.attention.paged_decode_attention(q, k_ring, v_ring, page_table=table, kv_lens=lens_t,
                                                          scale=d**-0.5, window=window)
    for b, n in enumerate(kv_lens):  # the window's keys, read from the ring by position
        p = torch.arange(max(0, n - window), n)
        rows = (b * ring + (p // page) % ring) * page + p % page
        k = k_ring.view(-1, 1, d)[rows.to(device)]
        v = v_ring.view(-1, 1, d)[rows.to(device)]
        want = attention_ref(q[b][None, :, None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                             torch.tensor([[n - 1]], device=device), p[None].to(device), scale=d**-0.5)
        assert rel_err(got[b], want[0, :, 0]) < 1e-5
