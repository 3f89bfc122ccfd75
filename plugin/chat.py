"""Chat templates, rendered as transformers renders them.

The template comes from the model directory (``chat_template.jinja`` or
``tokenizer_config.json``'s ``chat_template``, see ``Tokenizer``) and runs in
jinja2's immutable sandbox with ``trim_blocks``/``lstrip_blocks``, the
``raise_exception`` and ``strftime_now`` helpers, a ``tojson`` filter that keeps
non-ASCII text, and the tokenizer's special tokens as variables -- the
environment transformers' ``apply_chat_template`` sets up.
"""

from __future__ import annotations

import json
from datetime import datetime

from .errors import InvalidArgumentError


class TemplateError(InvalidArgumentError):
    """The chat template rejected the conversation (e.g. roles must alternate)."""


def _raise(message: str):
    raise TemplateError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str] | None = None, **extra) -> str:
    """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with ``template``."""
    if not template:
        raise InvalidArgumentError("this model has no chat template (chat_template.jinja or "
                                   "tokenizer_config.json's chat_template); send a plain prompt instead")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise InvalidArgumentError("messages must be a list of {'role': ..., 'content': ...} objects")
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
    except TemplateSyntaxError as e:
        raise InvalidArgumentError(f"the model's chat template does not parse: {e}") from e
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           **(special_tokens or {}), **extra)
