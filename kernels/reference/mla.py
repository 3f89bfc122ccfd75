"""PyTorch definitions of the MLA decode kernels (``kernels/triton_mla.py``), one row at a time.

Written from the definitions (architectures.md §0.3 absorbed attention, §0.5 lightning
indexer), not from the kernels: each row gathers exactly the keys it sees through its page
table and runs a plain softmax. Host loops and ``int()`` reads: for tests, not for a decode step.
"""

from __future__ import annotations

import torch


def _visible(pos: int, window: int | None) -> torch.Tensor:
    lo = 0 if window is None else max(0, pos - window + 1)
    return torch.arange(lo, pos + 1)


def _cache_rows(table_row: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    return table_row[positions // page_size].long() * page_size + positions % page_size


def mla_decode_reference(q_abs, q_pe, sink_c, sink_pe, c, kpe, table, positions, *, scale: float,
                         window: int | None = None, selected: torch.Tensor | None = None) -> torch.Tensor:
    """``triton_mla.mla_decode_triton``'s result ``[n, H, R]`` fp32: per row, softmax over the sinks
    and its visible positions (or, with more candidates than ``selected`` has columns, the selected
    positions) of ``(q_abs . c + q_pe . kpe) * scale``, times ``c``."""
    page_size = c.shape[1]
    flat_c, flat_pe = c.flatten(0, 1).float(), kpe.flatten(0, 1).float()
    out = []
    for i in range(q_abs.shape[0]):
        seen = _visible(int(positions[i]), window)
        if selected is not None and seen.numel() > selected.shape[1]:
            seen = selected[i].long().cpu()
        rows = _cache_rows(table[i].cpu(), seen, page_size).to(c.device)
        keys_c = torch.cat([sink_c.float(), flat_c[rows]])
        keys_pe = torch.cat([sink_pe.float(), flat_pe[rows]])
        scores = (q_abs[i].float() @ keys_c.T + q_pe[i].float() @ keys_pe.T) * scale
        out.append(torch.softmax(scores, dim=-1) @ keys_c)
    return torch.stack(out)


def index_scores_reference(q, w, keys, table, positions, *, window: int | None = None) -> torch.Tensor:
    """``triton_mla.index_scores_triton``'s result ``[n, capacity]``: ``sum_g w_g relu(q_g . k_s)`` at
    each candidate position ``s``, ``-inf`` elsewhere."""
    page_size = keys.shape[1]
    flat = keys.flatten(0, 1).float()
    out = torch.full((q.shape[0], table.shape[1] * page_size), float("-inf"), device=q.device)
    for i in range(q.shape[0]):
        seen = _visible(int(positions[i]), window)
        k = flat[_cache_rows(table[i].cpu(), seen, page_size).to(q.device)]
        out[i, seen.to(q.device)] = (w[i].float()[:, None] * torch.relu(q[i].float() @ k.T)).sum(0)
    return out


def mla_decode_out_reference(q_abs, q_pe, sink_c, sink_pe, c, kpe, table, positions, w_uv, *, scale: float,
                             window: int | None = None, selected: torch.Tensor | None = None,
                             out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``triton_mla.mla_decode_out_triton``'s result ``[n, H * V]``: the context of ``mla_decode_reference``
    times each head's ``w_uv [H, V, R]`` transposed, heads side by side, rounded to ``out_dtype``."""
    ctx = mla_decode_reference(q_abs, q_pe, sink_c, sink_pe, c, kpe, table, positions, scale=scale, window=window,
                               selected=selected)
    return torch.einsum("nhr,hvr->nhv", ctx, w_uv.float()).flatten(1).to(out_dtype)


def mla_q_prologue_reference(q, w_uk, cos, sin_folded) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_mla.mla_q_prologue_triton``'s results from ``q [n, H, nope + P]``: ``q_abs = q_nope @ w_uk[h]``
    and the NEOX rotation of ``q_pe`` (``x cos + rotate_half(x) sin``; ``sin_folded`` carries rotate_half's
    sign, so the rotated half is ``x`` rolled by ``P / 2``), fp32 sums rounded to fp16."""
    nope = w_uk.shape[1]
    q_abs = torch.einsum("nhd,hdr->nhr", q[..., :nope].float(), w_uk.float())
    x = q[..., nope:].float()
    q_pe = x * cos[:, None].float() + x.roll(x.shape[-1] // 2, dims=-1) * sin_folded[:, None].float()
    return q_abs.half(), q_pe.half()
