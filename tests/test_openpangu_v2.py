"""OpenPanguV2 adapter against Huawei's pure-torch reference (golden openpangu/A), and its cache.

The golden model: 6 trunk layers (DSA on 0 and 3 keeping 16 tokens, window 16 elsewhere),
8 sinks, MoME, mHC, 3 MTP depths (window 64); 96 tokens, so the window and the indexer's
top-k are both exceeded (read golden/openpangu/A/README.md).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import exl3_triton
from exl3_triton.errors import ConfigError
from exl3_triton.runtime import Generator, Job

from .conftest import rel_err
from .runtime_helpers import cached_logits


@pytest.fixture(scope="module")
def pangu(golden):
    return exl3_triton.load(golden / "openpangu" / "A")


@pytest.fixture(scope="module")
def ref(golden):
    return load_file(str(golden / "openpangu" / "A" / "golden.safetensors"))


def _row_rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)


# ------------------------------------------------------------------ golden: trunk


def test_trunk_logits_and_hidden_match_the_reference_at_every_position(pangu, ref):
    net = pangu.network
    with torch.inference_mode():
        prenorm = net.forward_hidden(ref["ids"][None])[0]
        logits = net.head(prenorm)
    assert _row_rel_err(prenorm, ref["hidden_prenorm"]).max() < 1e-4
    assert _row_rel_err(net.norm(prenorm), ref["hidden"]).max() < 1e-4
    assert _row_rel_err(logits, ref["logits"]).max() < 1e-4
    assert torch.equal(logits.argmax(-1), ref["logits"].argmax(-1))
    # the public entry point gives the same logits
    assert torch.equal(pangu.forward(ref["ids"]), logits)


def test_dsa_layers_select_the_reference_positions(pangu, ref):
    net = pangu.network
    for layer in (0, 3):
        net.layers[layer].self_attn.record_selection = True
    with torch.inference_mode():
        net.forward_hidden(ref["ids"][None])
    t = ref["ids"].numel()
    for layer in (0, 3):
        chosen = net.layers[layer].self_attn.last_selection
        want = torch.zeros(t, t, dtype=torch.bool)
        for row, kept in enumerate(ref[f"dsa_topk_layer{layer}"]):
            kept = kept[kept >= 0] if row >= 15 else torch.arange(row + 1)
            want[row, kept] = True
        assert torch.equal(chosen, want), f"layer {layer}"
        # the selection really is sparse past the top-k: rows keep 16 of up to 96 tokens
        assert chosen[40:].sum(-1).eq(16).all()


def test_prefix_logits_do_not_change_when_tokens_follow(pangu, ref):
    prefix = pangu.forward(ref["ids"][:48])
    assert _row_rel_err(prefix, ref["logits_prefix"]).max() < 1e-4
    assert rel_err(prefix, pangu.forward(ref["ids"])[:48]) < 1e-5


# ------------------------------------------------------------------ golden: MTP


def test_teacher_forced_mtp_logits_match_the_reference(pangu, ref):
    """Depth d, row i: hidden of row i (depth 1: trunk pre-norm) with token ids[i + d], rope position i."""
    net, ids = pangu.network, ref["ids"]
    assert net.mtp_depth == 3
    with torch.inference_mode():
        hidden = net.forward_hidden(ids[None])[0]
        for depth in (1, 2, 3):
            n = ids.numel() - depth
            logits, hidden = net.mtp_forward(depth, hidden[:n], ids[depth:depth + n], None)
            assert _row_rel_err(logits, ref[f"mtp_logits_{depth}"]).max() < 1e-4, depth
            if depth == 1:
                assert _row_rel_err(hidden, ref["mtp_hidden_1"]).max() < 1e-4


# ------------------------------------------------------------------ cached path


@pytest.mark.parametrize("chunks,page_size", [([96], 16), ([5, 30], 8), ([17, 40, 3, 20], 32)])
def test_cached_prefill_and_decode_equal_the_full_forward(pangu, ref, chunks, page_size):
    """Past the window (16) and the indexer's top-k (16), with rings wrapping and chunk edges anywhere."""
    ids = ref["ids"].tolist()
    step = cached_logits(pangu, ids, chunks=chunks, page_size=page_size)
    assert _row_rel_err(step, ref["logits"]).max() < 1e-4
    assert torch.equal(step.argmax(-1), ref["logits"].argmax(-1))


def test_mome_start_rule_across_chunk_edges_at_the_first_positions(pangu, ref):
    """Chunks ending at positions 0 and 2: the conv term must stay off at positions 0-1 and use the
    stored inputs from position 2 on (the reference zeroes it by position, not by call)."""
    ids = ref["ids"][:8].tolist()
    step = cached_logits(pangu, ids, chunks=[1, 2], page_size=8)
    assert _row_rel_err(step, pangu.forward(torch.tensor(ids))).max() < 1e-5
    assert _row_rel_err(step, ref["logits_prefix"][:8]).max() < 1e-4


def test_concurrent_jobs_match_single_runs_and_the_full_forward(pangu):
    vocab = pangu.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 7, 23)]

    def run(prompt_list):
        gen = Generator(pangu, max_batch_size=4, max_seq_len=96, chunk_size=16)
        jobs = [gen.enqueue(Job(p, max_new_tokens=6, stop_tokens=[])) for p in prompt_list]
        list(gen.iterate())
        return [j.output_ids for j in jobs]

    together = run(prompts)
    for p, out in zip(prompts, together):
        assert run([p]) == [out]
        full = pangu.forward(torch.tensor(p + out))
        assert full[len(p) - 1:-1].argmax(-1).tolist() == out


def test_mtp_layers_cached_step_by_step_equal_teacher_forcing(pangu, ref):
    """Each depth's own cache (declared after the trunk's), fed in chunks, gives the full-sequence result."""
    from exl3_triton.runtime.cache import PagedCache
    from exl3_triton.runtime.runner import ModelRunner, StepItem

    net, ids = pangu.network, ref["ids"]
    with torch.inference_mode():
        hidden = net.forward_hidden(ids[None])[0]
        want, _ = net.mtp_forward(1, hidden[:-1], ids[1:], None)
    cache = PagedCache(net.cache_spec(), num_pages=16, page_size=8, max_seqs=2)
    runner = ModelRunner(net, cache, max_pages_per_seq=16, use_cuda_graphs=False)
    seq = cache.new_sequence()
    got, pos, n_rows = [], 0, ids.numel() - 1
    for size in [20, 1, 1, 30] + [1] * n_rows:
        if pos >= n_rows:
            break
        size = min(size, n_rows - pos)
        cache.reserve(seq, pos + size)
        _, batch, _ = runner.build_batch([StepItem(seq, ids[pos:pos + size].tolist(), True)])
        with torch.inference_mode():
            got.append(net.mtp_forward(1, hidden[pos:pos + size], ids[pos + 1:pos + 1 + size], batch)[0])
        seq.num_tokens += size
        pos += size
    assert _row_rel_err(torch.cat(got), want).max() < 1e-5


def test_decode_step_reads_no_host_values(pangu, ref):
    """A captured decode step sees placeholder host values (kv_lens 1): the result must not change."""
    import dataclasses

    from exl3_triton.runtime.cache import PagedCache
    from exl3_triton.runtime.runner import ModelRunner, StepItem

    net, ids = pangu.network, ref["ids"].tolist()
    cache = PagedCache(net.cache_spec(), num_pages=8, page_size=16, max_seqs=4)
    runner = ModelRunner(net, cache, max_pages_per_seq=8, use_cuda_graphs=False)
    seqs = [cache.new_sequence() for _ in range(2)]
    for seq, n in zip(seqs, (50, 33)):  # both past the window and the indexer's top-k
        cache.reserve(seq, n + 1)
        with torch.inference_mode():
            runner.run([StepItem(seq, ids[:n], True)])
    step_ids, batch, _ = runner.build_batch([StepItem(s, [ids[s.num_tokens]], True) for s in seqs])
    assert batch.is_decode
    placeholder = dataclasses.replace(batch, kv_lens=[1, 1], cu_q=[0, 1, 2], memo={})
    with torch.inference_mode():
        real = net.forward_batch(step_ids, batch)
        blind = net.forward_batch(step_ids, placeholder)
    assert torch.equal(real, blind)
    assert _row_rel_err(real[0:1], ref["logits"][50:51]).max() < 1e-4


def test_decode_steps_carry_the_indexer_bound_while_no_row_selects(pangu, ref):
    """``ForwardBatch.context_bound``: the runner sets the network's bucket (the indexer's top_k, 16 here)
    while every position is below it, else None; a layer may skip the selection only under it (the
    fused MLA path does; tests/kernels/test_triton_mla.py checks its logits across the bound)."""
    from exl3_triton.runtime.cache import PagedCache
    from exl3_triton.runtime.runner import ModelRunner, StepItem

    net, ids = pangu.network, ref["ids"].tolist()
    assert net.decode_context_buckets() == (net.config.index_topk,) == (16,)
    cache = PagedCache(net.cache_spec(), num_pages=8, page_size=16, max_seqs=4)
    runner = ModelRunner(net, cache, max_pages_per_seq=8, use_cuda_graphs=False)
    short, long = cache.new_sequence(), cache.new_sequence()
    for seq, n in ((short, 15), (long, 16)):  # next positions 15 (the last below 16) and 16
        cache.reserve(seq, n + 1)
        with torch.inference_mode():
            runner.run([StepItem(seq, ids[:n], True)])

    def bound(seqs):
        return runner.build_batch([StepItem(s, [ids[s.num_tokens]], True) for s in seqs])[1].context_bound
    assert bound([short]) == 16
    assert bound([long]) is None and bound([short, long]) is None  # one row past it: every row selects


def test_decode_state_is_indexed_by_position(pangu):
    """No per-sequence 'latest state' slot: the MoME inputs live in rings indexed by position."""
    from exl3_triton.arch.blocks.mla import CONV_RING

    for spec in pangu.network.cache_spec():
        names = {t.name for t in spec.paged}
        assert {"c", "kpe"} <= names
        assert all(t.shape[0] == CONV_RING for t in spec.slots)


# ------------------------------------------------------------------ config errors


@pytest.mark.parametrize("overrides,key", [
    ({"rope_interleave": True}, "rope_interleave"),
    ({"n_group": 8}, "n_group"),
    ({"dsa_layers": [0, 1]}, "dsa_layers"),
    ({"swa_layers": [1, 2, 4, 5, 6, 7, 9]}, "swa_layers"),
    ({"sliding_window_list": [16, 16]}, "sliding_window_list"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_or_inconsistent_config_is_named(golden, tmp_path, overrides, key):
    shutil.copytree(golden / "openpangu" / "A", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(overrides)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=key):
        exl3_triton.load(tmp_path / "m")
