"""TabbyAPI container: driven the way TabbyAPI's common/model.py and endpoints drive it (stand-ins for
TabbyAPI's own modules in tabby_standins.py), on the golden tiny EXL3 model."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import sys
import types

import pytest

from exl3_triton import Generator, load
from exl3_triton.errors import InvalidArgumentError
from exl3_triton.integrations import tabby
from exl3_triton.integrations.tabby import Exl3TritonContainer
from exl3_triton.integrations.tabby_options import draft_options, tabby_options
from exl3_triton.runtime.drafting_options import DraftOptions

from . import tabby_standins as host

MODEL = "llama_k4_mcg"
PROMPT = "The quick brown fox"

# §1.3b of host-integrations.md: what endpoints and common/model.py use on common.model.container,
# plus the abstract members of the older BaseModelContainer (§1.3a).
REQUIRED_METHODS = ["create", "load_gen", "load", "unload", "wait_for_jobs", "encode_tokens", "decode_tokens",
                    "get_special_tokens", "model_info", "validate_context_length", "stream_generate", "generate",
                    "constrain_generation_output", "load_loras", "get_loras"]
REQUIRED_ATTRIBUTES = ["use_draft_model", "use_vision", "loaded", "model", "model_dir", "draft_model_dir",
                       "prompt_template", "tool_format", "reasoning", "reasoning_start_token", "reasoning_end_token",
                       "start_in_reasoning", "tool_calls_in_reasoning", "reasoning_budget_tokens",
                       "reasoning_budget_message", "template_vars_default", "template_vars_force", "harmony",
                       "muse_glimmer", "hf_model", "active_job_ids", "load_lock", "load_condition",
                       "force_enable_thinking"]
CHUNK_KEYS = {"request_id", "text", "token_ids", "prompt_tokens", "generated_tokens", "offset"}
FINISH_KEYS = {"request_id", "prompt_tokens", "prompt_time", "prompt_tokens_per_sec", "gen_tokens", "gen_time",
               "gen_tokens_per_sec", "total_time", "queue_time", "cached_tokens", "finish_reason", "eos_reason",
               "stop_str", "full_text"}


@pytest.fixture
def tabby_host(monkeypatch):
    host.install_host_modules(monkeypatch)


@pytest.fixture(scope="module")
def container(golden):
    """One container loaded through TabbyAPI's load sequence, shared by the tests of this module."""
    mp = pytest.MonkeyPatch()
    host.install_host_modules(mp)
    c, phases = asyncio.run(host.drive_load(Exl3TritonContainer, golden / "exl3" / MODEL, max_seq_len=256,
                                            cache_size=512, max_batch_size=2, chunk_size=64,
                                            draft_model={"draft_mode": "disabled"}))
    c.phases = phases
    yield c
    asyncio.run(c.unload())
    mp.undo()


async def until_idle(container):
    """TabbyAPI's event loop keeps running after a request ends: the generator's driver finishes
    cancelled jobs at its next step. Wait for that inside the same loop."""
    gen = container.generator.generator
    for _ in range(1000):
        if not gen.has_work:
            return gen
        await asyncio.sleep(0.01)
    raise AssertionError("the generator kept a job")


def wait_idle(container):
    return asyncio.run(until_idle(container))


def test_container_has_every_member_tabby_uses(container):
    for name in REQUIRED_METHODS:
        assert callable(getattr(container, name)), name
    for name in REQUIRED_ATTRIBUTES:
        assert hasattr(container, name), name
    # OAI endpoints pass disconnect_handler as the 4th positional; Kobold passes abort_event=; both work
    sig = inspect.signature(Exl3TritonContainer.stream_generate)
    assert list(sig.parameters)[1:6] == ["request_id", "prompt", "params", "disconnect_handler", "mm_embeddings"]
    assert "abort_event" in sig.parameters and "filter_trigger" in sig.parameters
    assert list(inspect.signature(Exl3TritonContainer.generate).parameters)[1:6] == \
        ["request_id", "prompt", "params", "abort_event", "mm_embeddings"]
    assert inspect.isasyncgenfunction(Exl3TritonContainer.load_gen)
    assert inspect.iscoroutinefunction(Exl3TritonContainer.create.__func__)


def test_load_reports_one_phase_from_zero_to_n(container):
    phases = container.phases
    assert phases[0][0] == 0 and phases[-1][0] == phases[-1][1]
    assert [p[0] for p in phases] == sorted({p[0] for p in phases}), "progress must increase"
    assert {p[2] for p in phases} == {"model"} and sum(p[0] == p[1] for p in phases) == 1
    assert container.loaded and container.model is not None


def test_model_info_is_a_model_card(container):
    card = container.model_info()
    assert card.id == MODEL
    p = card.parameters
    assert (p.max_seq_len, p.cache_size, p.max_batch_size, p.chunk_size) == (256, 512, 2, 64)
    assert p.prompt_template == MODEL and "assistant" in p.prompt_template_content


def test_tokens_and_special_tokens(container):
    tok = container.model.tokenizer
    ids = container.encode_tokens(PROMPT, add_bos_token=True, encode_special_tokens=True,
                                  decode_special_tokens=True)
    assert ids == tok.encode(PROMPT, add_bos=True) and ids[0] == tok.bos_token_id
    assert container.encode_tokens(PROMPT, add_bos_token=False) == tok.encode(PROMPT, add_bos=False)
    assert container.decode_tokens(ids[1:], decode_special_tokens=True) == PROMPT
    cfg = json.loads((container.model_dir / "tokenizer_config.json").read_text())
    assert container.get_special_tokens() == {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    assert container.get_special_tokens(add_bos_token=False, ban_eos_token=True)["bos_token"] == ""


def test_stream_is_openai_shaped_and_matches_the_generator(container, golden):
    handler = host.DisconnectHandler(host.FakeRequest())
    params = host.SamplerRequest(max_tokens=6, temperature=0.0, ban_eos_token=True)
    out = asyncio.run(host.openai_stream(container, "req-1", PROMPT, params, handler))
    gens = [g for _, g in out]
    assert all(CHUNK_KEYS <= set(g) for g in gens[:-1]) and gens[:-1]
    finishes = [g for g in gens if "finish_reason" in g]
    assert len(finishes) == 1 and finishes[0] is gens[-1], "one finish chunk, last"
    final = gens[-1]
    assert FINISH_KEYS <= set(final) and final["finish_reason"] == "length" and final["eos_reason"] == "max_new_tokens"
    text = "".join(g["text"] for g in gens[:-1])
    assert final["full_text"] == text
    assert sum(len(g["token_ids"]) for g in gens[:-1]) == final["gen_tokens"] == 6
    usage = out[-1][0]["usage"]
    ids = container.encode_tokens(PROMPT)
    assert usage["prompt_tokens"] == len(ids) and usage["completion_tokens"] == 6
    assert usage["total_tokens"] == len(ids) + 6 and usage["total_time"] >= usage["completion_time"] >= 0
    assert [c["choices"][0]["finish_reason"] for c, _ in out] == [None] * (len(out) - 1) + ["length"]
    # independent oracle: the package's own generator, greedy, on a fresh load
    model = load(golden / "exl3" / MODEL)
    eos = model.tokenizer.eos_token_ids
    from exl3_triton import SamplingParams

    expected = Generator(model, max_seq_len=256).generate(ids, max_new_tokens=6, stop_tokens=[],
                                                           sampling=SamplingParams(banned_tokens=tuple(eos)))
    assert text == expected
    assert handler.cleanup_tasks == {}, "finish() must remove the cleanup task"
    wait_idle(container)


def test_disconnect_mid_stream_frees_the_job(container):
    gen = container.generator.generator
    free = gen.cache.num_free_pages
    request = host.FakeRequest()
    handler = host.DisconnectHandler(request)
    params = host.SamplerRequest(max_tokens=40, temperature=0.0, ban_eos_token=True)

    async def consume():
        got = 0
        with pytest.raises(asyncio.CancelledError):
            async for chunk in container.stream_generate("req-2", PROMPT, params, handler, None):
                got += 1
                if got == 2:
                    request.disconnect = True
        await until_idle(container)
        return got

    assert asyncio.run(consume()) == 2
    assert handler.cleaned == 1, "the job's cleanup task ran"
    gen = container.generator.generator
    assert not gen.running and not gen.waiting and gen.cache.num_free_pages == free
    assert container.active_job_ids == {}


def test_kobold_abort_event_stops_and_frees(container):
    gen = container.generator.generator
    free = gen.cache.num_free_pages
    params = host.SamplerRequest(max_tokens=40, temperature=0.0, ban_eos_token=True)

    async def consume():
        abort = asyncio.Event()
        chunks = []
        async for chunk in container.stream_generate(request_id="kai", prompt=PROMPT, params=params,
                                                     abort_event=abort):
            chunks.append(chunk)
            abort.set()
        await until_idle(container)
        return chunks

    chunks = asyncio.run(consume())
    assert len(chunks) == 1 and "finish_reason" not in chunks[0]
    assert not gen.running and gen.cache.num_free_pages == free


def test_generate_merges_the_stream(container):
    params = host.SamplerRequest(max_tokens=5, temperature=0.0, ban_eos_token=True, logprobs=2)
    result = asyncio.run(container.generate("req-3", PROMPT, params))
    assert result["finish_reason"] == "length" and result["text"] == result["full_text"]
    assert result["generated_tokens"] == 5 and result["gen_tokens"] == 5
    logprobs = [lp for chunk in result["logprobs"] for lp in chunk]
    assert len(logprobs) == 5 and all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in logprobs)
    # the sampled (greedy) token is the most likely one
    assert all(lp.token_id == lp.top_logprobs[0].token_id for lp in logprobs)
    wait_idle(container)


def test_context_length_is_checked_before_streaming(container):
    long_prompt = " ".join(["fox"] * 300)
    with pytest.raises(host.ContextLengthExceededError):
        container.validate_context_length(long_prompt, host.SamplerRequest(), None)
    container.validate_context_length(PROMPT, host.SamplerRequest(max_tokens=10), None)


def test_grammar_requests_are_refused(container):
    params = host.SamplerRequest(max_tokens=3, json_schema={"type": "object"})

    async def consume():
        return [c async for c in container.stream_generate("req-4", PROMPT, params, None)]

    with pytest.raises(InvalidArgumentError, match="json_schema"):
        asyncio.run(consume())


# ---------------------------------------------------------------- options


def test_draft_model_block_maps_to_draft_options():
    assert draft_options({"draft_mode": "mtp", "draft_num_tokens": 2, "dynamic_draft": True}) == \
        (DraftOptions(mode="mtp", num_tokens=2, dynamic=True), None)
    assert draft_options({"draft_mode": "ngram", "ngram_match_min": 3, "ngram_max": 6})[0] == \
        DraftOptions(mode="ngram", ngram_min=3, ngram_max=6)
    assert draft_options({"draft_mode": "disabled"})[0] == DraftOptions(mode="disabled")
    # plugin key: the DSpark drafter's confidence gate (ExLlamaV3 reads it from an environment variable)
    assert draft_options({"draft_mode": "mtp", "draft_confidence": 0.5})[0] == \
        DraftOptions(mode="mtp", confidence_threshold=0.5)
    # TabbyAPI's default mode is "model", which means nothing without a draft model name
    assert draft_options({})[0] == DraftOptions(mode="disabled")
    opts, path = draft_options({"draft_model_name": "small", "draft_model_dir": "/m", "draft_num_tokens": 4})
    assert opts == DraftOptions(mode="model", model_dir="/m/small", num_tokens=4) and path == "/m/small"


def test_model_block_maps_like_tabbyapi():
    o = tabby_options({"max_seq_len": 4096, "cache_size": 2048, "chunk_size": 256, "max_batch_size": 4,
                       "gpu_split": [20, 24], "draft_model": {"draft_mode": "ngram"}}, model_max_seq_len=8192)
    h = o.host
    assert (h.max_seq_len, h.cache_tokens, h.chunk_size, h.max_batch_size) == (2048, 2048, 256, 4)
    assert h.gpu_split == [20.0, 24.0] and h.draft.mode == "ngram" and h.draft.ngram_min == 2
    d = tabby_options({}, model_max_seq_len=1024).host
    assert (d.max_seq_len, d.cache_tokens, d.gpu_split) == (1024, 1024, None)
    assert tabby_options({}, model_max_seq_len=None).host.max_seq_len == 8192
    assert tabby_options({}, model_max_seq_len=512, gpu_count=2).host.gpu_split == "auto"
    assert tabby_options({"gpu_split_auto": False}, model_max_seq_len=512, gpu_count=2).host.gpu_split is None


def test_unknown_and_unsupported_options_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="exl3_triton.integrations"):
        tabby_options({"max_seq_len": 512, "model_name": "x", "backend": "", "cache_mode": "Q4",
                       "made_up_key": 1, "draft_model": {"draft_mode": "mtp", "draft_typo": 2,
                                                         "draft_rope_scale": 1.0}},
                      model_max_seq_len=512)
    text = caplog.text
    assert "model.made_up_key" in text and "draft_model.draft_typo" in text and "cache_mode='Q4'" in text
    # TabbyAPI's own keys pass silently (draft_rope_scale defaults to 1.0 in TabbyAPI's config)
    assert "model_name" not in text and "backend" not in text and "rope" not in text


@pytest.mark.parametrize("kwargs, key", [
    ({"max_seq_len": "lots"}, "max_seq_len"),
    ({"cache_size": -5}, "cache_size"),
    ({"gpu_split": ["x"]}, "gpu_split"),
    ({"kernel_backend": "cuda"}, "kernel_backend"),
    ({"draft_model": {"draft_mode": "turbo"}}, "draft_mode"),
    ({"draft_model": {"draft_mode": "mtp", "draft_num_tokens": 99}}, "draft_num_tokens"),
    ({"draft_model": {"draft_mode": "ngram", "ngram_match_min": 5, "ngram_max": 2}}, "ngram_max"),
    ({"draft_model": {"draft_mode": "mtp", "draft_confidence": 1.5}}, "draft_confidence"),
    ({"draft_model": {"draft_mode": "mtp", "draft_confidence": "high"}}, "draft_confidence"),
])
def test_wrong_values_name_the_option(kwargs, key):
    with pytest.raises(InvalidArgumentError, match=key):
        tabby_options(kwargs, model_max_seq_len=512)


@pytest.mark.parametrize("block, mode", [
    ({"draft_mode": "ngram"}, "ngram"),
    ({"draft_mode": "model", "draft_model_name": "small"}, "model"),
    ({}, "model"),  # TabbyAPI's default mode: no drafting without a draft model name
    ({"draft_mode": "disabled"}, "disabled"),
])
def test_draft_confidence_outside_block_drafting_is_an_error(block, mode):
    """Only mode mtp's block drafter reads ``draft_confidence``: elsewhere the load fails naming the
    option and the mode instead of ignoring what the user asked for."""
    with pytest.raises(InvalidArgumentError, match=rf"draft_model\.draft_confidence=0\.5 .*draft mode '{mode}'"):
        tabby_options({"draft_model": {**block, "draft_confidence": 0.5}}, model_max_seq_len=512)
    tabby_options({"draft_model": block}, model_max_seq_len=512)  # the same block without it loads


def test_unsupported_models_are_reported_not_crashed(tmp_path, golden, tabby_host):
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                  "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="gptq"):
        asyncio.run(Exl3TritonContainer.create(gptq, None))
    alien = tmp_path / "alien"
    alien.mkdir()
    for f in ("model.safetensors", "tokenizer.json"):
        (alien / f).write_bytes((golden / "exl3" / MODEL / f).read_bytes())
    cfg = json.loads((golden / "exl3" / MODEL / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**cfg, "architectures": ["AlienForCausalLM"]}))
    with pytest.raises(ValueError, match="AlienForCausalLM"):
        asyncio.run(Exl3TritonContainer.create(alien, None))
    with pytest.raises(ValueError, match="does not exist"):
        asyncio.run(Exl3TritonContainer.create(tmp_path / "missing", None))
    with pytest.raises(ValueError, match="no MTP draft layers"):
        asyncio.run(host.drive_load(Exl3TritonContainer, golden / "exl3" / MODEL, max_seq_len=64,
                                    draft_model={"draft_mode": "mtp"}))


def test_install_swaps_the_container_into_common_model(monkeypatch, caplog):
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    def validate_backend(backend, hf_model):  # TabbyAPI's: refuses anything without exllamav3
        raise ValueError(f"Invalid backend '{backend}'")

    class Deps:
        exllamav3 = False

    async def load_model(model_path, **kwargs):  # stands for TabbyAPI's: create() refuses the model
        raise InvalidArgumentError(f"exl3-triton cannot load {model_path}: quantized with 'gptq'")

    module("common", __path__=[])
    model_module = module("common.model", ExllamaV3Container=object, validate_backend=validate_backend,
                          _BACKEND_REGISTRY={}, load_model=load_model)
    module("common.optional_dependencies", dependencies=Deps())
    tabby.install()
    assert model_module.ExllamaV3Container is Exl3TritonContainer
    for backend in (None, "", "exllamav3", "exl3-triton"):
        model_module.validate_backend(backend, None)
    with pytest.raises(ValueError):
        model_module.validate_backend("exllamav2", None)
    assert model_module._BACKEND_REGISTRY["exl3-triton"] is Exl3TritonContainer
    assert sys.modules["common.optional_dependencies"].dependencies.exllamav3 is True
    # start-up load (main.py passes model_name): reported, the server goes on without a model
    with caplog.at_level(logging.ERROR, logger="exl3_triton.integrations"):
        asyncio.run(model_module.load_model("models/bad", model_name="bad", draft_model={}))
    assert "gptq" in caplog.text
    with pytest.raises(InvalidArgumentError):  # an inline load still fails for its request
        asyncio.run(model_module.load_model("models/bad", draft_model={}))


def test_stop_strings_and_sampler_mapping(container):
    greedy = asyncio.run(container.generate("g", PROMPT, host.SamplerRequest(max_tokens=8, temperature=0.0,
                                                                                 ban_eos_token=True)))
    text = greedy["text"]
    stop = text[3:5]
    assert len(stop) == 2 and text.find(stop) == 3
    stopped = asyncio.run(container.generate("s", PROMPT, host.SamplerRequest(
        max_tokens=8, temperature=0.0, ban_eos_token=True, stop=[stop])))
    assert stopped["text"] == text[:3] and stopped["finish_reason"] == "stop"
    assert stopped["eos_reason"] == "stop_string"
    # top_k 1 keeps only the most likely token: the same text as greedy, whatever the temperature
    top1 = asyncio.run(container.generate("k", PROMPT, host.SamplerRequest(max_tokens=8, temperature=1.5, top_k=1,
                                                                           ban_eos_token=True)))
    assert top1["text"] == text
    wait_idle(container)


def test_ngram_drafting_through_the_container(golden):
    """TabbyAPI's draft_model block switches on speculative decoding: same greedy text as without,
    and the finish chunk counts accepted and rejected drafts."""
    mp = pytest.MonkeyPatch()
    host.install_host_modules(mp)
    try:
        c, _ = asyncio.run(host.drive_load(Exl3TritonContainer, golden / "exl3" / MODEL, max_seq_len=256,
                                           cache_size=512, max_batch_size=2, chunk_size=64,
                                           draft_model={"draft_mode": "ngram", "draft_num_tokens": 3}))
        prompt = "the cat the cat the cat the cat"
        params = host.SamplerRequest(max_tokens=24, temperature=0.0, ban_eos_token=True)
        out = asyncio.run(host.openai_stream(c, "req-d", prompt, params, host.DisconnectHandler(host.FakeRequest())))
        final = out[-1][1]
        assert final["draft_accept"] + final["draft_reject"] > 0 and final["draft_accept"] > 0
        text = final["full_text"]
        asyncio.run(c.unload())
    finally:
        mp.undo()
    model = load(golden / "exl3" / MODEL)
    plain = Generator(model, max_batch_size=1, max_seq_len=256)
    from exl3_triton import SamplingParams

    ids = c.encode_tokens(prompt)
    banned = tuple(model.tokenizer.eos_token_ids)  # ban_eos_token
    assert text == plain.generate(ids, max_new_tokens=24, stop_tokens=[], sampling=SamplingParams(banned_tokens=banned))
