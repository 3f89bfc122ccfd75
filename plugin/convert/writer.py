"""Write the converted model directory the way the reference converter does.

Format reference: shared ``exl3-format.md`` sections 1.1 - 1.3.

* ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards plus
  ``model.safetensors.index.json`` when the tensors exceed the shard size;
  each top-level module (embedding, one decoder layer, the head) stays within
  one shard;
* ``config.json``: the source config plus a ``quantization_config`` block;
* ``quantization_config.json``: the same block plus ``tensor_storage``, one
  entry per module key listing its stored tensors (and, for EXL3 linears,
  ``quant_format``, ``bits_per_weight`` and the codebook multiplier);
* every other regular file of the source directory copied verbatim, except
  ``*.safetensors``, ``config.json``, the safetensors index and pickled
  weights (``*.bin``, ``*.ckpt``, ``*.pth``, ``*.pt``), which are dropped.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..kernels.weights import MCG_MULTIPLIER, MUL1_MULTIPLIER

INDEX_FILE = "model.safetensors.index.json"
FORMAT_VERSION = "1.6.5"  # the reference converter release whose output we reproduce
_SKIPPED_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pth", ".pt")
_EXL3_PART_ORDER = ("suh", "svh", "mcg", "mul1", "trellis", "bias")


def module_key(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def top_level_module(tensor_name: str) -> str:
    """The unit kept within one shard: ``model.layers.<i>`` for layer tensors, else the module key."""
    m = re.match(r"(.*?\.layers\.\d+)\.", tensor_name)
    return m.group(1) if m else module_key(tensor_name)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, generation config etc.; returns the names of dropped pickled-weight files."""
    dropped = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in ("config.json", INDEX_FILE, "quantization_config.json"):
            continue
        if f.name.endswith(_SKIPPED_SUFFIXES):
            if not f.name.endswith(".safetensors"):
                dropped.append(f.name)
            continue
        shutil.copy2(f, dst / f.name)
    return dropped


def write_tensors(tensors: dict[str, torch.Tensor], dst: Path, shard_size_bytes: int) -> list[str]:
    """Write ``tensors`` (ordered) as one file or shards; returns the file names."""
    units: dict[str, list[str]] = {}
    for name in tensors:
        units.setdefault(top_level_module(name), []).append(name)
    shards: list[list[str]] = [[]]
    size = 0
    for names in units.values():
        unit_bytes = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        if shards[-1] and size + unit_bytes > shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(names)
        size += unit_bytes
    if len(shards) == 1:
        save_file({n: tensors[n].contiguous() for n in shards[0]}, str(dst / "model.safetensors"))
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, str(dst / fname))
        files.append(fname)
        weight_map.update({n: fname for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files


def _bits_value(bits: float) -> int | float:
    return int(bits) if float(bits).is_integer() else float(bits)


def tensor_storage(tensors: dict[str, torch.Tensor], exl3_bits: dict[str, float]) -> dict:
    """The ``tensor_storage`` manifest: every module key with its stored tensors (section 1.3)."""
    modules: dict[str, list[str]] = {}
    for name in tensors:
        modules.setdefault(module_key(name), []).append(name)
    storage = {}
    for key, names in modules.items():
        if key in exl3_bits:
            rank = {p: i for i, p in enumerate(_EXL3_PART_ORDER)}
            names = sorted(names, key=lambda n: rank.get(n.rpartition(".")[2], len(rank)))
        entry = {"stored_tensors": {
            n: {"shape": list(tensors[n].shape), "n_bytes": tensors[n].numel() * tensors[n].element_size(),
                "dtype": str(tensors[n].dtype)}
            for n in names}}
        if key in exl3_bits:
            entry["quant_format"] = "exl3"
            entry["bits_per_weight"] = _bits_value(exl3_bits[key])
            if f"{key}.mcg" in tensors:
                entry["mcg_multiplier"] = MCG_MULTIPLIER
            if f"{key}.mul1" in tensors:
                entry["mul1_multiplier"] = MUL1_MULTIPLIER
        storage[key] = entry
    return storage


def quantization_block(*, bits: float, head_bits: float, cal_rows: int, cal_cols: int, out_scales: str,
                       codebook: str, converter: str) -> dict:
    """``config.json["quantization_config"]`` (section 1.2); ``converter`` is our own extra key."""
    return {
        "quant_method": "exl3",
        "version": FORMAT_VERSION,
        "bits": round(bits, 2),
        "head_bits": _bits_value(head_bits),
        "calibration": {"rows": cal_rows, "cols": cal_cols},
        "out_scales": out_scales,
        "codebook": codebook,
        "converter": converter,
    }


def write_configs(source_config: dict, block: dict, storage: dict, dst: Path) -> None:
    config = json.loads(json.dumps(source_config))  # deep copy
    previous = config.get("quantization_config")
    if isinstance(previous, dict) and previous.get("quant_method") != "exl3":
        block = {**block, "original_quantization_config": previous}
    config["quantization_config"] = block
    # The separate lm_head is always written, so the converted model is untied.
    if "tie_word_embeddings" in config:
        config["tie_word_embeddings"] = False
    (dst / "config.json").write_text(json.dumps(config, indent=4))
    (dst / "quantization_config.json").write_text(json.dumps({**block, "tensor_storage": storage}, indent=4))
