"""Tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, plus the special-token facts
from ``tokenizer_config.json``, ``config.json`` and ``generation_config.json``."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError


def _read_optional_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"not readable JSON ({e})", path=path) from e
    return data if isinstance(data, dict) else {}


def _token_content(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<bos>", ...}
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode text for a model directory.

    BOS handling: when ``tokenizer.json`` has a post-processor, it decides (as in
    transformers). Otherwise BOS is prepended if ``add_bos_token`` is true in
    ``tokenizer_config.json``, or if that key is absent and a BOS token exists
    (what Llama- and Gemma-style models expect).
    """

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise CheckpointError("tokenizer.json not found (needed to turn text into tokens)", path=path)
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot load tokenizer ({e})", path=path) from e
        raw = _read_optional_json(path)
        self.config = _read_optional_json(model_dir / "tokenizer_config.json")
        model_cfg = _read_optional_json(model_dir / "config.json")
        gen_cfg = _read_optional_json(model_dir / "generation_config.json")

        self.bos_token_id = self._special_id("bos_token", model_cfg, gen_cfg)
        eos = self._special_id("eos_token", model_cfg, gen_cfg)
        eos_ids = gen_cfg.get("eos_token_id", model_cfg.get("eos_token_id", eos))
        self.eos_token_ids = sorted({i for i in (eos_ids if isinstance(eos_ids, list) else [eos_ids]) if isinstance(i, int)})
        self.pad_token_id = self._special_id("pad_token", model_cfg, gen_cfg)
        has_post = raw.get("post_processor") is not None
        add_bos = self.config.get("add_bos_token")
        self.add_bos = (not has_post) and self.bos_token_id is not None and add_bos is not False
        self.chat_template = self.config.get("chat_template")
        template_file = model_dir / "chat_template.jinja"
        if template_file.exists():
            self.chat_template = template_file.read_text(encoding="utf-8")

    def _special_id(self, name: str, model_cfg: dict, gen_cfg: dict) -> int | None:
        content = _token_content(self.config.get(name))
        if content is not None:
            tid = self._tok.token_to_id(content)
            if tid is not None:
                return tid
        value = gen_cfg.get(f"{name}_id", model_cfg.get(f"{name}_id"))
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, int) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special`` lets ``<tags>`` in the text map to special tokens."""
        add_bos = self.add_bos if add_bos is None else add_bos
        ids = self._tok.encode(text, add_special_tokens=True).ids if special else \
            self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ... as strings, the variables chat templates use."""
        out = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(self.config.get(name))
            if content is not None:
                out[name] = content
        return out

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The conversation as prompt text, rendered with this model's template."""
        from .chat import render_chat

        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens, **extra)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)
