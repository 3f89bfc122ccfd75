"""The model object text-generation-webui drives for the ``ExLlamav3-Triton`` loader.

The webui chooses its generation, tokenization and unload paths by the model's *class name*
(``shared.model.__class__.__name__ in ['Exllamav3Model', ...]`` in modules/text_generation.py and
modules/models.py, with no way to register another), so the class is named ``Exllamav3Model`` to
take the native path: ``generate_with_streaming(prompt, state)`` yielding cumulative text,
``generate``, ``encode`` -> ``(1, n)`` tensor, ``decode``, ``unload``, ``get_logits``,
``last_prompt_token_count`` and ``last_completion_probabilities``. The object is also the
tokenizer (``from_pretrained`` returns ``(model, model)``), as in the webui's own ExLlamaV3 loader.
"""

from __future__ import annotations

import queue
from pathlib import Path

import torch

from ..errors import InvalidArgumentError
from ..runtime.drafting_options import DRAFT_MODES, MAX_DRAFT_TOKENS, DraftOptions
from .common import HostOptions, load_model, log, option_gb_list
from .threaded import ThreadedGenerator

# MTP / drafting settings from the extension tab (the extension shim shares this very dict as its
# ``params``, so the webui's settings.yaml values land here).
DRAFT_SETTINGS = {"draft_mode": "disabled", "draft_num_tokens": 3, "dynamic_draft": False, "ngram_max": 4}


def webui_shared():
    """The webui's ``modules.shared`` when running inside the webui, else None."""
    try:
        import modules.shared as shared
    except ImportError:
        return None
    return shared if hasattr(shared, "args") else None


def draft_from_webui(args, model_name: str, settings: dict = DRAFT_SETTINGS) -> DraftOptions:
    """The drafting to use: the extension tab's mode; a Model-tab draft model (``--model-draft``)
    means mode "model" with ``--draft-max`` tokens, and a draft model equal to the model itself means
    MTP (ExLlamaV3's ``--mtp`` convention)."""
    mode = settings.get("draft_mode") or "disabled"
    if mode not in DRAFT_MODES:
        raise InvalidArgumentError(f"exl3_triton-draft_mode {mode!r} is not one of {', '.join(DRAFT_MODES)}")
    num = int(settings.get("draft_num_tokens") or 3)
    draft_name = getattr(args, "model_draft", None)
    draft_name = None if not draft_name or str(draft_name).lower() == "none" else str(draft_name)
    if draft_name is not None and mode in ("disabled", "model"):
        if draft_name == model_name:
            mode = "mtp"
        else:
            mode = "model"
            num = int(getattr(args, "draft_max", None) or num)
    if num > MAX_DRAFT_TOKENS:
        log.warning("%d draft tokens requested; exl3-triton drafts at most %d per step", num, MAX_DRAFT_TOKENS)
        num = MAX_DRAFT_TOKENS
    num = max(num, 1)
    dynamic = bool(settings.get("dynamic_draft"))
    if mode == "model":
        if draft_name is None:
            raise InvalidArgumentError("draft mode 'model' needs a draft model: pick one in the Model tab's "
                                       "speculative decoding section (--model-draft)")
        path = Path(draft_name)
        if not path.is_absolute():
            path = Path(getattr(args, "model_dir", "models")) / path
        return DraftOptions(mode="model", model_dir=str(path), num_tokens=num, dynamic=dynamic)
    if mode == "ngram":
        return DraftOptions(mode="ngram", num_tokens=num, dynamic=dynamic,
                            ngram_max=max(int(settings.get("ngram_max") or 4), 1))
    return DraftOptions(mode=mode, num_tokens=num, dynamic=dynamic)


def options_from_webui(args, model_name: str) -> HostOptions:
    """The Model tab's options (``shared.args``) for this loader."""
    cache_type = str(getattr(args, "cache_type", None) or "fp16").lower()
    if cache_type != "fp16":
        log.warning("cache_type %s is not supported by exl3-triton; the cache is fp16", cache_type)
    if getattr(args, "enable_tp", False):
        log.warning("tensor parallelism is not supported by exl3-triton; layers are split over GPUs instead")
    ctx = int(getattr(args, "ctx_size", 0) or 8192)  # the webui's own default for non-llama.cpp loaders
    split = option_gb_list("gpu_split", getattr(args, "gpu_split", None))
    return HostOptions(max_seq_len=ctx, cache_tokens=ctx, gpu_split=split, draft=draft_from_webui(args, model_name))


def _sampling(state: dict, eos_ids: list[int]):
    from ..runtime.sampling import SamplingParams

    banned = [int(t) for t in str(state.get("custom_token_bans") or "").split(",") if t.strip()]
    if state.get("ban_eos_token"):
        banned += eos_ids
    seed = state.get("seed")
    return SamplingParams(
        temperature=float(state.get("temperature", 1.0)), top_k=max(int(state.get("top_k", 0)), 0),
        top_p=float(state.get("top_p", 1.0)) or 1.0, min_p=float(state.get("min_p", 0.0)),
        repetition_penalty=float(state.get("repetition_penalty", 1.0)),
        presence_penalty=float(state.get("presence_penalty", 0.0)),
        frequency_penalty=float(state.get("frequency_penalty", 0.0)),
        logit_bias={int(k): float(v) for k, v in (state.get("logit_bias") or {}).items()},
        banned_tokens=tuple(banned), seed=seed if isinstance(seed, int) and seed >= 0 else None)


class Exllamav3Model:
    """An exl3-triton model, shaped like the webui's native ExLlamaV3 model (see the module doc)."""

    def __init__(self, model, generator, model_dir: Path):
        self.model = model
        self.model_dir = model_dir
        self.tokenizer = model.tokenizer
        self.parallel_generator = ThreadedGenerator(generator)
        self._last_prompt_token_count = 0
        self.last_completion_probabilities: list[dict] = []

    @classmethod
    def from_pretrained(cls, path_to_model):
        """Load ``models/<path_to_model>`` with the Model tab's options. A directory exl3-triton cannot
        run is reported in the log and gives ``(None, None)``, the webui's "failed to load"."""
        shared = webui_shared()
        args = shared.args if shared is not None else None
        path = Path(path_to_model)
        if args is not None and not path.is_absolute():
            path = Path(args.model_dir) / path
        try:
            options = options_from_webui(args, str(path_to_model)) if args is not None else HostOptions()
            model, generator = load_model(path, options)
        except InvalidArgumentError as e:
            _report_error(f"ExLlamav3-Triton: {e}")
            return None, None
        self = cls(model, generator, path)
        return self, self

    # ---------------------------------------------------------------- facts the webui reads

    @property
    def device(self) -> torch.device:
        return self.model.options.device

    def is_multimodal(self) -> bool:
        return False

    @property
    def last_prompt_token_count(self) -> int:
        return self._last_prompt_token_count

    @property
    def bos_token_id(self):
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self):
        return self.tokenizer.eos_token_ids[0] if self.tokenizer.eos_token_ids else None

    @property
    def bos_token(self) -> str | None:
        return self.tokenizer.special_tokens.get("bos_token")

    @property
    def draft_stats(self):
        """The generator's DraftStats when it drafts (None otherwise)."""
        return getattr(self.parallel_generator.generator, "draft_stats", None)

    # ---------------------------------------------------------------- tokens

    def encode(self, string, **kwargs) -> torch.Tensor:
        """``(1, n)`` token ids; BOS is added unless ``add_bos=False`` or the text starts with it."""
        add_bos = kwargs.pop("add_bos", True)
        bos = self.bos_token
        if add_bos and bos and str(string).startswith(bos):
            add_bos = False
        ids = self.tokenizer.encode(str(string), add_bos=bool(add_bos))
        if not add_bos and ids and self.tokenizer.bos_token_id is not None and ids[0] == self.tokenizer.bos_token_id \
                and not (bos and str(string).startswith(bos)):
            ids = ids[1:]  # a post-processor added it anyway
        return torch.tensor([ids], dtype=torch.long)

    def decode(self, ids, **kwargs) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        skip = kwargs.get("skip_special_tokens")
        if skip is None and "decode_special_tokens" in kwargs:
            skip = not kwargs["decode_special_tokens"]
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=bool(skip))

    # ---------------------------------------------------------------- logits

    def get_logits(self, token_ids, **kwargs) -> torch.Tensor:
        """Logits ``(B, 1, vocab)`` fp32 on the CPU for the last position (a fresh, cache-free pass)."""
        ids = torch.as_tensor(token_ids)
        ids = ids.reshape(1, -1) if ids.dim() < 2 else ids
        return self.model.forward(ids)[:, -1:, :].float().cpu()

    def get_prompt_logits(self, input_ids) -> torch.Tensor:
        """Logits ``(1, T, vocab)`` fp32 on the CPU for every prompt position."""
        return self.model.forward(torch.as_tensor(input_ids).reshape(1, -1)).float().cpu()

    # ---------------------------------------------------------------- generation

    def _job(self, prompt: str, state: dict):
        from ..runtime.job import Job

        ids = self.tokenizer.encode(prompt, add_bos=bool(state.get("add_bos_token", True)))
        keep = int(state["truncation_length"]) - int(state["max_new_tokens"])  # the webui's get_max_prompt_length
        if keep > 0:
            ids = ids[-keep:]
        self._last_prompt_token_count = len(ids)
        if state.get("auto_max_new_tokens"):
            max_new = int(state["truncation_length"]) - len(ids)
        else:
            max_new = int(state["max_new_tokens"])
        eos = list(self.tokenizer.eos_token_ids)
        top = max(int(state.get("logprobs") or 0), 0)
        return Job(ids, max_new_tokens=max(max_new, 1), sampling=_sampling(state, eos),
                   stop_tokens=[] if state.get("ban_eos_token") else eos, return_logprobs=top > 0, top_logprobs=top)

    def _record_logprobs(self, event) -> None:
        piece = self.tokenizer.id_to_piece

        def text(tid):
            return (piece(tid) or f"<{tid}>").replace("\u2581", " ")

        tops = event.top_logprobs or [[] for _ in event.token_ids]
        for tid, lp, top in zip(event.token_ids, event.logprobs or [None] * len(event.token_ids), tops):
            self.last_completion_probabilities.append({
                "token": text(tid), "logprob": lp,
                "top_logprobs": [{"token": text(t), "logprob": v} for t, v in top]})

    def generate_with_streaming(self, prompt, state):
        """Yield the reply so far (cumulative), until a stop condition, ``shared.stop_everything`` or
        ``state['stop_event']``; leaving early cancels the job."""
        job = self._job(prompt, state)
        self.last_completion_probabilities = []
        stop_event = state.get("stop_event")
        shared = webui_shared()
        events = self.parallel_generator.submit(job)
        text = ""
        try:
            while True:
                if (shared is not None and shared.stop_everything) or (stop_event is not None and stop_event.is_set()):
                    break
                try:
                    event = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if isinstance(event, Exception):
                    raise event
                if job.return_logprobs:
                    self._record_logprobs(event)
                if event.text:
                    text += event.text
                    yield text
                if event.finished:
                    if event.finish_reason == "error":
                        raise RuntimeError(f"exl3-triton generation failed: {event.error}")
                    break
        finally:
            self.parallel_generator.cancel(job)

    def generate(self, prompt, state) -> str:
        output = ""
        for output in self.generate_with_streaming(prompt, state):
            pass
        return output

    def unload(self) -> None:
        if self.parallel_generator is not None:
            self.parallel_generator.stop()
        self.parallel_generator = None
        self.model = None
        self.tokenizer = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _report_error(message: str) -> None:
    """To the webui's console log when running inside it, else to this package's logger."""
    try:
        from modules.logging_colors import logger
    except ImportError:
        logger = log
    logger.error(message)
