"""Helpers for runtime tests: drive the paged cache directly, step by step."""

from __future__ import annotations

import torch

from exl3_triton.runtime.cache import PagedCache
from exl3_triton.runtime.runner import ModelRunner, StepItem


def cached_logits(model, ids: list[int], chunks: list[int], *, page_size: int = 16) -> torch.Tensor:
    """Logits at every position, computed by feeding ``ids`` through the paged cache in ``chunks``
    (token counts per step; the remainder goes one token per step)."""
    net = model.network
    cache = PagedCache(net.cache_spec(), num_pages=-(-len(ids) // page_size) + 1, page_size=page_size, max_seqs=2)
    runner = ModelRunner(net, cache, max_pages_per_seq=cache.num_pages, use_cuda_graphs=False)
    seq = cache.new_sequence()
    out, pos = [], 0
    sizes = list(chunks) + [1] * len(ids)
    for n in sizes:
        if pos >= len(ids):
            break
        n = min(n, len(ids) - pos)
        cache.reserve(seq, pos + n)
        ids_t, batch, _ = runner.build_batch([StepItem(seq, ids[pos:pos + n], True)])
        with torch.inference_mode():
            out.append(net.forward_batch(ids_t, batch, None))
        seq.num_tokens += n
        pos += n
    return torch.cat(out)


def record_hidden_requests(gen) -> list[bool]:
    """Spy on a ``Generator``'s runner: the list fills with each step's ``return_hidden``, i.e. whether
    the step was asked to return the trunk's hidden rows."""
    asked, run = [], gen.runner.run

    def recording(items, **kw):
        asked.append(kw.get("return_hidden", False))
        return run(items, **kw)

    gen.runner.run = recording
    return asked
