"""Minimal stand-ins for the TabbyAPI modules the container imports, with TabbyAPI's names, fields and
semantics (theroyallab/tabbyAPI e632af4, 2026-08): strict classes, so a wrong field name fails.

``drive_load`` and ``openai_stream`` replay what TabbyAPI's ``common/model.py:load_model_gen`` and
``endpoints/OAI/utils/completion.py`` do with the container, step for step.
"""

from __future__ import annotations

import asyncio
import sys
import types
from dataclasses import dataclass, field

# ---------------------------------------------------------------- common.errors


class ContextLengthExceededError(ValueError):
    pass


def validate_context_requirements(context_len, max_seq_len, max_tokens, cache_capacity, max_rq_tokens=None,
                                  allocation_boundary=256):
    if context_len > max_seq_len:
        raise ContextLengthExceededError(f"Prompt length {context_len} exceeds {max_seq_len}")
    if max_tokens <= 0:
        max_tokens = max_seq_len - context_len - 1
    if max_rq_tokens is not None:
        required = ((context_len - 1 + max_rq_tokens + allocation_boundary - 1) // allocation_boundary) \
            * allocation_boundary
    else:
        required = context_len + max_tokens
    if required > cache_capacity:
        raise ContextLengthExceededError(f"Initial job allocation requires {required} cache tokens")


# ---------------------------------------------------------------- endpoints.core.types.model


@dataclass
class ModelCardParameters:
    max_seq_len: int | None = None
    cache_size: int | None = None
    cache_mode: str | None = "FP16"
    rope_scale: float | None = 1.0
    rope_alpha: float | None = 1.0
    max_batch_size: int | None = 1
    chunk_size: int | None = 2048
    prompt_template: str | None = None
    prompt_template_content: str | None = None
    use_vision: bool | None = False
    draft: object = None

    def __setattr__(self, name, value):  # pydantic models reject unknown fields
        if name not in self.__dataclass_fields__:
            raise AttributeError(f"ModelCardParameters has no field {name!r}")
        object.__setattr__(self, name, value)


@dataclass
class ModelCard:
    id: str = "test"
    object: str = "model"
    owned_by: str = "tabbyAPI"
    parameters: ModelCardParameters | None = None


# ---------------------------------------------------------------- endpoints.OAI.types.chat_completion


@dataclass
class ChatCompletionLogprobLeaf:
    token: str
    logprob: float
    token_id: int | None = None


@dataclass
class ChatCompletionLogprob:
    token: str
    logprob: float
    token_id: int | None = None
    top_logprobs: list = field(default_factory=list)


# ---------------------------------------------------------------- common.templating


@dataclass
class PromptTemplate:
    name: str
    raw_template: str


async def find_prompt_template(name, model_dir):
    import json

    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    if "chat_template" not in cfg:
        raise LookupError("no template")
    return PromptTemplate(name=name or model_dir.name, raw_template=cfg["chat_template"])


# ---------------------------------------------------------------- common.networking.DisconnectHandler


class FakeRequest:
    """A request that reports a disconnect once ``disconnect`` is set."""

    def __init__(self):
        self.disconnect = False

    async def is_disconnected(self):
        return self.disconnect


class DisconnectHandler:
    """TabbyAPI's handler: strict cleanup-task bookkeeping; poll() raises CancelledError on disconnect."""

    def __init__(self, request):
        self.request = request
        self.abort_event = asyncio.Event()
        self.cleanup_tasks = {}
        self.cleaned = 0

    async def poll(self):
        if await self.request.is_disconnected():
            self.abort_event.set()
            await self.cleanup()
            raise asyncio.CancelledError("Request disconnected")

    async def add_cleanup_task(self, key, func, args):
        assert key not in self.cleanup_tasks
        self.cleanup_tasks[key] = (func, args)

    async def finish(self, key):
        del self.cleanup_tasks[key]

    async def cleanup(self):
        for func, args in self.cleanup_tasks.values():
            await func(*args)  # TabbyAPI awaits: the cleanup must be a coroutine function
            self.cleaned += 1
        self.cleanup_tasks = {}


# ---------------------------------------------------------------- BaseSamplerRequest's fields and defaults


class SamplerRequest(types.SimpleNamespace):
    DEFAULTS = dict(
        max_tokens=None, min_tokens=0, stop=[], banned_strings=[], banned_tokens=[], allowed_tokens=[],
        token_healing=False, temperature=1.0, temperature_last=False, smoothing_factor=0.0, top_k=0, top_p=1.0,
        top_a=0.0, min_p=0.0, tfs=1.0, typical=1.0, skew=0.0, xtc_probability=0.0, xtc_threshold=0.1,
        frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0, penalty_range=-1,
        repetition_decay=0, dry_multiplier=0.0, dry_base=1.75, dry_allowed_length=2, dry_range=0,
        dry_sequence_breakers=[], mirostat_mode=0, mirostat_tau=1.5, mirostat_eta=0.3, add_bos_token=None,
        ban_eos_token=False, logit_bias=None, json_schema=None, regex_pattern=None, grammar_string=None,
        max_temp=None, min_temp=None, temp_exponent=1.0, logprobs=0, top_logprobs=0, adaptive_target=1.0,
        adaptive_decay=0.9, loop_detect_window=None,
    )

    def __init__(self, **kw):
        unknown = set(kw) - set(self.DEFAULTS)
        assert not unknown, f"not BaseSamplerRequest fields: {unknown}"
        super().__init__(**{**self.DEFAULTS, **kw})


# ---------------------------------------------------------------- install / replay


def install_host_modules(monkeypatch) -> None:
    """Put the stand-ins into sys.modules under TabbyAPI's module names."""
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    for pkg in ("common", "endpoints", "endpoints.core", "endpoints.core.types", "endpoints.OAI",
                "endpoints.OAI.types"):
        module(pkg, __path__=[])
    module("common.errors", ContextLengthExceededError=ContextLengthExceededError,
           validate_context_requirements=validate_context_requirements)
    module("common.templating", find_prompt_template=find_prompt_template, PromptTemplate=PromptTemplate)
    module("common.networking", DisconnectHandler=DisconnectHandler)
    module("endpoints.core.types.model", ModelCard=ModelCard, ModelCardParameters=ModelCardParameters)
    module("endpoints.OAI.types.chat_completion", ChatCompletionLogprob=ChatCompletionLogprob,
           ChatCompletionLogprobLeaf=ChatCompletionLogprobLeaf)


async def drive_load(container_cls, model_path, **kwargs):
    """``common.model.load_model_gen``'s use of the container: create, phases, load_gen, index walk."""
    container = await container_cls.create(model_path.resolve(), None, **kwargs)
    model_type = ["model"]
    if container.use_draft_model:
        model_type.insert(0, "draft")
    if container.use_vision:
        model_type.insert(0, "vision")
    seen, index, started = [], 0, set()
    async for module, modules in container.load_gen(None, **kwargs):
        current = model_type[index]  # IndexError here = a phase TabbyAPI did not expect
        if module == 0:
            started.add(current)
        else:
            assert current in started, "a phase must start at module 0"
        seen.append((module, modules, current))
        if module == modules:
            index += 1
    return container, seen


def usage_stats(generation: dict):
    """``endpoints/OAI/utils/common_.py:get_usage_stats``."""
    if "finish_reason" not in generation:
        return None
    prompt_tokens = generation.get("prompt_tokens", 0)
    completion_tokens = generation.get("gen_tokens", 0)
    return dict(prompt_tokens=prompt_tokens, prompt_time=generation.get("prompt_time"),
                prompt_tokens_per_sec=generation.get("prompt_tokens_per_sec"), completion_tokens=completion_tokens,
                completion_time=generation.get("gen_time"),
                completion_tokens_per_sec=generation.get("gen_tokens_per_sec"),
                total_tokens=prompt_tokens + completion_tokens, total_time=generation.get("total_time"))


async def openai_stream(container, request_id, prompt, params, disconnect_handler):
    """The completion endpoint's collector + composer: OpenAI ``text_completion`` chunks, usage on the last."""
    out = []
    async for generation in container.stream_generate(request_id, prompt, params, disconnect_handler, None):
        finish_reason = generation.get("finish_reason")
        chunk = {"id": f"cmpl-{request_id}", "object": "text_completion",
                 "choices": [{"index": 0, "text": generation.get("text", ""), "finish_reason": finish_reason}]}
        if finish_reason:
            chunk["usage"] = usage_stats(generation)
        out.append((chunk, generation))
        if finish_reason:
            break
    return out
