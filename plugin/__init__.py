"""exl3-triton: run EXL3-quantized language models with Triton kernels.

Public API (imported lazily so that ``import exl3_triton`` stays cheap and the
subpackages can import ``exl3_triton.errors`` without cycles):

    exl3_triton.load(model_dir, ...)   -> Model
    exl3_triton.Generator(model, ...)  -> continuous-batching generator (Job, SamplingParams, JobEvent)
    exl3_triton.AsyncGenerator(gen)    -> the same from asyncio
    exl3_triton.Checkpoint(model_dir)  -> checkpoint reader
"""

from __future__ import annotations

from .errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    Exl3TritonError,
    InvalidArgumentError,
    UnsupportedArchitectureError,
)

__version__ = "0.1.0"

_LAZY = {
    "load": ("exl3_triton.model", "load"),
    "Model": ("exl3_triton.model", "Model"),
    "LoadOptions": ("exl3_triton.model", "LoadOptions"),
    "Checkpoint": ("exl3_triton.checkpoint", "Checkpoint"),
    "Tokenizer": ("exl3_triton.tokenizer", "Tokenizer"),
    "Generator": ("exl3_triton.runtime.generator", "Generator"),
    "AsyncGenerator": ("exl3_triton.runtime.async_generator", "AsyncGenerator"),
    "Job": ("exl3_triton.runtime.job", "Job"),
    "JobEvent": ("exl3_triton.runtime.job", "JobEvent"),
    "SamplingParams": ("exl3_triton.runtime.sampling", "SamplingParams"),
    "convert_model": ("exl3_triton.convert", "convert_model"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'exl3_triton' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "Exl3TritonError",
    "InvalidArgumentError",
    "UnsupportedArchitectureError",
    "__version__",
    *_LAZY,
]
