"""TabbyAPI backend: ``Exl3TritonContainer``, a drop-in for TabbyAPI's ``ExllamaV3Container``.

TabbyAPI (at 2026-08) has no backend registry: ``common.model.load_model_gen`` instantiates the
module global ``ExllamaV3Container`` and the endpoints call a duck-typed set of members on
``common.model.container``. ``install()`` (run by ``exl3-triton tabby TABBY_DIR``) swaps our class
in; on older checkouts with ``_BACKEND_REGISTRY`` it is also registered as backend
``exl3-triton``. The class also keeps the older ``BaseModelContainer`` interface (``load``,
``stream_generate(..., abort_event=...)``, ``generate``, ``wait_for_jobs``).

Lifecycle, as TabbyAPI drives it: ``await Cls.create(path, hf_model, **kwargs)`` (options only, no
weights) -> ``async for module, modules in c.load_gen(cb, **kwargs)`` (one progress phase from 0 to
N) -> ``stream_generate`` / ``generate`` -> ``await c.unload(skip_wait=..., shutdown=...)``.
TabbyAPI's own types (``ModelCard``, ``ChatCompletionLogprob``, ``ContextLengthExceededError``) are
imported from the running TabbyAPI when needed, never at import time.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import pathlib
from typing import Any, AsyncIterator

from ..errors import Exl3TritonError, InvalidArgumentError
from .common import HostOptions, ProgressPhase, check_model_dir, draft_counts, load_model, log
from .tabby_options import tabby_options

BACKEND_NAME = "exl3-triton"
# finish reasons of our jobs -> OpenAI's
_FINISH_REASON = {"stop_token": "stop", "stop_string": "stop", "max_new_tokens": "length", "max_seq_len": "length"}
# BaseSamplerRequest fields this package cannot honour, with their "off" values
_UNSUPPORTED_SAMPLING = {
    "temperature_last": False, "smoothing_factor": 0.0, "top_a": 0.0, "tfs": 1.0, "typical": 1.0, "skew": 0.0,
    "xtc_probability": 0.0, "dry_multiplier": 0.0, "mirostat_mode": 0, "max_temp": None, "min_temp": None,
    "adaptive_target": 1.0, "token_healing": False, "banned_strings": None, "allowed_tokens": None,
    "loop_detect_window": None,
}


def _host(module: str):
    """A TabbyAPI module (the caller runs inside TabbyAPI)."""
    return importlib.import_module(module)


def _param(params, name: str, default=None):
    value = getattr(params, name, default)
    return default if value is None else value


class Exl3TritonContainer:
    """A loaded (or loading) model, as TabbyAPI's endpoints see it."""

    # what TabbyAPI reads before and after load
    model_dir: pathlib.Path = pathlib.Path("models")
    draft_model_dir: pathlib.Path | None = None
    prompt_template = None
    use_draft_model: bool = False  # a separate draft model would be a second progress phase; we load one
    use_vision: bool = False
    loaded: bool = False
    model = None
    generator = None  # exl3_triton AsyncGenerator once loaded
    tokenizer = None

    def __init__(self):
        self.active_job_ids: dict[str, Any] = {}
        self.load_lock = asyncio.Lock()
        self.load_condition = asyncio.Condition()
        self.options = HostOptions()
        self.hf_model = None

    # ------------------------------------------------------------------ create / load

    @classmethod
    async def create(cls, model_directory: pathlib.Path, hf_model=None, **kwargs) -> "Exl3TritonContainer":
        """Check the directory and read the options; loads no weights. Raises ValueError (an
        ``InvalidArgumentError``) naming the directory or option for anything we cannot run."""
        from ..tokenizer import Tokenizer

        self = cls()
        self.model_dir = pathlib.Path(model_directory)
        self.hf_model = hf_model
        check_model_dir(self.model_dir)
        config = json.loads((self.model_dir / "config.json").read_text())
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        model_len = config.get("max_position_embeddings") or text_config.get("max_position_embeddings")
        import torch

        opts = tabby_options(kwargs, model_max_seq_len=model_len,
                             gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0)
        self.options = opts.host
        if opts.draft_model_dir is not None:
            self.draft_model_dir = pathlib.Path(opts.draft_model_dir)
            check_model_dir(self.draft_model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        for key, value in opts.template.items():
            setattr(self, key, value)
        self.prompt_template = await self._find_template(kwargs.get("prompt_template"))
        if self.harmony is None:  # the token set of gpt-oss's format, as TabbyAPI detects it
            self.harmony = all(self._single_id(t) is not None
                               for t in ("<|channel|>", "<|message|>", "<|call|>", "<|return|>"))
        if self.muse_glimmer is None:
            self.muse_glimmer = not self.harmony and all(
                self._single_id(t) is not None for t in ("<|start|>", "<|message|>", "<|eom|>", "<|eot|>"))
        return self

    async def _find_template(self, name):
        try:
            templating = _host("common.templating")
        except ImportError:
            return None
        try:
            return await templating.find_prompt_template(name, self.model_dir)
        except Exception as e:  # TabbyAPI disables chat completions when no template is found
            log.warning("no prompt template for %s (%s); chat completions are disabled", self.model_dir.name, e)
            return None

    def _single_id(self, text: str) -> int | None:
        ids = self.tokenizer.encode(text, add_bos=False, special=False)
        return ids[0] if len(ids) == 1 and self.tokenizer.id_to_piece(ids[0]) == text else None

    @property
    def max_seq_len(self) -> int:
        return self.options.max_seq_len

    @property
    def cache_size(self) -> int:
        return self.options.cache_tokens

    @property
    def chunk_size(self) -> int:
        return self.generator.generator.chunk_size if self.generator else (self.options.chunk_size or 512)

    @property
    def max_batch_size(self) -> int:
        return self.generator.generator.max_batch_size if self.generator else (self.options.max_batch_size or 8)

    async def load_gen(self, progress_callback=None, **kwargs) -> AsyncIterator[tuple[int, int]]:
        """Load the weights in a worker thread, yielding ``(module, modules)`` from ``(0, N)`` to ``(N, N)``."""
        from ..runtime.async_generator import AsyncGenerator

        async with self.load_lock:
            await self.wait_for_jobs(kwargs.get("skip_wait"))
            loop = asyncio.get_running_loop()
            updates: asyncio.Queue = asyncio.Queue()
            phase = ProgressPhase()

            def progress(done, total):
                loop.call_soon_threadsafe(updates.put_nowait, (done, total))

            task = loop.run_in_executor(None, lambda: load_model(self.model_dir, self.options, progress))
            while not (task.done() and updates.empty()):
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    for value in phase.feed(*getter.result()):
                        yield value
                else:
                    getter.cancel()
            self.model, generator = task.result()  # raises what the load raised
            self.generator = AsyncGenerator(generator)
            for value in phase.finish():
                yield value
            self.loaded = True
        async with self.load_condition:
            self.load_condition.notify_all()

    async def load(self, progress_callback=None, **kwargs) -> None:
        """The older interface: load without reporting progress."""
        async for _ in self.load_gen(progress_callback, **kwargs):
            pass

    async def wait_for_jobs(self, skip_wait: bool = False) -> None:
        """Wait for running requests to end; ``skip_wait``: cancel them first."""
        if skip_wait:
            for job in self.active_job_ids.values():
                if job is not None:
                    job.cancel()
        while self.active_job_ids:
            await asyncio.sleep(0.01)

    async def unload(self, loras_only: bool = False, **kwargs) -> None:
        if loras_only:
            return
        shutdown = kwargs.get("shutdown")
        if not shutdown:
            await self.load_lock.acquire()
        try:
            if not shutdown:
                await self.wait_for_jobs(kwargs.get("skip_wait"))
            self.loaded = False
            self.generator = None
            self.model = None
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        finally:
            if not shutdown:
                self.load_lock.release()
                async with self.load_condition:
                    self.load_condition.notify_all()

    async def load_loras(self, lora_directory, **kwargs) -> dict:
        log.error("exl3-triton does not load LoRAs")
        return {"success": [], "failure": [lora.get("name", "unknown") for lora in kwargs.get("loras", [])]}

    def get_loras(self) -> list:
        return []

    # ------------------------------------------------------------------ tokens and model card

    def _add_bos(self, value) -> bool:
        if value is not None:
            return bool(value)
        if self.hf_model is not None and hasattr(self.hf_model, "add_bos_token"):
            return bool(self.hf_model.add_bos_token())
        return self.tokenizer.add_bos

    def encode_tokens(self, text: str, **kwargs) -> list[int]:
        """Keys: add_bos_token, encode_special_tokens, embeddings (images: not supported)."""
        embeddings = kwargs.get("embeddings")
        if embeddings is not None and getattr(embeddings, "content", None):
            raise InvalidArgumentError("exl3-triton has no vision support; the request carries images")
        special = kwargs.get("encode_special_tokens")
        return self.tokenizer.encode(text, add_bos=self._add_bos(kwargs.get("add_bos_token")),
                                     special=True if special is None else bool(special))

    def decode_tokens(self, ids: list[int], **kwargs) -> str:
        special = kwargs.get("decode_special_tokens")
        return self.tokenizer.decode(ids, skip_special_tokens=special is False)

    def get_special_tokens(self, add_bos_token: bool = True, ban_eos_token: bool = False) -> dict[str, str]:
        tok = self.tokenizer
        names = tok.special_tokens

        def text(name: str, token_id) -> str:
            if name in names:
                return names[name]
            return (tok.id_to_piece(token_id) or "") if token_id is not None else ""

        eos_id = tok.eos_token_ids[0] if tok.eos_token_ids else None
        return {
            "bos_token": text("bos_token", tok.bos_token_id) if add_bos_token else "",
            "eos_token": text("eos_token", eos_id) if not ban_eos_token else "",
            "pad_token": text("pad_token", tok.pad_token_id),
            "unk_token": text("unk_token", None),
        }

    def model_info(self):
        types = _host("endpoints.core.types.model")
        params = types.ModelCardParameters(
            max_seq_len=self.max_seq_len, cache_size=self.cache_size, cache_mode="FP16",
            max_batch_size=self.max_batch_size, chunk_size=self.chunk_size, use_vision=False,
        )
        if self.prompt_template is not None:
            params.prompt_template = self.prompt_template.name
            params.prompt_template_content = self.prompt_template.raw_template
        if self.draft_model_dir is not None:
            params.draft = types.ModelCard(id=self.draft_model_dir.name)
        return types.ModelCard(id=self.model_dir.name, parameters=params)

    def validate_context_length(self, prompt: str, params, mm_embeddings=None) -> None:
        """Raise TabbyAPI's ContextLengthExceededError before a stream commits HTTP 200."""
        errors = _host("common.errors")
        n = len(self.encode_tokens(prompt, add_bos_token=_param(params, "add_bos_token"), embeddings=mm_embeddings))
        if n >= self.max_seq_len:  # the generator needs room for at least one new token
            raise errors.ContextLengthExceededError(
                f"Prompt length {n} exceeds the available context size of {self.max_seq_len - 1} tokens")
        errors.validate_context_requirements(n, self.max_seq_len, _param(params, "max_tokens", 0), self.cache_size,
                                             None, self.generator.generator.cache.page_size if self.generator else 1)

    def constrain_generation_output(self, request_id: str, text: str) -> bool:
        return False  # forcing text into a running job is not supported: TabbyAPI then skips the budget

    # ------------------------------------------------------------------ generation

    def _sampling(self, params):
        from ..runtime.sampling import SamplingParams

        for name, off in _UNSUPPORTED_SAMPLING.items():
            value = getattr(params, name, None)
            if value is not None and value != off and value != [] and value != "":
                log.warning("sampling option %s=%r is not supported by exl3-triton; ignored", name, value)
        for name in ("json_schema", "regex_pattern", "grammar_string"):
            if getattr(params, name, None):
                raise InvalidArgumentError(f"{name}: constrained output is not supported by exl3-triton")
        banned = list(_param(params, "banned_tokens", []))
        if _param(params, "ban_eos_token", False):
            banned += self.tokenizer.eos_token_ids
        top_k = _param(params, "top_k", 0)
        return SamplingParams(
            temperature=float(_param(params, "temperature", 1.0)), top_k=max(int(top_k), 0),
            top_p=float(_param(params, "top_p", 1.0)) or 1.0, min_p=float(_param(params, "min_p", 0.0)),
            repetition_penalty=float(_param(params, "repetition_penalty", 1.0)),
            presence_penalty=float(_param(params, "presence_penalty", 0.0)),
            frequency_penalty=float(_param(params, "frequency_penalty", 0.0)),
            logit_bias={int(k): float(v) for k, v in (_param(params, "logit_bias", {}) or {}).items()},
            banned_tokens=tuple(banned), seed=getattr(params, "seed", None),
        )

    def _job(self, request_id: str, prompt: str, params):
        from ..runtime.job import Job

        ids = self.tokenizer.encode(prompt, add_bos=self._add_bos(_param(params, "add_bos_token")))
        stops = _param(params, "stop", [])
        stops = [stops] if isinstance(stops, str) else list(stops)
        eos = [] if _param(params, "ban_eos_token", False) else list(self.tokenizer.eos_token_ids)
        max_tokens = _param(params, "max_tokens", 0)
        if max_tokens <= 0:  # TabbyAPI: fill the context
            max_tokens = self.max_seq_len - len(ids) - 1
        top = max(_param(params, "logprobs", 0), _param(params, "top_logprobs", 0))
        return Job(ids, max_new_tokens=max(max_tokens, 1), min_new_tokens=_param(params, "min_tokens", 0),
                   sampling=self._sampling(params), stop_strings=[s for s in stops if isinstance(s, str)],
                   stop_tokens=eos + [s for s in stops if isinstance(s, int)], return_logprobs=top > 0,
                   top_logprobs=top, identifier=request_id)

    def _logprobs(self, event) -> list:
        chat = _host("endpoints.OAI.types.chat_completion")
        piece = self.tokenizer.id_to_piece
        out = []
        for i, token_id in enumerate(event.token_ids):
            top = (event.top_logprobs or [None] * len(event.token_ids))[i] or []
            out.append(chat.ChatCompletionLogprob(
                token=piece(token_id) or "", token_id=token_id, logprob=event.logprobs[i],
                top_logprobs=[chat.ChatCompletionLogprobLeaf(token=piece(t) or "", token_id=t, logprob=lp)
                              for t, lp in top]))
        return out

    async def stream_generate(self, request_id: str, prompt: str, params, disconnect_handler=None,
                              mm_embeddings=None, filter_trigger: str | None = None, *, abort_event=None,
                              **kwargs) -> AsyncIterator[dict]:
        """Yield ``{request_id, text, token_ids, prompt_tokens, generated_tokens, offset[, logprobs_content]}``
        chunks, then one finish chunk (``finish_reason``, token counts and timings, ``draft_accept`` /
        ``draft_reject`` when drafting). Stops, cancelling the job, when ``abort_event`` is set or the
        ``disconnect_handler`` reports a disconnect (it raises CancelledError then)."""
        if isinstance(disconnect_handler, asyncio.Event):  # the older interface's positional abort_event
            abort_event, disconnect_handler = disconnect_handler, None
        async with self.load_condition:
            await self.load_condition.wait_for(lambda: not self.load_lock.locked())
        if not self.loaded:
            raise RuntimeError("Model is being unloaded. Cannot process new generation requests.")
        if mm_embeddings is not None and getattr(mm_embeddings, "content", None):
            raise InvalidArgumentError("exl3-triton has no vision support; the request carries images")
        job = self._job(request_id, prompt, params)
        events = self.generator.submit(job)
        self.active_job_ids[request_id] = job

        async def cancel():  # TabbyAPI awaits its cleanup tasks
            job.cancel()

        if disconnect_handler is not None:
            await disconnect_handler.add_cleanup_task(id(job), cancel, ())
        want_logprobs = _param(params, "logprobs", 0) > 0
        text, generated, pending_ids, pending_lp = "", 0, [], []
        try:
            async for event in events:
                if disconnect_handler is not None:
                    await disconnect_handler.poll()
                if abort_event is not None and abort_event.is_set():
                    return
                pending_ids += event.token_ids
                if want_logprobs and event.logprobs is not None:
                    pending_lp += self._logprobs(event)
                if event.text:
                    text += event.text
                    generated += len(pending_ids)
                    chunk = {"request_id": request_id, "text": event.text, "token_ids": pending_ids,
                             "prompt_tokens": len(job.prompt_ids), "generated_tokens": generated,
                             "offset": len(text)}
                    if want_logprobs:
                        chunk["logprobs_content"] = pending_lp
                    pending_ids, pending_lp = [], []
                    yield chunk
                if event.finished:
                    if event.finish_reason == "error":
                        raise RuntimeError(f"generation failed: {event.error}")
                    if event.finish_reason == "cancelled":
                        return
                    if disconnect_handler is not None:
                        await disconnect_handler.finish(id(job))
                    yield self._finish_chunk(job, request_id, text)
                    return
        finally:
            if not job.finished:
                job.cancel()
            await events.aclose()
            self.active_job_ids.pop(request_id, None)

    def _finish_chunk(self, job, request_id: str, full_text: str) -> dict:
        s = job.stats
        queue_time = (s.time_prefill_start or s.time_enqueued) - s.time_enqueued
        started = s.time_first_token is not None and s.time_prefill_start is not None
        prompt_time = s.time_first_token - s.time_prefill_start if started else 0.0
        gen_time = s.time_last_token - s.time_first_token if started else 0.0
        computed = s.prompt_tokens - s.cached_prompt_tokens
        chunk = {
            "request_id": request_id,
            "prompt_tokens": s.prompt_tokens,
            "prompt_time": round(prompt_time, 2),
            "prompt_tokens_per_sec": round(computed / prompt_time, 2) if prompt_time > 0 else "Indeterminate",
            "gen_tokens": s.new_tokens,
            "gen_time": round(gen_time, 2),
            "gen_tokens_per_sec": round(s.new_tokens / gen_time, 2) if gen_time > 0 else "Indeterminate",
            "total_time": round(queue_time + prompt_time + gen_time, 2),
            "queue_time": round(queue_time, 2),
            "cached_tokens": s.cached_prompt_tokens,
            "finish_reason": _FINISH_REASON.get(job.finish_reason, "stop"),
            "eos_reason": job.finish_reason,
            "stop_str": None,
            "full_text": full_text,
        }
        counts = draft_counts(job)
        if counts is not None:
            chunk["draft_accept"], chunk["draft_reject"] = counts
        return chunk

    async def generate(self, request_id: str, prompt: str, params, abort_event=None, mm_embeddings=None,
                       **kwargs) -> dict:
        """The whole completion as one dict: the finish chunk's keys plus ``text``, ``offset``,
        ``logprobs`` and token counts (what TabbyAPI's non-streaming endpoints read)."""
        chunks = [c async for c in self.stream_generate(request_id, prompt, params, abort_event, mm_embeddings,
                                                        **kwargs)]
        joined = {"text": "", "prompt_tokens": 0, "generated_tokens": 0, "offset": [], "token_probs": {},
                  "logprobs": []}
        if chunks and "finish_reason" in chunks[-1]:
            joined.update(chunks.pop())
        else:
            joined["finish_reason"] = "stop"
        for c in chunks:
            joined["text"] += c["text"]
            joined["offset"].append(c["offset"])
            joined["logprobs"].append(c.get("logprobs_content", {}))
        if chunks:
            joined["prompt_tokens"] = chunks[-1]["prompt_tokens"]
            joined["generated_tokens"] = chunks[-1]["generated_tokens"]
        return joined


# ---------------------------------------------------------------------- launcher

def install() -> None:
    """Make the running TabbyAPI (cwd on sys.path) use ``Exl3TritonContainer``."""
    model_module = importlib.import_module("common.model")
    model_module.ExllamaV3Container = Exl3TritonContainer
    original = model_module.validate_backend

    def validate_backend(backend, hf_model):
        # exllamav3 is not needed; our create() checks the quantization and architecture itself
        if backend in (None, "", "exllamav3", BACKEND_NAME):
            return
        return original(backend, hf_model)

    model_module.validate_backend = validate_backend

    load = model_module.load_model

    async def load_model(model_path, **kwargs):
        # TabbyAPI's start-up load (main.py passes the whole `model:` block, model_name included) would end
        # the server on any error; for a model exl3-triton cannot run, say why and serve without a model
        # (API and inline loads, which pass no model_name, still raise to their caller).
        try:
            return await load(model_path, **kwargs)
        except Exl3TritonError as e:
            if "model_name" not in kwargs:
                raise
            log.error("model %s was not loaded: %s", model_path, e)

    model_module.load_model = load_model
    registry = getattr(model_module, "_BACKEND_REGISTRY", None)
    if isinstance(registry, dict):  # TabbyAPI before 2026-07 (BaseModelContainer and a registry)
        registry[BACKEND_NAME] = Exl3TritonContainer
    deps = importlib.import_module("common.optional_dependencies").dependencies
    try:
        # TabbyAPI refuses to start without exllamav3; this container does not need it
        deps.exllamav3 = True
    except (AttributeError, TypeError, ValueError):
        object.__setattr__(deps, "exllamav3", True)


def launch(tabby_dir: str, argv: list[str]) -> int:
    """``exl3-triton tabby TABBY_DIR [args]``: start TabbyAPI from its checkout with this backend."""
    import os
    import sys

    root = pathlib.Path(tabby_dir).resolve()
    if not (root / "main.py").exists() or not (root / "common" / "model.py").exists():
        raise InvalidArgumentError(f"{tabby_dir} is not a TabbyAPI checkout (main.py and common/model.py not found)")
    os.chdir(root)
    sys.path.insert(0, str(root))
    sys.argv = [str(root / "main.py"), *argv]
    install()
    main = importlib.import_module("main")
    main.entrypoint()
    return 0
