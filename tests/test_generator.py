"""The continuous-batching generator: batching, stops, streaming, cancellation, pages, prefixes."""

import asyncio
import json

import pytest
import torch

import exl3_triton
from exl3_triton import Generator, Job, SamplingParams
from exl3_triton.errors import InvalidArgumentError

MODEL = "llama_k4_mcg"


@pytest.fixture(scope="module")
def model(golden):
    return exl3_triton.load(golden / "exl3" / MODEL)


@pytest.fixture(scope="module")
def ids(golden):
    return json.loads((golden / "hf" / "llama_ids.json").read_text())


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by re-running the plain (no cache) forward: the oracle."""
    out = []
    for _ in range(n):
        out.append(int(model.forward(torch.tensor(prompt + out))[-1].argmax()))
    return out


def run_alone(model, prompt, n, **kw) -> Job:
    gen = Generator(model, max_batch_size=4, max_seq_len=256)
    job = gen.enqueue(Job(prompt, max_new_tokens=n, stop_tokens=[], **kw))
    list(gen.iterate())
    return job


def test_greedy_matches_uncached_reference(model, ids):
    job = run_alone(model, ids[:20], 12)
    assert job.output_ids == greedy_reference(model, ids[:20], 12)
    assert job.finish_reason == "max_new_tokens"


def test_four_prompts_batched_equal_each_alone(model, ids):
    prompts = [ids[:5], ids[10:41], ids[3:4], ids[50:67]]
    alone = [run_alone(model, p, 10).output_ids for p in prompts]
    gen = Generator(model, max_batch_size=4, max_seq_len=256, chunk_size=16)  # chunked prefills run beside decodes
    jobs = [gen.enqueue(Job(p, max_new_tokens=10, stop_tokens=[])) for p in prompts]
    list(gen.iterate())
    assert [j.output_ids for j in jobs] == alone


def test_jobs_join_and_leave_between_steps(model, ids):
    gen = Generator(model, max_batch_size=2, max_seq_len=256)
    free = gen.cache.num_free_pages
    a = gen.enqueue(Job(ids[:8], max_new_tokens=3, stop_tokens=[]))
    for _ in range(2):
        gen.step()
    b = gen.enqueue(Job(ids[20:30], max_new_tokens=6, stop_tokens=[]))
    c = gen.enqueue(Job(ids[40:44], max_new_tokens=2, stop_tokens=[]))  # waits for a free slot
    list(gen.iterate())
    for job, prompt in ((a, ids[:8]), (b, ids[20:30]), (c, ids[40:44])):
        assert job.output_ids == run_alone(model, prompt, len(job.output_ids)).output_ids
    assert gen.cache.num_free_pages == free  # every page returned


def test_events_order_and_stats(model, ids):
    gen = Generator(model, max_batch_size=2, max_seq_len=256)
    job = gen.enqueue(Job(ids[:10], max_new_tokens=5, stop_tokens=[]))
    events = [e for e in gen.iterate() if e.job is job]
    assert [e.finished for e in events] == [False] * 4 + [True]
    assert sum((e.token_ids for e in events), []) == job.output_ids
    assert "".join(e.text for e in events) == job.text
    s = events[-1].stats
    assert s.prompt_tokens == 10 and s.new_tokens == 5
    assert s.time_to_first_token > 0 and s.new_tokens_per_second > 0 and s.prompt_tokens_per_second > 0


def test_stop_token_and_min_new_tokens(model, ids):
    ref = run_alone(model, ids[:12], 8).output_ids
    stop = ref[3]
    gen = Generator(model, max_batch_size=2, max_seq_len=256)
    job = gen.enqueue(Job(ids[:12], max_new_tokens=8, stop_tokens=[stop]))
    list(gen.iterate())
    first = ref.index(stop)
    assert job.output_ids == ref[:first] and job.finish_reason == "stop_token"
    # with min_new_tokens the stop token is suppressed until enough tokens exist
    gen = Generator(model, max_batch_size=2, max_seq_len=256)
    job = gen.enqueue(Job(ids[:12], max_new_tokens=8, min_new_tokens=first + 2, stop_tokens=[stop]))
    list(gen.iterate())
    assert len(job.output_ids) >= first + 2 and stop not in job.output_ids[: first + 2]


def test_stop_string_split_across_tokens(model, ids):
    ref = run_alone(model, ids[:15], 16)
    pieces = [model.tokenizer.decode(ref.output_ids[:i]) for i in range(len(ref.output_ids) + 1)]
    # a two-character stop string made of the last character of one token's text and the first of
    # the next token's, whose first occurrence is exactly there: it is split across the two tokens
    def boundary_stop(i):
        a, b = pieces[i + 1], pieces[i + 2]
        if len(a) == len(pieces[i]) or len(b) == len(a) or not b.startswith(a):
            return None
        cand = b[len(a) - 1: len(a) + 1]
        return cand if "\ufffd" not in cand and pieces[-1].find(cand) == len(a) - 1 else None

    stop = next(c for c in map(boundary_stop, range(2, len(pieces) - 2)) if c)
    job = run_alone(model, ids[:15], 16, stop_strings=[stop])
    assert job.finish_reason == "stop_string"
    assert job.text == pieces[-1][: pieces[-1].find(stop)]
    assert stop not in job.text


def test_utf8_streaming_never_breaks_characters(model):
    tok = model.tokenizer
    text = "naïve café — 東京 😀!"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text)  # byte-level pieces: some characters span several tokens
    from exl3_triton.runtime.text import IncrementalDecoder

    dec = IncrementalDecoder(tok.decode, [2])
    pieces = [dec.add(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # something was held back until its character was complete


def test_cancellation_frees_the_job(model, ids):
    gen = Generator(model, max_batch_size=2, max_seq_len=256)
    free = gen.cache.num_free_pages
    a = gen.enqueue(Job(ids[:10], max_new_tokens=40, stop_tokens=[]))
    b = gen.enqueue(Job(ids[30:35], max_new_tokens=6, stop_tokens=[]))
    queued = gen.enqueue(Job(ids[5:9], max_new_tokens=6, stop_tokens=[]))
    for _ in range(3):
        gen.step()
    a.cancel()
    queued.cancel()
    events = gen.step()
    finished = {e.job.id: e.finish_reason for e in events if e.finished}
    assert finished[a.id] == "cancelled" and finished[queued.id] == "cancelled"
    assert a.cache is None and len(a.output_ids) < 40
    list(gen.iterate())
    assert b.output_ids == run_alone(model, ids[30:35], 6).output_ids
    assert gen.cache.num_free_pages == free


def test_page_exhaustion_queues_and_preempts(model, ids):
    prompts = [ids[:20], ids[20:45], ids[45:60]]
    alone = [run_alone(model, p, 12).output_ids for p in prompts]
    # 4 pages of 16 tokens: not enough for all three at once, enough for each alone
    gen = Generator(model, max_batch_size=3, max_seq_len=64, cache_tokens=64, page_size=16)
    jobs = [gen.enqueue(Job(p, max_new_tokens=12, stop_tokens=[])) for p in prompts]
    list(gen.iterate())
    assert [j.output_ids for j in jobs] == alone
    assert all(j.finish_reason == "max_new_tokens" for j in jobs)


def test_job_that_can_never_fit(model, ids):
    gen = Generator(model, max_batch_size=2, max_seq_len=256, cache_tokens=32, page_size=16)
    with pytest.raises(InvalidArgumentError, match="cache"):
        gen.enqueue(Job(ids[:40], max_new_tokens=4))
    job = gen.enqueue(Job(ids[:25], max_new_tokens=30, stop_tokens=[]))  # the prompt fits, the output cannot
    events = list(gen.iterate())
    assert job.finish_reason == "error" and "cache" in job.error
    assert events[-1].finished and events[-1].error == job.error
    assert 0 < len(job.output_ids) < 30


def test_prefix_sharing(model, ids):
    common = ids[:40]
    gen = Generator(model, max_batch_size=2, max_seq_len=256, page_size=16)
    a = gen.enqueue(Job(common + ids[60:63], max_new_tokens=4, stop_tokens=[]))
    list(gen.iterate())
    b = gen.enqueue(Job(common + ids[70:72], max_new_tokens=4, stop_tokens=[]))
    list(gen.iterate())
    assert b.stats.cached_prompt_tokens == 32  # two full pages of the shared 40 tokens
    assert b.output_ids == run_alone(model, common + ids[70:72], 4).output_ids
    assert a.output_ids == run_alone(model, common + ids[60:63], 4).output_ids


def test_max_seq_len_stops_generation(model, ids):
    gen = Generator(model, max_batch_size=1, max_seq_len=20)
    job = gen.enqueue(Job(ids[:15], max_new_tokens=50, stop_tokens=[]))
    list(gen.iterate())
    assert job.finish_reason == "max_seq_len" and len(job.tokens) == 20


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(min_new_tokens=9, max_new_tokens=3),
                                 dict(sampling=SamplingParams(temperature=-1)),
                                 dict(sampling=SamplingParams(top_p=0)),
                                 dict(sampling=SamplingParams(banned_tokens=(99999,)))])
def test_bad_requests_are_rejected(model, ids, bad):
    gen = Generator(model, max_batch_size=1, max_seq_len=64)
    with pytest.raises(InvalidArgumentError):
        gen.enqueue(Job(ids[:5], **bad))
    assert not gen.has_work


def test_bad_prompts_are_rejected(model):
    gen = Generator(model, max_batch_size=1, max_seq_len=64)
    for prompt, match in [([], "empty"), ([1, 2, 9999], "token ids"), (list(range(100)), "max_seq_len"),
                          ([1.5], "prompt must be")]:
        with pytest.raises(InvalidArgumentError, match=match):
            gen.enqueue(Job(prompt))


def test_seeded_sampling_is_reproducible_and_varies(model, ids):
    def run(seed):
        return run_alone(model, ids[:6], 12, sampling=SamplingParams(temperature=1.0, seed=seed)).output_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_sampling_options_take_effect(model, ids):
    greedy = run_alone(model, ids[:6], 8).output_ids
    assert run_alone(model, ids[:6], 8, sampling=SamplingParams(temperature=0.8, top_k=1, seed=3)).output_ids == greedy
    banned = greedy[0]
    out = run_alone(model, ids[:6], 8, sampling=SamplingParams(banned_tokens=(banned,))).output_ids
    assert banned not in out
    forced = run_alone(model, ids[:6], 3, sampling=SamplingParams(logit_bias={77: 100.0})).output_ids
    assert forced == [77, 77, 77]
    no_repeat = run_alone(model, ids[:6], 12, sampling=SamplingParams(frequency_penalty=100.0)).output_ids
    assert len(set(no_repeat)) == len(no_repeat)


def test_logprobs_match_the_model(model, ids):
    job = run_alone(model, ids[:9], 4, return_logprobs=True, top_logprobs=3)
    gen = Generator(model, max_batch_size=1, max_seq_len=64)
    job = gen.enqueue(Job(ids[:9], max_new_tokens=4, stop_tokens=[], return_logprobs=True, top_logprobs=3))
    events = list(gen.iterate())
    lps = sum((e.logprobs for e in events if e.logprobs), [])
    tops = sum((e.top_logprobs for e in events if e.top_logprobs), [])
    full = torch.log_softmax(model.forward(torch.tensor(job.tokens[:-1])), -1)[8:]
    for i, t in enumerate(job.output_ids):
        assert lps[i] == pytest.approx(float(full[i, t]), abs=1e-4)
        assert tops[i][0][0] == t  # greedy: the chosen token is the most likely
    assert len(tops[0]) == 3


def test_text_prompt_and_convenience_api(model):
    gen = Generator(model, max_batch_size=2, max_seq_len=128)
    text = gen.generate("Hello there", max_new_tokens=10, stop_tokens=[])
    streamed = "".join(gen.stream("Hello there", max_new_tokens=10, stop_tokens=[]))
    assert text == streamed and len(text) > 0


def test_async_generator(model, ids):
    from exl3_triton import AsyncGenerator

    prompts = [ids[:7], ids[30:38]]
    expect = [run_alone(model, p, 6).output_ids for p in prompts]

    async def main():
        agen = AsyncGenerator(Generator(model, max_batch_size=2, max_seq_len=64))

        async def collect(p):
            toks = []
            async for ev in agen.submit(Job(p, max_new_tokens=6, stop_tokens=[])):
                toks += ev.token_ids
            return toks

        return await asyncio.gather(*(collect(p) for p in prompts))

    assert asyncio.run(main()) == expect
