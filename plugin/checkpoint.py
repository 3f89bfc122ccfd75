"""Read a model directory: config, quantization manifest, and (sharded) safetensors.

``Checkpoint(model_dir)`` parses every safetensors header up front (cheap: a few
KB per file) so that it can report a broken or truncated file before any weight
is read, then loads tensors lazily, one at a time, through memory-mapped
``safetensors`` handles.

For every EXL3 linear layer (a module key with ``.trellis`` + ``.suh``/``.su`` +
``.svh``/``.sv``) it returns a validated ``Exl3Weight``; unquantized linears come
back as ``DenseWeight`` and every other tensor (embeddings, norms, routers,
sinks...) as it is stored.

Every problem raises ``CheckpointError`` (or ``ConfigError``) naming the file
and tensor.
"""

from __future__ import annotations

import json
import math
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import CheckpointError, ConfigError
from .kernels.weights import (
    HALF_INTEGER_BITS,
    MCG_MULTIPLIER,
    MUL1_MULTIPLIER,
    SUPPORTED_BITS,
    Codebook,
    DenseWeight,
    Exl3Weight,
    LinearWeight,
    bits_from_words,
    is_half_integer,
)

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype tag -> (torch dtype, bytes per element)
_DTYPES = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "U16": (getattr(torch, "uint16", None), 2),
    "I32": (torch.int32, 4),
    "U32": (getattr(torch, "uint32", None), 4),
    "I64": (torch.int64, 8),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 1),
}

# Sub-tensor names that make up one EXL3 linear.
_EXL3_PARTS = ("trellis", "suh", "svh", "su", "sv", "mcg", "mul1", "bias")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, from the safetensors header."""

    name: str
    file: Path
    dtype: str  # safetensors tag, e.g. "F16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPES[self.dtype][1]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one file's header; raises CheckpointError on any inconsistency."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("file is too short to be a safetensors file (truncated?)", path=path)
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointError(
                    f"header claims {header_len} bytes but the file has only {size} (truncated or not safetensors)",
                    path=path,
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read file: {e.strerror or e}", path=path) from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"safetensors header is not valid JSON ({e})", path=path) from e
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", path=path)

    data_size = size - 8 - header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError("malformed header entry", path=path, tensor=name) from e
        if dtype not in _DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}", path=path, tensor=name)
        info = TensorInfo(name, path, dtype, shape)
        if end > data_size:
            raise CheckpointError(
                f"data ends at byte {end} but the file holds only {data_size} data bytes (file truncated?)",
                path=path,
                tensor=name,
            )
        if end - begin != info.nbytes:
            raise CheckpointError(
                f"header says {end - begin} bytes but dtype {dtype} shape {list(shape)} needs {info.nbytes}",
                path=path,
                tensor=name,
            )
        infos[name] = info
    return infos


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{what} not found", path=path) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} is not readable JSON ({e})", path=path) from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} must be a JSON object", path=path)
    return data


def unpack_sign_bits(words: torch.Tensor) -> torch.Tensor:
    """Legacy ``su``/``sv``: int16 words, 16 channels each; a set bit means -1. -> fp16 +-1."""
    w = words.to(torch.int32) & 0xFFFF
    bits = (w[:, None] >> torch.arange(16, dtype=torch.int32)) & 1
    return (1 - 2 * bits).reshape(-1).to(torch.float16)


def padded_size(n: int, multiple: int = 128) -> int:
    return -(-n // multiple) * multiple


class Checkpoint:
    """A model directory: ``config.json``, optional ``quantization_config.json``, safetensors shards."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError("model directory does not exist (or is not a directory)", path=self.model_dir)
        self.config_path = self.model_dir / "config.json"
        self.config = _read_json(self.config_path, "config.json")
        self.quantization_config = self._read_quantization_config()
        self._infos = self._read_headers()
        self._handles: dict[Path, object] = {}
        self._modules = self._group_by_module()

    # ----------------------------------------------------------------- config

    def _read_quantization_config(self) -> dict | None:
        qpath = self.model_dir / "quantization_config.json"
        qcfg = _read_json(qpath, "quantization_config.json") if qpath.exists() else None
        inline = self.config.get("quantization_config")
        for source, cfg in ((qpath, qcfg), (self.config_path, inline)):
            if cfg is None:
                continue
            if not isinstance(cfg, dict):
                raise ConfigError("'quantization_config' must be an object", path=source)
            method = cfg.get("quant_method")
            if method is not None and method != "exl3":
                raise ConfigError(
                    f"the model is quantized with {method!r}, not EXL3; exl3-triton runs EXL3 "
                    "checkpoints (and unquantized fp16/bf16/fp32 ones)",
                    path=source,
                )
        return qcfg if qcfg is not None else inline

    @property
    def architecture(self) -> str:
        """``config.json["architectures"][0]``, the string the adapter registry is keyed by."""
        archs = self.config.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ConfigError(
                "config.json has no 'architectures' list naming the model class "
                "(is this a Hugging Face model directory?)",
                path=self.config_path,
            )
        return archs[0]

    @property
    def is_exl3(self) -> bool:
        return bool(self.exl3_linear_keys())

    # ---------------------------------------------------------------- headers

    def _shard_files(self) -> tuple[list[Path], dict[str, Path] | None]:
        index_path = self.model_dir / INDEX_FILE
        if index_path.exists():
            index = _read_json(index_path, INDEX_FILE)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError("index has no 'weight_map'", path=index_path)
            files = []
            for fname in sorted(set(weight_map.values())):
                fpath = self.model_dir / fname
                if not fpath.is_file():
                    raise CheckpointError(f"shard listed in {INDEX_FILE} is missing", path=fpath)
                files.append(fpath)
            return files, {k: self.model_dir / v for k, v in weight_map.items()}
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError("no *.safetensors files in the model directory", path=self.model_dir)
        return files, None

    def _read_headers(self) -> dict[str, TensorInfo]:
        files, weight_map = self._shard_files()
        infos: dict[str, TensorInfo] = {}
        for path in files:
            for name, info in read_safetensors_header(path).items():
                if name in infos:
                    raise CheckpointError(f"tensor also stored in {infos[name].file.name}", path=path, tensor=name)
                infos[name] = info
        if weight_map is not None:
            for name, path in weight_map.items():
                if name not in infos or infos[name].file != path:
                    raise CheckpointError(f"{INDEX_FILE} maps this tensor to a file that does not hold it",
                                          path=path, tensor=name)
        return infos

    def _group_by_module(self) -> dict[str, dict[str, TensorInfo]]:
        modules: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
        for name, info in self._infos.items():
            key, _, part = name.rpartition(".")
            if key and part in _EXL3_PARTS:
                modules[key][part] = info
        return dict(modules)

    # ---------------------------------------------------------------- tensors

    def tensor_names(self) -> list[str]:
        return sorted(self._infos)

    def has_tensor(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError("tensor not found in any safetensors file of the model",
                                  path=self.model_dir, tensor=name) from None

    def tensor(self, name: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Load one tensor (only its bytes are read), optionally cast and moved."""
        info = self.info(name)
        if _DTYPES[info.dtype][0] is None:
            raise CheckpointError(f"dtype {info.dtype} is not supported by this torch version",
                                  path=info.file, tensor=name)
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                from safetensors import safe_open

                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            t = handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read tensor data ({e})", path=info.file, tensor=name) from e
        if dtype is not None or torch.device(device).type != "cpu":
            t = t.to(device=device, dtype=dtype)
        return t

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    # ---------------------------------------------------------------- linears

    def exl3_linear_keys(self) -> list[str]:
        """Module keys that store any EXL3 part (trellis, suh/svh or legacy su/sv)."""
        exl3_parts = {"trellis", "suh", "svh", "su", "sv"}
        return sorted(k for k, parts in self._modules.items() if exl3_parts & parts.keys())

    def iter_exl3_linears(self, device: str | torch.device = "cpu") -> Iterator[Exl3Weight]:
        for key in self.exl3_linear_keys():
            yield self.exl3_linear(key, device=device)

    def linear_format(self, key: str) -> str | None:
        """"exl3", "dense" or None (no linear stored under this key)."""
        parts = self._modules.get(key, {})
        if {"trellis", "suh", "svh", "su", "sv"} & parts.keys():
            return "exl3"
        if f"{key}.weight" in self._infos:
            return "dense"
        return None

    def linear(
        self,
        key: str,
        *,
        in_features: int | None = None,
        out_features: int | None = None,
        device: str | torch.device = "cpu",
        dense_dtype: torch.dtype | None = None,
    ) -> LinearWeight:
        """The linear stored under ``key``, EXL3 or dense, checked against the expected sizes.

        ``in_features``/``out_features`` are the layer's true sizes from the
        model config; an EXL3 tensor may be padded up to the next multiple of
        128 (exl3-format.md 2.3), a dense one must match exactly.
        """
        fmt = self.linear_format(key)
        if fmt == "exl3":
            w = self.exl3_linear(key, device=device)
            for what, want, have in (("input", in_features, w.in_features), ("output", out_features, w.out_features)):
                if want is not None and not (want <= have <= padded_size(want)):
                    raise CheckpointError(
                        f"EXL3 linear has {have} {what} features but the model config implies {want} "
                        f"(padded: {padded_size(want)})",
                        path=self.info(f"{key}.trellis").file,
                        tensor=f"{key}.trellis",
                    )
            return w
        if fmt == "dense":
            w = self.dense_linear(key, device=device, dtype=dense_dtype)
            want = (out_features, in_features)
            for axis, size in enumerate(want):
                if size is not None and w.weight.shape[axis] != size:
                    raise CheckpointError(
                        f"shape {list(w.weight.shape)} does not match the expected [out={out_features}, in={in_features}]",
                        path=self.info(f"{key}.weight").file,
                        tensor=f"{key}.weight",
                    )
            return w
        raise CheckpointError(
            "linear layer not found: expected EXL3 tensors (.trellis/.suh/.svh) or a dense .weight",
            path=self.model_dir,
            tensor=key,
        )

    def dense_linear(self, key: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DenseWeight:
        weight = self.tensor(f"{key}.weight", dtype=dtype, device=device)
        if weight.dim() != 2:
            raise CheckpointError(f"a linear weight must be 2-D, got shape {list(weight.shape)}",
                                  path=self.info(f"{key}.weight").file, tensor=f"{key}.weight")
        bias = self.tensor(f"{key}.bias", dtype=dtype, device=device) if self.has_tensor(f"{key}.bias") else None
        return DenseWeight(weight=weight, bias=bias, key=key)

    def exl3_linear(self, key: str, *, device: str | torch.device = "cpu") -> Exl3Weight:
        """Load and validate the EXL3 linear under ``key``."""
        parts = self._modules.get(key, {})
        any_file = next(iter(parts.values())).file if parts else self.model_dir

        def need(*names: str) -> str:
            for n in names:
                if n in parts:
                    return n
            raise CheckpointError(
                f"EXL3 linear is incomplete: no {' or '.join(names)} tensor "
                f"(found: {', '.join(sorted(parts)) or 'nothing'})",
                path=any_file,
                tensor=f"{key}.{names[0]}",
            )

        trellis_info = parts[need("trellis")]
        tname = trellis_info.name
        if trellis_info.dtype != "I16" or len(trellis_info.shape) != 3:
            raise CheckpointError(
                f"trellis must be int16 [k/16, n/16, 16*K], got {trellis_info.dtype} {list(trellis_info.shape)}",
                path=trellis_info.file, tensor=tname)
        tk, tn, words = trellis_info.shape
        bits = bits_from_words(words)
        if bits is None:
            raise CheckpointError(
                f"trellis last dimension {words} is not 16*K for a supported K "
                f"({', '.join(str(b).removesuffix('.0') for b in SUPPORTED_BITS)})",
                path=trellis_info.file, tensor=tname)
        k, n = 16 * tk, 16 * tn
        if k % 128 or n % 128:
            raise CheckpointError(
                f"trellis {list(trellis_info.shape)} gives a [{k} x {n}] weight; EXL3 rotates in blocks of 128, "
                "so both dimensions must be multiples of 128",
                path=trellis_info.file, tensor=tname)

        codebook = self._codebook_of(key, parts)
        if is_half_integer(bits) and codebook != Codebook.MUL1:
            raise CheckpointError(
                f"{bits} bits per weight exists only with the MUL1 codebook, but this tensor uses {codebook.label}",
                path=trellis_info.file, tensor=tname)

        suh = self._scale_vector(key, parts, need("suh", "su"), k, "input", device)
        svh = self._scale_vector(key, parts, need("svh", "sv"), n, "output", device)

        bias = None
        if "bias" in parts:
            binfo = parts["bias"]
            if len(binfo.shape) != 1 or binfo.shape[0] > n:
                raise CheckpointError(f"bias must be 1-D with at most {n} entries, got {list(binfo.shape)}",
                                      path=binfo.file, tensor=binfo.name)
            bias = self.tensor(binfo.name, dtype=torch.float16, device=device)
            if bias.shape[0] < n:  # bias of the unpadded layer: pad like the weight
                bias = torch.nn.functional.pad(bias, (0, n - bias.shape[0]))

        trellis = self.tensor(tname, device=device)
        return Exl3Weight(trellis=trellis, suh=suh, svh=svh, bits=bits, codebook=codebook, bias=bias, key=key)

    def _codebook_of(self, key: str, parts: dict[str, TensorInfo]) -> Codebook:
        markers = [m for m in ("mcg", "mul1") if m in parts]
        if len(markers) == 2:
            raise CheckpointError("both .mcg and .mul1 codebook markers are present; a linear has one codebook",
                                  path=parts["mcg"].file, tensor=f"{key}.mcg")
        if not markers:
            return Codebook.THREE_INST
        marker = markers[0]
        info = parts[marker]
        expected = MCG_MULTIPLIER if marker == "mcg" else MUL1_MULTIPLIER
        if info.dtype != "I32" or info.numel != 1:
            raise CheckpointError(f"codebook marker must be an int32 scalar, got {info.dtype} {list(info.shape)}",
                                  path=info.file, tensor=info.name)
        value = int(self.tensor(info.name).reshape(-1)[0].item()) & 0xFFFFFFFF
        if value != expected:
            raise CheckpointError(
                f"unknown codebook multiplier 0x{value:08X} (the {marker.upper()} codebook uses "
                f"0x{expected:08X}); this model was made with an experimental converter option and cannot be decoded",
                path=info.file, tensor=info.name)
        return Codebook.MCG if marker == "mcg" else Codebook.MUL1

    def _scale_vector(self, key: str, parts: dict[str, TensorInfo], part: str, size: int, side: str,
                      device: str | torch.device) -> torch.Tensor:
        info = parts[part]
        trellis_shape = list(parts["trellis"].shape)
        if part in ("suh", "svh"):
            if len(info.shape) != 1 or info.shape[0] != size:
                raise CheckpointError(
                    f"{side}-side scales have shape {list(info.shape)} but the trellis {trellis_shape} implies [{size}]",
                    path=info.file, tensor=info.name)
            if info.dtype not in ("F16", "BF16", "F32"):
                raise CheckpointError(f"scales must be floating point, got {info.dtype}", path=info.file, tensor=info.name)
            return self.tensor(info.name, dtype=torch.float16, device=device)
        # legacy packed sign bits
        if info.dtype != "I16" or len(info.shape) != 1 or info.shape[0] * 16 != size:
            raise CheckpointError(
                f"legacy {side}-side sign bits have {info.dtype} {list(info.shape)} but the trellis "
                f"{trellis_shape} implies int16 [{size // 16}]",
                path=info.file, tensor=info.name)
        return unpack_sign_bits(self.tensor(info.name)).to(device)

    # ---------------------------------------------------------------- summary

    def unquantized_tensor_names(self) -> list[str]:
        """Tensors that are not part of an EXL3 linear (embeddings, norms, dense linears...)."""
        exl3 = set(self.exl3_linear_keys())
        return sorted(n for n in self._infos if n.rpartition(".")[0] not in exl3)

    def validate(self) -> list[Exl3Weight]:
        """Load every EXL3 linear once (validating each); returns them on CPU."""
        return list(self.iter_exl3_linears())

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.model_dir)!r}, {len(self._infos)} tensors)"


__all__ = [
    "Checkpoint",
    "HALF_INTEGER_BITS",
    "TensorInfo",
    "padded_size",
    "read_safetensors_header",
    "unpack_sign_bits",
]
