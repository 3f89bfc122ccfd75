"""The panel's state without Gradio: load settings, the loaded model and generator, streaming chat.

Everything a user types is validated here and turned into an ``InvalidArgumentError`` (or another
``Exl3TritonError``) with a message the panel shows; nothing they send leaves the session broken.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import Exl3TritonError, InvalidArgumentError
from ..runtime.drafting_options import DraftOptions, DraftStats
from .drafting import OwnDrafter
from .model_info import model_card, validate_model_dir

DEVICES = ("auto", "cpu", "cuda")
MAX_SEQ_LEN_LIMIT = 1 << 20  # beyond any model's context today: anything larger is a typo
MAX_BATCH_LIMIT = 256
RECENT_LIMIT = 8


def _positive_int(name: str, value, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name}: {value!r} is not a number") from None
    if number != int(number) or not low <= number <= high:
        raise InvalidArgumentError(f"{name}: {value!r} is out of range; use a whole number from {low} to {high}")
    return int(number)


@dataclass
class LoadSettings:
    """The Loading box. ``cache_tokens`` 0 means the generator's default; ``gpu_split`` like "20,24" or
    "auto" (GB per GPU) or empty for one device."""

    model_dir: str
    max_seq_len: int = 2048
    cache_tokens: int = 0
    chunk_size: int = 512
    max_batch_size: int = 4
    device: str = "auto"
    gpu_split: str = ""

    def validated(self) -> "LoadSettings":
        validate_model_dir(self.model_dir)
        max_seq_len = _positive_int("max sequence length", self.max_seq_len, 16, MAX_SEQ_LEN_LIMIT)
        cache = _positive_int("cache size (tokens)", self.cache_tokens, 0, MAX_SEQ_LEN_LIMIT * MAX_BATCH_LIMIT)
        if cache and cache < max_seq_len:
            raise InvalidArgumentError(f"cache size {cache} tokens is smaller than max sequence length "
                                       f"{max_seq_len}; one full-length sequence would not fit")
        chunk = _positive_int("chunk size", self.chunk_size, 1, MAX_SEQ_LEN_LIMIT)
        batch = _positive_int("max batch size", self.max_batch_size, 1, MAX_BATCH_LIMIT)
        if self.device not in DEVICES:
            raise InvalidArgumentError(f"device {self.device!r}: choose one of {', '.join(DEVICES)}")
        return LoadSettings(str(self.model_dir).strip(), max_seq_len, cache, chunk, batch, self.device,
                            (self.gpu_split or "").strip())

    def load_kwargs(self) -> dict:
        import torch

        kwargs: dict = {}
        if self.gpu_split:
            if self.gpu_split == "auto":
                kwargs["gpu_split"] = "auto"
            else:
                try:
                    kwargs["gpu_split"] = [float(x) for x in self.gpu_split.replace(" ", "").split(",") if x]
                except ValueError:
                    raise InvalidArgumentError(f"GPU split {self.gpu_split!r}: give GB per GPU like '20,24', "
                                               "or 'auto'") from None
        elif self.device != "auto":
            if self.device == "cuda" and not torch.cuda.is_available():
                raise InvalidArgumentError("device cuda: no CUDA GPU is visible; choose cpu or auto")
            kwargs["device"] = self.device
        return kwargs


class RecentModels:
    """Recently loaded model directories, newest first, kept in a small JSON file.

    The file is ``$EXL3_TRITON_UI_STATE/recent_models.json`` (default ``~/.cache/exl3-triton``);
    an unreadable file is treated as empty, as the list is only a convenience.
    """

    def __init__(self, state_dir: str | Path | None = None):
        base = state_dir or os.environ.get("EXL3_TRITON_UI_STATE") or Path.home() / ".cache" / "exl3-triton"
        self.path = Path(base) / "recent_models.json"

    def list(self) -> list[str]:
        try:
            items = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return [s for s in items if isinstance(s, str)][:RECENT_LIMIT] if isinstance(items, list) else []

    def add(self, model_dir: str) -> list[str]:
        items = [str(Path(model_dir).expanduser())]
        items += [s for s in self.list() if s != items[0]]
        items = items[:RECENT_LIMIT]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(items, indent=1))
        except OSError:
            pass  # a read-only home must not stop a load
        return items


@dataclass
class ChatSettings:
    """The Chat box's sampling settings."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.1
    seed: int | None = None
    system_prompt: str = ""

    def sampling(self):
        from ..runtime.sampling import SamplingParams

        return SamplingParams(temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p),
                              min_p=float(self.min_p), repetition_penalty=float(self.repetition_penalty),
                              seed=None if self.seed in (None, "", -1) else int(self.seed))


@dataclass
class ReplyUpdate:
    """One streamed step of a reply."""

    text: str
    finished: bool = False
    finish_reason: str | None = None
    new_tokens: int = 0
    time_to_first_token: float | None = None
    tokens_per_second: float | None = None
    draft: DraftStats | None = None
    error: str | None = None

    def stats_line(self) -> str:
        parts = [f"{self.new_tokens} tokens"]
        if self.time_to_first_token is not None:
            parts.append(f"time to first token {self.time_to_first_token * 1000:.0f} ms")
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:.1f} tokens/s")
        if self.finish_reason:
            parts.append(f"finished: {self.finish_reason}")
        return " · ".join(parts)


def generator_accepts_draft() -> bool:
    """Whether this build's ``Generator`` takes ``draft=DraftOptions(...)`` (speculative decoding)."""
    from ..runtime.generator import Generator

    return "draft" in inspect.signature(Generator.__init__).parameters


@dataclass
class ModelSession:
    """One loaded model with its generator. One chat runs at a time (``lock``)."""

    recent: RecentModels = field(default_factory=RecentModels)
    model: object = None
    generator: object = None
    settings: LoadSettings | None = None
    draft: DraftOptions = field(default_factory=DraftOptions)
    card: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _job: object = None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def own_drafter(self) -> OwnDrafter | None:
        """The loaded model's own drafter (MTP heads, a DSpark block drafter or none); None: no model."""
        return OwnDrafter.of(self.model.network) if self.loaded else None

    # ------------------------------------------------------------------ load

    def load(self, settings: LoadSettings, progress: Callable[[int, int], None] | None = None) -> dict:
        """Load (replacing any loaded model) and build the generator; returns the model card."""
        import exl3_triton

        settings = settings.validated()
        kwargs = settings.load_kwargs()
        self.unload()
        model = exl3_triton.load(settings.model_dir, progress=progress, **kwargs)
        config_len = getattr(model.config, "max_position_embeddings", None)
        if config_len and settings.max_seq_len > int(config_len):
            raise InvalidArgumentError(f"max sequence length {settings.max_seq_len} is longer than this model's "
                                       f"context ({config_len} tokens, max_position_embeddings)")
        if model.tokenizer is None:
            raise InvalidArgumentError(f"model directory {settings.model_dir}: no tokenizer.json")
        self.model, self.settings = model, settings
        try:
            self._build_generator(DraftOptions())
        except BaseException:
            self.model = self.settings = None
            raise
        self.recent.add(settings.model_dir)
        return self.card

    def _build_generator(self, draft: DraftOptions) -> None:
        from ..runtime.generator import Generator

        s = self.settings
        if self.model.options.device.type == "cpu":
            check_cpu_cache_fits(self.model.network, s)
        kwargs = dict(max_batch_size=s.max_batch_size, max_seq_len=s.max_seq_len,
                      cache_tokens=s.cache_tokens or None, chunk_size=s.chunk_size)
        if draft.enabled:
            if not generator_accepts_draft():
                raise InvalidArgumentError("speculative decoding is not available in this build of exl3-triton")
            kwargs["draft"] = draft
        self.generator = Generator(self.model, **kwargs)
        self.draft = draft
        cache = getattr(self.generator, "cache", None)
        self.card = model_card(self.model, cache_bytes=_cache_bytes(cache))

    def unload(self) -> None:
        self.stop()
        self.model = self.generator = self.settings = None
        self.card = {}
        self.draft = DraftOptions()
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - freeing memory is best effort
            pass

    def set_draft(self, draft: DraftOptions) -> None:
        """Use these drafting options from the next reply on (rebuilds the generator if they changed)."""
        if not self.loaded:
            raise InvalidArgumentError("load a model first")
        if draft != self.draft:
            self._build_generator(draft)

    # ------------------------------------------------------------------ chat

    def chat(self, history: list[dict], message: str, chat: ChatSettings) -> Iterator[ReplyUpdate]:
        """Stream the model's reply to ``message`` after ``history`` (``[{"role", "content"}, ...]``)."""
        from ..runtime.job import Job

        if not self.loaded:
            raise InvalidArgumentError("load a model first")
        if not (message or "").strip():
            raise InvalidArgumentError("type a message first")
        max_new = _positive_int("max new tokens", chat.max_new_tokens, 1, self.settings.max_seq_len - 1)
        messages = ([{"role": "system", "content": chat.system_prompt}] if chat.system_prompt.strip() else [])
        messages += list(history) + [{"role": "user", "content": message}]
        tok = self.model.tokenizer
        prompt = tok.apply_chat_template(messages) if tok.chat_template else message
        if not self.lock.acquire(blocking=False):
            raise InvalidArgumentError("a reply is still being written; press Stop first")
        last = None
        try:
            job = self.generator.enqueue(Job(prompt, max_new_tokens=max_new, sampling=chat.sampling()))
            self._job = job
            text = ""
            while not job.finished:
                for ev in self.generator.step():
                    if ev.job is not job:
                        continue
                    text += ev.text
                    if ev.finished:
                        last = self._update(job, text, ev)
                    elif ev.text:
                        yield self._update(job, text, ev)
        finally:
            self._job = None
            self.lock.release()
        # The finished update goes out only once the session is free again: a page that shows
        # "finished" must accept the next message at once (the browser test raced this).
        if last is not None:
            yield last

    def _update(self, job, text: str, ev) -> ReplyUpdate:
        stats = job.stats
        return ReplyUpdate(text=text, finished=ev.finished, finish_reason=ev.finish_reason,
                           new_tokens=stats.new_tokens, time_to_first_token=stats.time_to_first_token,
                           tokens_per_second=stats.new_tokens_per_second,
                           draft=getattr(stats, "draft", None), error=ev.error)

    def stop(self) -> None:
        job = self._job
        if job is not None:
            job.cancel()

    @property
    def draft_stats(self) -> DraftStats | None:
        return getattr(self.generator, "draft_stats", None)


def _cache_bytes(cache) -> int | None:
    """Bytes of a ``PagedCache``'s tensors (its pages, rings and per-sequence slots)."""
    if cache is None:
        return None
    tables = list(getattr(cache, "paged", [])) + list(getattr(cache, "slots", []))
    return sum(t.numel() * t.element_size() for table in tables for t in table.values())


def check_cpu_cache_fits(network, settings: LoadSettings) -> None:
    """Refuse a CPU cache larger than half the machine's memory (on CUDA the generator sizes the cache
    to free memory itself); an absurd length would otherwise die in an allocation."""
    from ..arch.cache_spec import fitting_page_size
    from ..runtime.cache import PagedCache

    specs = network.cache_spec()
    tokens = settings.cache_tokens or settings.max_batch_size * settings.max_seq_len
    page_size = fitting_page_size(specs, 16)  # what the generator picks on CPU
    need = PagedCache.bytes_per_token(specs) * tokens + PagedCache.fixed_bytes(specs, page_size,
                                                                               settings.max_batch_size)
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > 0.5 * have:
        raise InvalidArgumentError(
            f"the cache for {tokens} tokens (max batch size {settings.max_batch_size} x max sequence length "
            f"{settings.max_seq_len}, or the cache size) needs {need / 2**30:.1f} GiB, more than half of this "
            f"machine's {have / 2**30:.1f} GiB; lower the max sequence length, batch size or cache size")


def error_message(e: BaseException) -> str:
    """The text the panel shows for a failure: ours verbatim, anything else with its type."""
    if isinstance(e, Exl3TritonError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def elapsed(t0: float) -> str:
    return f"{time.perf_counter() - t0:.1f} s"
