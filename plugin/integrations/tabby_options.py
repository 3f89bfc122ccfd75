"""TabbyAPI's load options (``config.yml``'s ``model:`` / ``draft_model:`` blocks, a model's
``tabby_config.yml``, the ``/v1/model/load`` body) mapped onto this package's options.

TabbyAPI passes every ``ModelConfig`` field to the container, plus ``draft_model={...}`` and
``skip_wait``, and a model's ``tabby_config.yml`` reaches us unvalidated. So: keys we map are
checked (a wrong value is an error naming the key), TabbyAPI keys that only matter to TabbyAPI
itself pass silently, TabbyAPI keys for features this package lacks are ignored with a warning
when set to anything but their default, and keys nobody knows (typos) are ignored with a warning.

Plugin-only keys, read from the model's ``tabby_config.yml`` (TabbyAPI's ``config.yml`` drops
unknown keys): under ``model:`` -- ``device`` (cpu, cuda, cuda:N), ``dtype`` (float16, bfloat16,
float32), ``kernel_backend`` (reference, triton); under ``draft_model:`` -- ``ngram_max`` (longest
suffix n-gram drafting looks up) and ``draft_confidence`` (mode mtp with DeepSeek-V4's DSpark block
drafter: the confidence gate, 0 to 1, that ExLlamaV3 reads from ``EXL3_DSPARK_CONF``; an error in
the other modes, and at load for a model whose MTP layers are not a block drafter, since nothing
would read it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidArgumentError
from ..runtime.drafting_options import DRAFT_MODES, MAX_DRAFT_TOKENS, DraftOptions, check_confidence_mode
from .common import HostOptions, log, option_bool, option_choice, option_fraction, option_gb_list, option_int

# TabbyAPI keys that concern TabbyAPI itself (model lookup, API behaviour): no effect here, no warning.
HOST_MODEL_KEYS = frozenset({
    "model_dir", "model_name", "inline_model_loading", "use_dummy_models", "dummy_model_names", "use_as_default",
    "backend", "skip_wait", "rope_scale", "rope_alpha", "output_chunking",
})
# Chat-template, reasoning and tool-call settings: TabbyAPI's endpoints read them off the container.
TEMPLATE_KEYS = {
    "prompt_template": None, "tool_format": None, "reasoning": False, "reasoning_start_token": "<think>",
    "reasoning_end_token": "</think>", "start_in_reasoning": "auto", "tool_calls_in_reasoning": True,
    "reasoning_budget_tokens": None, "reasoning_budget_message": None, "template_vars_default": {},
    "template_vars_force": {}, "force_enable_thinking": False, "harmony": None, "muse_glimmer": None,
}
MAPPED_MODEL_KEYS = frozenset({"max_seq_len", "cache_size", "chunk_size", "max_batch_size", "gpu_split",
                               "gpu_split_auto", "draft_model"})
PLUGIN_MODEL_KEYS = frozenset({"device", "dtype", "kernel_backend"})
# TabbyAPI features this package does not have, with the value that means "not used".
UNSUPPORTED_MODEL_KEYS = {
    "cache_mode": "FP16", "tensor_parallel": False, "tensor_parallel_backend": "native",
    "autosplit_reserve": [96], "cpu_moe_offload_layers": 0, "vision": False,
}

MAPPED_DRAFT_KEYS = frozenset({"draft_mode", "draft_model_dir", "draft_model_name", "draft_num_tokens",
                               "dynamic_draft", "ngram_match_min", "ngram_max", "draft_confidence"})
# (draft_rope_scale / draft_rope_alpha: TabbyAPI's own ExLlamaV3 container ignores them too)
HOST_DRAFT_KEYS = frozenset({"draft_rope_scale", "draft_rope_alpha"})
UNSUPPORTED_DRAFT_KEYS = {"draft_cache_mode": "FP16", "draft_gpu_split": []}


@dataclass
class TabbyOptions:
    host: HostOptions
    template: dict = field(default_factory=dict)  # TEMPLATE_KEYS with the values given
    draft_model_dir: str | None = None  # mode "model": the resolved draft directory


def _warn_ignored(block: str, kwargs: dict, known: set) -> None:
    for key in sorted(set(kwargs) - known):
        log.warning("TabbyAPI option %s.%s is not known to exl3-triton; ignored", block, key)


def _warn_unsupported(block: str, kwargs: dict, unsupported: dict) -> None:
    for key, default in unsupported.items():
        value = kwargs.get(key)
        if value is not None and value != default and not (value in ("", []) and default in (None, [])):
            log.warning("TabbyAPI option %s.%s=%r is not supported by exl3-triton; ignored", block, key, value)


def draft_options(draft: dict | None) -> tuple[DraftOptions, str | None]:
    """``draft_model:`` block -> DraftOptions (and the draft model's directory for mode "model").

    TabbyAPI's default mode is "model", which means no drafting unless ``draft_model_name`` is set.
    """
    if draft is not None and not isinstance(draft, dict):
        raise InvalidArgumentError(f"option draft_model: expected a mapping, got {draft!r}")
    draft = dict(draft or {})
    _warn_ignored("draft_model", draft, MAPPED_DRAFT_KEYS | HOST_DRAFT_KEYS | set(UNSUPPORTED_DRAFT_KEYS))
    _warn_unsupported("draft_model", draft, UNSUPPORTED_DRAFT_KEYS)
    mode = option_choice("draft_model.draft_mode", draft.get("draft_mode"), DRAFT_MODES) or "model"
    num = option_int("draft_model.draft_num_tokens", draft.get("draft_num_tokens"), minimum=1)
    if num is not None and num > MAX_DRAFT_TOKENS:
        raise InvalidArgumentError(f"option draft_model.draft_num_tokens: at most {MAX_DRAFT_TOKENS}, got {num}")
    dynamic = option_bool("draft_model.dynamic_draft", draft.get("dynamic_draft")) or False
    gate = option_fraction("draft_model.draft_confidence", draft.get("draft_confidence"))
    check_confidence_mode("option draft_model.draft_confidence", gate, mode)
    kw = {"num_tokens": num} if num is not None else {}
    model_dir = None
    if mode == "model":
        name = draft.get("draft_model_name")
        if not name:
            return DraftOptions(mode="disabled"), None
        from pathlib import Path

        model_dir = str(Path(draft.get("draft_model_dir") or "models") / str(name))
        return DraftOptions(mode="model", model_dir=model_dir, dynamic=dynamic, **kw), model_dir
    if mode == "ngram":
        ngram_min = option_int("draft_model.ngram_match_min", draft.get("ngram_match_min"), minimum=1) or 2
        ngram_max = option_int("draft_model.ngram_max", draft.get("ngram_max"), minimum=1) or max(4, ngram_min)
        if ngram_max < ngram_min:
            raise InvalidArgumentError(f"options draft_model.ngram_match_min={ngram_min} and "
                                       f"draft_model.ngram_max={ngram_max}: need ngram_match_min <= ngram_max")
        return DraftOptions(mode="ngram", ngram_min=ngram_min, ngram_max=ngram_max, dynamic=dynamic, **kw), None
    return DraftOptions(mode=mode, dynamic=dynamic, confidence_threshold=gate, **kw), None


def tabby_options(kwargs: dict, *, model_max_seq_len: int | None, gpu_count: int = 0) -> TabbyOptions:
    """Map ``ExllamaV3Container.create``'s kwargs. ``model_max_seq_len``: the model's
    ``max_position_embeddings`` (TabbyAPI's default for ``max_seq_len``)."""
    known = HOST_MODEL_KEYS | set(TEMPLATE_KEYS) | MAPPED_MODEL_KEYS | PLUGIN_MODEL_KEYS | set(UNSUPPORTED_MODEL_KEYS)
    _warn_ignored("model", kwargs, known)
    _warn_unsupported("model", kwargs, UNSUPPORTED_MODEL_KEYS)

    # TabbyAPI's rules: max_seq_len from the option, else the model, else 8192; cache_size defaults
    # to max_seq_len, and max_seq_len never exceeds cache_size.
    max_seq_len = option_int("max_seq_len", kwargs.get("max_seq_len"), minimum=2) or model_max_seq_len or 8192
    cache_size = option_int("cache_size", kwargs.get("cache_size"), minimum=2) or max_seq_len
    if max_seq_len > cache_size:
        log.warning("max_seq_len %d is larger than cache_size %d; limited to %d", max_seq_len, cache_size, cache_size)
        max_seq_len = cache_size

    gpu_split = option_gb_list("gpu_split", kwargs.get("gpu_split"))
    auto = option_bool("gpu_split_auto", kwargs.get("gpu_split_auto"))
    if gpu_split is None and (auto is None or auto) and gpu_count > 1:
        gpu_split = "auto"
    draft, draft_dir = draft_options(kwargs.get("draft_model"))
    host = HostOptions(
        max_seq_len=max_seq_len,
        cache_tokens=cache_size,
        chunk_size=option_int("chunk_size", kwargs.get("chunk_size"), minimum=1),
        max_batch_size=option_int("max_batch_size", kwargs.get("max_batch_size"), minimum=1),
        gpu_split=gpu_split,
        device=kwargs.get("device"),
        dtype=kwargs.get("dtype"),
        backend=option_choice("kernel_backend", kwargs.get("kernel_backend"), ("reference", "triton")),
        draft=draft,
    )
    template = {k: kwargs.get(k, v) if kwargs.get(k) is not None else v for k, v in TEMPLATE_KEYS.items()}
    if template["start_in_reasoning"] not in ("auto", "always", "never"):
        log.warning("start_in_reasoning=%r is not auto, always or never; using auto", template["start_in_reasoning"])
        template["start_in_reasoning"] = "auto"
    if template["force_enable_thinking"]:  # TabbyAPI's deprecated spelling of the same thing
        template["template_vars_force"] = {"enable_thinking": True, **(template["template_vars_force"] or {})}
    return TabbyOptions(host=host, template=template, draft_model_dir=draft_dir)
