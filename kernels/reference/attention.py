"""Reference scaled-dot-product attention with position-based masks (fp32).

Masks come from token positions rather than from array indices so that one
function serves a full forward, a prefill chunk against cached keys, and a
single decode step:

    key j is visible to query i  iff  k_pos[j] <= q_pos[i]
                                  and (no window or q_pos[i] - k_pos[j] < window)
                                  and k_pos[j] >= 0   (negative = empty slot)
"""

from __future__ import annotations

import torch


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean ``[B, Tq, Tk]`` mask (True = attend) from ``q_pos [B, Tq]`` and ``k_pos [B, Tk]``."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= (q - k) < window
    return mask


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal GQA attention.

    q: ``[B, Hq, Tq, D]``; k: ``[B, Hkv, Tk, D]``; v: ``[B, Hkv, Tk, Dv]``, with
    ``Hq`` a multiple of ``Hkv``. Returns ``[B, Hq, Tq, Dv]`` in q's dtype.
    A query that sees no key (cannot happen for causal self-attention) gets zeros.
    """
    b, hq, tq, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    qf = q.float().reshape(b, hkv, group * tq, q.shape[-1])
    scores = (qf @ k.float().transpose(-1, -2)).reshape(b, hkv, group, tq, k.shape[2]) * scale
    mask = attention_mask(q_pos, k_pos, window)[:, None, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = probs.reshape(b, hkv, group * tq, k.shape[2]) @ v.float()
    return out.reshape(b, hq, tq, v.shape[-1]).to(q.dtype)


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` entries of a sequence from paged storage ``[P, S, ...]`` -> ``[length, ...]``."""
    return cache[pages].reshape(-1, *cache.shape[2:])[:length]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    page_table: torch.Tensor,
    cu_q: list[int],
    kv_lens: list[int],
    q_positions: torch.Tensor,
    scale: float,
    window: int | None = None,
    attend=attention_ref,
) -> torch.Tensor:
    """Attention of packed queries over each sequence's cached keys/values.

    q: ``[T, Hq, D]`` (sequence b owns rows ``cu_q[b]:cu_q[b+1]``); caches
    ``[pages, page_size, Hkv, D]``; key j of sequence b sits at position j.
    Returns ``[T, Hq, Dv]`` in q's dtype. ``attend``: the attention core
    (``attention_ref``'s signature), swapped for a fused one on GPUs.
    """
    out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=q.dtype, device=q.device)
    page_size = k_cache.shape[1]
    for b, kv_len in enumerate(kv_lens):
        lo, hi = cu_q[b], cu_q[b + 1]
        if hi == lo:
            continue
        pages = page_table[b, : -(-kv_len // page_size)].long()
        k = gather_pages(k_cache, pages, kv_len)  # [L, Hkv, D]
        v = gather_pages(v_cache, pages, kv_len)
        k_pos = torch.arange(kv_len, device=q.device)[None]
        res = attend(q[lo:hi].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                            q_positions[lo:hi][None], k_pos, scale=scale, window=window)
        out[lo:hi] = res[0].transpose(0, 1)
    return out


def ring_prefill_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ring: torch.Tensor,
    v_ring: torch.Tensor,
    *,
    ring_page_table: torch.Tensor,
    ring_slot_mapping: torch.Tensor,
    cu_q: list[int],
    kv_lens: list[int],
    q_positions: torch.Tensor,
    scale: float,
    window: int,
    attend=attention_ref,
) -> torch.Tensor:
    """Sliding-window attention of new tokens over a ring cache, then the ring update.

    q ``[T, Hq, D]``, k ``[T, Hkv, D]`` (both already rotated), v ``[T, Hkv, Dv]``:
    the new tokens of each sequence (rows ``cu_q[b]:cu_q[b+1]``, the last ones of
    its ``kv_lens[b]``). The rings ``[pages, page_size, Hkv, D]`` hold each
    sequence's earlier tokens; position p sits on ring page
    ``ring_page_table[b, p // page_size]``.

    Unlike a paged layer, the new keys cannot be written first and read back:
    in a chunk longer than the ring's spare room, later tokens overwrite entries
    that earlier tokens of the same chunk still need. So each sequence's
    history (at most ``window - 1`` tokens) is read out before anything is
    written, attention runs over history + new keys, and only then are the new
    rows with ``ring_slot_mapping >= 0`` written.
    """
    page = k_ring.shape[1]
    k_flat = k_ring.view(-1, *k_ring.shape[2:])
    v_flat = v_ring.view(-1, *v_ring.shape[2:])
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    for b, kv_len in enumerate(kv_lens):
        lo, hi = cu_q[b], cu_q[b + 1]
        if hi == lo:
            continue
        start = kv_len - (hi - lo)
        first = max(0, start - window + 1)
        hist = torch.arange(first, start, device=q.device)
        rows = ring_page_table[b, hist // page].long() * page + hist % page
        keys = torch.cat([k_flat[rows].to(k.dtype), k[lo:hi]])
        values = torch.cat([v_flat[rows].to(v.dtype), v[lo:hi]])
        k_pos = torch.arange(first, kv_len, device=q.device)[None]
        res = attend(q[lo:hi].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                            values.transpose(0, 1)[None], q_positions[lo:hi][None], k_pos,
                            scale=scale, window=window)
        out[lo:hi] = res[0].transpose(0, 1)
    keep = ring_slot_mapping >= 0
    k_flat[ring_slot_mapping[keep]] = k[keep].to(k_flat.dtype)
    v_flat[ring_slot_mapping[keep]] = v[keep].to(v_flat.dtype)
    return out
