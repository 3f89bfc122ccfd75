"""Architecture registry: ``config.json["architectures"][0]`` -> adapter class.

Three sources, later ones overriding earlier ones (with a warning):

1. built-in adapters, listed below as ``"module:Class"`` and imported lazily;
2. adapters from other installed packages, declared as entry points in the
   group ``exl3_triton.architectures`` (name = architecture string, value =
   ``"package.module:Class"``);
3. explicit ``register("SomeForCausalLM")(cls)`` calls at run time.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from ..errors import UnsupportedArchitectureError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "exl3_triton.architectures"

_BUILTIN: dict[str, str] = {
    "LlamaForCausalLM": "exl3_triton.arch.llama:LlamaForCausalLM",
    "MistralForCausalLM": "exl3_triton.arch.llama:LlamaForCausalLM",
    "Gemma4ForConditionalGeneration": "exl3_triton.arch.gemma4:Gemma4ForCausalLM",
    "Gemma4UnifiedForConditionalGeneration": "exl3_triton.arch.gemma4:Gemma4ForCausalLM",
    "Gemma4ForCausalLM": "exl3_triton.arch.gemma4:Gemma4ForCausalLM",
    "OpenPanguV2ForCausalLM": "exl3_triton.arch.openpangu_v2:OpenPanguV2ForCausalLM",
    "DeepseekV4ForCausalLM": "exl3_triton.arch.deepseek_v4:DeepseekV4ForCausalLM",
}

_registered: dict[str, type | str] = {}


def register(*arch_strings: str, target: type | str | None = None):
    """Register an adapter for one or more architecture strings.

    Use as a class decorator (``@register("FooForCausalLM")``) or directly with
    ``target`` = a class or a lazy ``"module:Class"`` string.
    """

    def add(obj):
        for arch in arch_strings:
            if arch in _registered or arch in _BUILTIN:
                log.warning("architecture %s: adapter %r replaces an earlier registration", arch, obj)
            _registered[arch] = obj
        return obj

    return add(target) if target is not None else add


def unregister(arch: str) -> None:
    _registered.pop(arch, None)


def _entry_point_targets() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def supported_architectures() -> list[str]:
    return sorted(set(_BUILTIN) | set(_entry_point_targets()) | set(_registered))


def _import_target(arch: str, target) -> type:
    from .base import CausalLM

    where = repr(target)
    try:
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            cls = getattr(importlib.import_module(module_name), attr)
        elif hasattr(target, "load") and hasattr(target, "group"):  # an importlib.metadata.EntryPoint
            where = f"entry point {target.name} = {target.value} (group {ENTRY_POINT_GROUP})"
            cls = target.load()
        else:
            cls = target
    except (ImportError, AttributeError) as e:
        raise UnsupportedArchitectureError(f"the adapter for {arch} ({where}) cannot be imported: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, CausalLM)):
        raise UnsupportedArchitectureError(f"the adapter for {arch} ({where}) is not a CausalLM subclass")
    return cls


def resolve(arch: str, *, config_path=None) -> type:
    """The adapter class for ``arch``; raises ``UnsupportedArchitectureError`` listing what is supported."""
    if arch in _registered:
        return _import_target(arch, _registered[arch])
    eps = _entry_point_targets()
    if arch in eps:
        if arch in _BUILTIN:
            log.warning("architecture %s: entry point %s overrides the built-in adapter", arch, eps[arch].value)
        return _import_target(arch, eps[arch])
    if arch in _BUILTIN:
        return _import_target(arch, _BUILTIN[arch])
    raise UnsupportedArchitectureError(
        f"architecture {arch!r} is not supported; supported: {', '.join(supported_architectures())}",
        path=config_path,
    )
