"""Speculative decoding: n-gram, draft-model and MTP drafting give exactly the non-speculative
greedy output, keep caches consistent after partial acceptance, and sample the target distribution."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch

import exl3_triton
from exl3_triton import Generator, Job, SamplingParams
from exl3_triton.errors import InvalidArgumentError
from exl3_triton.runtime.drafting_options import DraftOptions
from exl3_triton.runtime.sampling import RowState, verify_drafts

from .mtp_toy import ToyMtpLM
from .runtime_helpers import record_hidden_requests


@pytest.fixture(scope="module")
def model(golden):
    return exl3_triton.load(golden / "exl3" / "llama_k4_mcg")


@pytest.fixture(scope="module")
def prompts(golden):
    ids = json.loads((golden / "hf" / "llama_ids.json").read_text())
    # repeated stretches give the n-gram drafter matches to propose, some right and some wrong
    return [ids[20:31], ids[:12] + ids[:12], ids[5:9] * 3, ids[40:60]]


def _generate(model, prompts, n, **gen_kw):
    gen = Generator(model, max_batch_size=4, max_seq_len=128, **gen_kw)
    jobs = [gen.enqueue(Job(p, max_new_tokens=n, stop_tokens=[])) for p in prompts]
    list(gen.iterate())
    return gen, jobs


@pytest.fixture(scope="module")
def plain_outputs(model, prompts):
    return [j.output_ids for j in _generate(model, prompts, 16)[1]]


@pytest.mark.parametrize("batch", [1, 4])
def test_ngram_greedy_equals_plain_greedy(model, prompts, plain_outputs, batch):
    gen, jobs = _generate(model, prompts[:batch], 16, draft=DraftOptions(mode="ngram", num_tokens=3))
    assert [j.output_ids for j in jobs] == plain_outputs[:batch]
    stats = gen.draft_stats
    assert stats.total_accepted > 0 and stats.total_rejected > 0  # both paths were exercised
    assert stats.mean_tokens_per_step > 1
    assert sum(j.stats.draft.steps for j in jobs) == stats.steps
    assert gen.cache.num_free_pages == gen.cache.num_pages  # every page came back


def _record_proposals(gen) -> list:
    proposals, original = [], gen.drafter.propose

    def recording(job, k):
        drafts = original(job, k)
        proposals.append((list(job.tokens), k, drafts))
        return drafts

    gen.drafter.propose = recording
    return proposals


def test_draft_model_greedy_equals_plain_greedy(model, golden, prompts, plain_outputs):
    draft = exl3_triton.load(golden / "exl3" / "llama_k25_mul1")  # same vocabulary, fewer bits
    gen = Generator(model, max_batch_size=4, max_seq_len=128, draft=DraftOptions(mode="model", num_tokens=4),
                    draft_model=draft)
    proposals = _record_proposals(gen)
    jobs = [gen.enqueue(Job(p, max_new_tokens=16, stop_tokens=[])) for p in prompts]
    list(gen.iterate())
    assert [j.output_ids for j in jobs] == plain_outputs
    stats = gen.draft_stats
    assert stats.total_accepted > 0 and stats.total_rejected > 0
    # the draft model's cache, cut back after every rejection, drafts what its uncached greedy
    # continuation of the verified tokens is
    for tokens, k, drafts in proposals[::3]:
        want = []
        for _ in range(k):
            want.append(int(draft.forward(torch.tensor(tokens + want))[-1].argmax()))
        assert drafts == want


def _toy(model, depth=3):
    toy = copy.copy(model)
    toy.network = ToyMtpLM(model.network, depth)
    return toy


@pytest.mark.parametrize("batch", [1, 4])
def test_mtp_greedy_equals_plain_and_drafts_equal_uncached_recomputation(model, prompts, plain_outputs, batch):
    toy = _toy(model)
    gen = Generator(toy, max_batch_size=4, max_seq_len=128, chunk_size=8,  # prompts span several chunks
                    draft=DraftOptions(mode="mtp", num_tokens=3))
    proposals = _record_proposals(gen)
    hidden_asked = record_hidden_requests(gen)  # the MTP layers read the trunk's hidden rows of every step
    jobs = [gen.enqueue(Job(p, max_new_tokens=16, stop_tokens=[])) for p in prompts[:batch]]
    list(gen.iterate())
    assert [j.output_ids for j in jobs] == plain_outputs[:batch]
    assert hidden_asked and all(hidden_asked)
    stats = gen.draft_stats
    assert stats.total_accepted > 0 and stats.total_rejected > 0
    # the cached MTP layers, caught up after every partial acceptance, draft exactly what a
    # from-scratch computation over the verified tokens drafts
    assert len(proposals) > 5
    for tokens, k, drafts in proposals:
        assert drafts == toy.network.uncached_drafts(tokens, k), (len(tokens), k)


def test_dynamic_depth_and_per_job_draft_length(model, prompts, plain_outputs):
    toy = _toy(model)
    gen = Generator(toy, max_batch_size=4, max_seq_len=128, draft=DraftOptions(mode="mtp", num_tokens=3, dynamic=True))
    jobs = [gen.enqueue(Job(prompts[0], max_new_tokens=16, stop_tokens=[])),
            gen.enqueue(Job(prompts[1], max_new_tokens=16, stop_tokens=[], draft_tokens=1)),
            gen.enqueue(Job(prompts[2], max_new_tokens=16, stop_tokens=[], draft_tokens=0))]
    list(gen.iterate())
    assert [j.output_ids for j in jobs] == plain_outputs[:3]
    assert len(jobs[1].stats.draft.proposed) == 1  # never drafted deeper than asked
    assert jobs[2].stats.draft.steps == 0
    # the toy drafts are mostly wrong: dynamic drafting backs off from depth 3
    assert jobs[0].draft_length < 3


def test_sliding_window_ring_survives_rejected_drafts(golden):
    """Gemma 4's sliding layers keep rings; rejected drafts write into them and must not
    overwrite entries still inside the window (the ring keeps a margin for drafts)."""
    m = exl3_triton.load(golden / "hf" / "gemma4")
    ids = json.loads((golden / "hf" / "gemma4_ids.json").read_text())
    prompt = ids[:10] * 4  # longer than the window, with repeats for the n-gram drafter
    plain = Generator(m, max_batch_size=2, max_seq_len=160)
    want = plain.enqueue(Job(prompt, max_new_tokens=40, stop_tokens=[]))
    list(plain.iterate())
    gen = Generator(m, max_batch_size=2, max_seq_len=160, draft=DraftOptions(mode="ngram", num_tokens=4))
    got = gen.enqueue(Job(prompt, max_new_tokens=40, stop_tokens=[]))
    list(gen.iterate())
    assert got.output_ids == want.output_ids
    assert gen.draft_stats.total_rejected > 0


def test_speculative_sampling_preserves_the_target_distribution():
    """Chi-square: tokens emitted by verify_drafts (with a fixed, often wrong draft) follow the
    target's filtered distribution at the first position."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6) * 1.5
    params = SamplingParams(temperature=0.8, top_k=5)
    from exl3_triton.runtime.sampling import filtered_distribution

    target = filtered_distribution(logits[0].clone(), params)
    g = torch.Generator().manual_seed(1)
    n = 20000
    counts = Counter()
    for _ in range(n):
        row = RowState(params, [0], 1, g)
        emitted, _, _, _ = verify_drafts(logits, [2, 3], row, want_logprobs=False, top_logprobs=0)
        counts[emitted[0]] += 1
    expected = target * n
    chi2 = sum((counts[t] - float(expected[t])) ** 2 / float(expected[t]) for t in range(6) if expected[t] > 0)
    assert all(counts[t] == 0 for t in range(6) if target[t] == 0)
    assert chi2 < 20.5  # 99.9% quantile of chi-square with 4 degrees of freedom (5 live tokens)
    # and the second token, given the first draft was accepted, follows row 1's distribution
    second = Counter()
    target2 = filtered_distribution(logits[1].clone(), params)
    trials = 0
    for _ in range(n):
        emitted, accepted, _, _ = verify_drafts(logits, [2, 3], RowState(params, [0], 1, g), want_logprobs=False,
                                                top_logprobs=0)
        if accepted >= 1:
            second[emitted[1]] += 1
            trials += 1
    chi2 = sum((second[t] - float(target2[t]) * trials) ** 2 / (float(target2[t]) * trials)
               for t in range(6) if target2[t] > 0)
    assert trials > 1000 and chi2 < 20.5


def test_greedy_verification_accepts_exactly_the_argmax_prefix():
    logits = torch.full((4, 5), -1.0)
    for i, best in enumerate([1, 2, 3, 4]):
        logits[i, best] = 1.0
    row = RowState(SamplingParams(), [0], 1, None)
    assert verify_drafts(logits, [1, 2, 0], row, want_logprobs=False, top_logprobs=0)[:2] == ([1, 2, 3], 2)
    assert verify_drafts(logits, [1, 2, 3], row, want_logprobs=False, top_logprobs=0)[:2] == ([1, 2, 3, 4], 3)
    assert verify_drafts(logits, [0], row, want_logprobs=False, top_logprobs=0)[:2] == ([1], 0)


def test_bad_draft_options(model):
    with pytest.raises(InvalidArgumentError, match="no MTP draft layers"):
        Generator(model, draft=DraftOptions(mode="mtp"))
    with pytest.raises(InvalidArgumentError, match="num_tokens"):
        DraftOptions(mode="ngram", num_tokens=0)
    with pytest.raises(InvalidArgumentError, match="not one of"):
        DraftOptions(mode="eagle")
    with pytest.raises(InvalidArgumentError, match="draft model"):
        Generator(model, draft=DraftOptions(mode="model"))
    toy = _toy(model, depth=2)
    with pytest.raises(InvalidArgumentError, match="at most 2"):
        Generator(toy, draft=DraftOptions(mode="mtp", num_tokens=3))
    # a confidence gate only a block drafter reads is refused where nothing would read it, not ignored
    for mode in ("ngram", "model", "disabled"):
        with pytest.raises(InvalidArgumentError, match=f"threshold=0.5 has no effect with draft mode '{mode}'"):
            DraftOptions(mode=mode, confidence_threshold=0.5)
    gated = DraftOptions(mode="mtp", num_tokens=2, confidence_threshold=0.5)
    with pytest.raises(InvalidArgumentError, match="confidence_threshold=0.5.*drafts with its 2 MTP layers"):
        Generator(toy, draft=gated)
    from exl3_triton.integrations.common import HostOptions, make_generator

    with pytest.raises(InvalidArgumentError, match="draft_model.draft_confidence"):  # what a TabbyAPI load reports
        make_generator(toy, HostOptions(max_seq_len=64, draft=gated))
    gen = Generator(model, draft=DraftOptions(mode="ngram", num_tokens=2))
    with pytest.raises(InvalidArgumentError, match="draft_tokens"):
        gen.enqueue(Job([1, 2, 3], draft_tokens=5))


def test_teacher_forced_acceptance_matches_uncached_computation(model, golden):
    from exl3_triton.runtime.drafting import teacher_forced_acceptance

    toy = _toy(model)
    ids = json.loads((golden / "hf" / "llama_ids.json").read_text())[:40]
    got = teacher_forced_acceptance(toy, ids)
    want = toy.network.uncached_teacher_forced_acceptance(ids)
    assert len(got) == 3 and got == pytest.approx(want, abs=1 / 40)  # at most one argmax near-tie apart
    assert max(got) > 0  # the toy's drafts do agree sometimes: a wrong alignment would give ~1/vocab


def test_cli_generate_with_ngram_drafting_and_mtp_eval_errors(golden, tmp_path, capsys):
    from exl3_triton.cli import main

    model_dir = str(golden / "exl3" / "llama_k4_mcg")
    assert main(["generate", model_dir, "--prompt", "the the the the", "--max-new-tokens", "12"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", model_dir, "--prompt", "the the the the", "--max-new-tokens", "12",
                 "--draft-mode", "ngram", "--draft-tokens", "3", "--stats"]) == 0
    out = capsys.readouterr()
    assert out.out == plain
    assert "draft acceptance" in out.err
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    assert main(["mtp-eval", model_dir, "--text", str(text)]) == 2
    assert "no MTP draft layers" in capsys.readouterr().err
    assert main(["mtp-eval", model_dir, "--text", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read --text" in capsys.readouterr().err


# ------------------------------------------------------------------ a family with real MTP layers

@pytest.fixture(scope="module")
def pangu(golden):
    return exl3_triton.load(golden / "openpangu" / "A")  # window 16, indexer top-k 16, 3 MTP layers


def _pangu_uncached_drafts(net, tokens: list[int], k: int) -> list[int]:
    """The MTP drafts after ``tokens`` from scratch: full trunk pass, then each depth teacher-forced."""
    hidden = net.forward_hidden(torch.tensor(tokens)[None])[0][: len(tokens) - 1]
    seq, drafts = list(tokens), []
    for d in range(1, k + 1):
        nxt = torch.tensor(seq[d:d + hidden.shape[0]])
        logits, hidden = net.mtp_forward(d, hidden, nxt, None)
        drafts.append(int(logits[-1].argmax()))
        seq.append(drafts[-1])
    return drafts


@pytest.mark.parametrize("batch", [1, 3])
def test_openpangu_mtp_greedy_equals_plain_and_drafts_equal_recomputation(pangu, batch):
    """Past the sliding window and the indexer's top-k, with MoME state: rejected drafts roll every
    piece of decode state back (pages, rings, MoME input rings, the MTP layers' own caches)."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (20, 7, 33)][:batch]
    n_new = 24
    plain = Generator(pangu, max_batch_size=3, max_seq_len=96, chunk_size=16)
    want = [plain.enqueue(Job(p, max_new_tokens=n_new, stop_tokens=[])) for p in prompts]
    list(plain.iterate())
    gen = Generator(pangu, max_batch_size=3, max_seq_len=96, chunk_size=16,
                    draft=DraftOptions(mode="mtp", num_tokens=3))
    proposals = _record_proposals(gen)
    jobs = [gen.enqueue(Job(p, max_new_tokens=n_new, stop_tokens=[])) for p in prompts]
    list(gen.iterate())
    assert [j.output_ids for j in jobs] == [j.output_ids for j in want]
    assert gen.draft_stats.total_rejected > 0
    for tokens, k, drafts in proposals[::2]:
        assert drafts == _pangu_uncached_drafts(pangu.network, tokens, k), (len(tokens), k)


def test_openpangu_mtp_eval_matches_teacher_forcing(pangu, golden, tmp_path, capsys):
    from exl3_triton.cli import main
    from exl3_triton.runtime.drafting import teacher_forced_acceptance

    net = pangu.network
    ids = torch.randint(0, 512, (60,), generator=torch.Generator().manual_seed(9)).tolist()
    got = teacher_forced_acceptance(pangu, ids)
    target = net.forward(torch.tensor(ids)[None])[0].argmax(-1)
    hidden, want = net.forward_hidden(torch.tensor(ids)[None])[0], []
    for d in range(1, 4):
        count = len(ids) - d
        logits, hidden = net.mtp_forward(d, hidden[:count], torch.tensor(ids[d:]), None)
        want.append(float((logits[: count - 1].argmax(-1) == target[d:d + count - 1]).float().mean()))
    assert got == pytest.approx(want, abs=1.01 / 55)  # at most one arg-max near-tie apart per depth
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 8)
    assert main(["mtp-eval", str(golden / "openpangu" / "A"), "--text", str(text)]) == 0
    out = capsys.readouterr().out
    assert "depth 1:" in out and "depth 3:" in out
