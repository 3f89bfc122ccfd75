"""What the panel says about a model directory before and after loading: validation and the model card."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..errors import InvalidArgumentError


def validate_model_dir(text: str | Path | None) -> Path:
    """The directory named in the path box, or an ``InvalidArgumentError`` that says what is wrong with it.

    Checks only what can be told from file names (cheap, so it runs on every Load); the checkpoint
    reader then validates the files themselves.
    """
    raw = str(text or "").strip()
    if not raw:
        raise InvalidArgumentError("model directory: enter the path of a model directory")
    path = Path(raw).expanduser()
    if not path.exists():
        raise InvalidArgumentError(f"model directory {path}: no such directory")
    if not path.is_dir():
        raise InvalidArgumentError(f"model directory {path}: this is a file; give the folder that holds it")
    if not (path / "config.json").is_file():
        raise InvalidArgumentError(
            f"model directory {path}: no config.json, so this is not a model directory (an EXL3 model directory "
            "holds config.json, *.safetensors and tokenizer.json)")
    if not any(path.glob("*.safetensors")):
        raise InvalidArgumentError(f"model directory {path}: no *.safetensors weight files")
    if not (path / "tokenizer.json").is_file():
        raise InvalidArgumentError(f"model directory {path}: no tokenizer.json; the chat needs the model's tokenizer")
    return path


def tensor_class(key: str) -> str:
    """A linear's class for the card: ``q_proj``, ``down_proj``, ``experts.down_proj``, ``lm_head``...

    Layer and expert indices are dropped so that all layers' tensors of one kind group together.
    """
    parts = [p for p in key.split(".") if not p.isdigit()]
    name = parts[-1]
    return f"experts.{name}" if "experts" in parts[:-1] else name


def bits_by_tensor_class(checkpoint: Checkpoint) -> dict[str, float]:
    """Mean bits per weight of each class of EXL3 linear, weighted by size (from the checkpoint's
    ``quantization_config.json``; empty for an unquantized model)."""
    storage = (checkpoint.quantization_config or {}).get("tensor_storage") or {}
    weighted: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for key, entry in storage.items():
        bits = entry.get("bits_per_weight") if isinstance(entry, dict) else None
        if not isinstance(bits, (int, float)):
            continue
        trellis = next((t for n, t in entry.get("stored_tensors", {}).items() if n.endswith(".trellis")), None)
        size = 1.0
        if trellis:
            size = float(torch.Size(trellis["shape"]).numel())
        acc = weighted[tensor_class(key)]
        acc[0] += bits * size
        acc[1] += size
    return {cls: total / size for cls, (total, size) in sorted(weighted.items())}


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (the loaded weights)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def model_card(model, cache_bytes: int | None = None) -> dict[str, str]:
    """The facts the panel shows after a load, as label -> text (ordered)."""
    cfg = model.config
    experts = int(getattr(cfg, "num_experts", 0) or getattr(cfg, "n_routed_experts", 0) or 0)
    top_k = (getattr(cfg, "top_k_experts", None) or getattr(cfg, "num_experts_per_tok", None)
             or getattr(cfg, "top_k", None))  # the last: DeepSeek-V4's config
    bits = bits_by_tensor_class(model.checkpoint)
    card = {
        "architecture": model.architecture,
        "layers": str(getattr(cfg, "num_layers", "?")),
        "hidden size": str(getattr(cfg, "hidden_size", "?")),
        "vocabulary": str(model.vocab_size),
        "experts": f"{experts} (top-{top_k} routed)" if experts else "none (dense)",
        "MTP heads": str(getattr(model.network, "mtp_depth", 0) or "none"),
        **_block_drafter_row(model.network),
        "format": "EXL3" if model.checkpoint.is_exl3 else "unquantized",
        "bits per tensor class": ", ".join(f"{c} {b:g}" for c, b in bits.items()) or "unquantized",
        "device": str(model.options.device),
        "weights in memory": _gib(module_bytes(model.network)),
    }
    if cache_bytes is not None:
        card["cache in memory"] = _gib(cache_bytes)
    return card


def _block_drafter_row(network) -> dict[str, str]:
    """A row for a DeepSeek-V4 DSpark block drafter (not MTP heads: it drafts a whole block per forward)."""
    block = getattr(network, "block_drafter", None)
    return {"block drafter": f"DSpark, {block.block_size} tokens per block"} if block is not None else {}


def card_markdown(card: dict[str, str]) -> str:
    rows = "\n".join(f"| {k} | {_escape_md(v)} |" for k, v in card.items())
    return "| model card | |\n|---|---|\n" + rows


def _escape_md(text: str) -> str:
    return re.sub(r"([|\\`*_])", r"\\\1", text)
