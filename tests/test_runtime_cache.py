"""The paged cache: allocation, sharing, and cached execution equal to the plain forward."""

import json
import shutil

import pytest
import torch

import exl3_triton
from exl3_triton.arch.cache_spec import kv_spec
from exl3_triton.errors import InvalidArgumentError
from exl3_triton.runtime.cache import OutOfPagesError, PagedCache

from .conftest import GOLDEN_EXL3, rel_err
from .runtime_helpers import cached_logits


def _cache(num_pages=6, page_size=4, max_seqs=3):
    return PagedCache([kv_spec(2, 8, torch.float32, torch.device("cpu"))] * 2, num_pages=num_pages,
                      page_size=page_size, max_seqs=max_seqs)


def test_allocation_and_release():
    cache = _cache()
    seq = cache.new_sequence()
    cache.reserve(seq, 9)  # 3 pages of 4
    assert len(seq.page_ids) == 3 and cache.num_free_pages == 3
    cache.reserve(seq, 12)  # still 3
    assert len(seq.page_ids) == 3
    with pytest.raises(OutOfPagesError):
        cache.reserve(seq, 30)
    cache.release(seq)
    assert cache.num_free_pages == 6 and seq.page_ids == [] and len(cache.free_slots) == 3


def test_cache_shapes_follow_the_spec():
    cache = _cache(num_pages=5, page_size=8)
    assert cache.paged[1]["k"].shape == (5, 8, 2, 8)
    with pytest.raises(InvalidArgumentError, match="power of two"):
        _cache(page_size=6)


def test_default_page_size_fits_every_compressed_entry():
    """Hand-checked: pages must hold whole entries, so the preferred size grows to the largest
    ``tokens_per_entry``; a non-power-of-two ratio fits no page size and is named."""
    from exl3_triton.arch.cache_spec import LayerCacheSpec, PagedTensorSpec, fitting_page_size
    from exl3_triton.errors import ConfigError

    def pool(ratio):
        return LayerCacheSpec(paged=(PagedTensorSpec("pool", (8,), torch.float32, tokens_per_entry=ratio),))

    plain = kv_spec(2, 8, torch.float32, torch.device("cpu"))
    assert fitting_page_size([plain], 16) == 16
    assert fitting_page_size([plain, pool(4), pool(128)], 16) == 128
    assert fitting_page_size([pool(4), pool(128)], 256) == 256
    size = fitting_page_size([plain, pool(128)], 16)
    PagedCache([plain, pool(128)], num_pages=1, page_size=size)  # accepted as it stands
    with pytest.raises(InvalidArgumentError, match="page_size 16 is not a multiple of 128: cache tensor 'pool'"):
        PagedCache([plain, pool(128)], num_pages=1, page_size=16)
    with pytest.raises(ConfigError, match="'pool' stores one entry per 12 tokens"):
        fitting_page_size([pool(12)], 16)


def test_prefix_pages_are_shared_and_refcounted():
    cache = _cache(num_pages=8, page_size=4)
    tokens = list(range(11))
    a = cache.new_sequence()
    cache.reserve(a, 11)
    a.num_tokens = 11
    cache.register_full_pages(a, tokens)  # pages 0..1 full (8 tokens)
    b = cache.new_sequence()
    assert cache.match_prefix(b, tokens[:9] + [99, 98]) == 8
    assert b.page_ids == a.page_ids[:2]
    assert [cache.refcount[p] for p in a.page_ids] == [2, 2, 1]
    c = cache.new_sequence()
    assert cache.match_prefix(c, [0, 1, 2, 3, 7, 7, 7, 7, 7]) == 4  # only the first page matches
    p0, p1, p2 = a.page_ids
    assert (cache.refcount[p0], cache.refcount[p1], cache.refcount[p2]) == (3, 2, 1)  # a, b, c / a, b / a
    cache.release(a)
    assert (cache.refcount[p0], cache.refcount[p1], cache.refcount[p2]) == (2, 1, 0)
    assert p2 in cache.free_pages and p0 not in cache.free_pages
    cache.release(b)
    cache.release(c)
    assert cache.num_free_pages == 8
    # released pages keep their contents: a later sequence still matches them ...
    d = cache.new_sequence()
    assert cache.match_prefix(d, tokens) == 8 and d.page_ids == [p0, p1]
    cache.release(d)
    # ... until they are handed out again
    e = cache.new_sequence()
    cache.reserve(e, 32)
    assert not cache.prefix_pages
    f = cache.new_sequence()
    assert cache.match_prefix(f, tokens) == 0


def test_match_prefix_leaves_one_token_to_compute():
    cache = _cache(num_pages=8, page_size=4)
    tokens = list(range(8))
    a = cache.new_sequence()
    cache.reserve(a, 8)
    a.num_tokens = 8
    cache.register_full_pages(a, tokens)
    b = cache.new_sequence()
    assert cache.match_prefix(b, tokens) == 4  # the last token of the prompt must run through the model


@pytest.mark.parametrize("name", GOLDEN_EXL3)
def test_cached_decode_equals_full_forward_exl3(golden, name):
    model = exl3_triton.load(golden / "exl3" / name)
    ids = json.loads((golden / "hf" / "llama_ids.json").read_text())[:70]
    full = model.forward(torch.tensor(ids))
    step = cached_logits(model, ids, chunks=[5, 23])  # prefill in two chunks, then one token at a time
    assert rel_err(step, full) < 1e-5
    assert torch.equal(step.argmax(-1), full.argmax(-1))


def test_cached_decode_equals_full_forward_unquantized(golden):
    model = exl3_triton.load(golden / "hf" / "llama")
    ids = json.loads((golden / "hf" / "llama_ids.json").read_text())
    assert rel_err(cached_logits(model, ids, chunks=[40]), model.forward(torch.tensor(ids))) < 1e-5


def _sliding_copy(src, dst, window):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    cfg["sliding_window"] = window
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_sliding_window_beyond_the_window(golden, tmp_path):
    model = exl3_triton.load(_sliding_copy(golden / "exl3" / "llama_k4_mcg", tmp_path / "m", 8))
    ids = json.loads((golden / "hf" / "llama_ids.json").read_text())[:40]  # 5x the window
    full = model.forward(torch.tensor(ids))
    assert rel_err(cached_logits(model, ids, chunks=[3, 11]), full) < 1e-5
    # the window really limits attention: the same model without it differs after position 8
    plain = exl3_triton.load(golden / "exl3" / "llama_k4_mcg").forward(torch.tensor(ids))
    assert rel_err(full[:8], plain[:8]) < 1e-6 and rel_err(full[8:], plain[8:]) > 1e-3
