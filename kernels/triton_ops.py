"""Loads the Triton kernel modules on first use.

Triton decides at decoration time whether a kernel is compiled for the GPU or
run by its interpreter (``TRITON_INTERPRET=1``). On a machine without CUDA the
interpreter is the only way to run them, so ``load()`` switches it on before the
first import; that is how the CPU test suite and ``--backend triton`` on a CPU
execute the very same kernel code.
"""

from __future__ import annotations

import importlib
import os
import types

_MODULES: types.SimpleNamespace | None = None
_ERROR: str | None = None


def load() -> types.SimpleNamespace | None:
    """The kernel modules (``attention``, ``dequant``, ``gemm``, ``hadamard``, ``moe``, ...), or None if Triton cannot run here."""
    global _MODULES, _ERROR
    if _MODULES is not None or _ERROR is not None:
        return _MODULES
    try:
        import torch

        if not torch.cuda.is_available():
            if os.environ.get("TRITON_INTERPRET", "1") != "1":
                raise RuntimeError("no CUDA device and TRITON_INTERPRET is switched off")
            os.environ["TRITON_INTERPRET"] = "1"
        importlib.import_module("triton")
        pkg = __name__.rsplit(".", 1)[0]
        _MODULES = types.SimpleNamespace(
            act=importlib.import_module(f"{pkg}.triton_act"),
            attention=importlib.import_module(f"{pkg}.triton_attention"),
            dequant=importlib.import_module(f"{pkg}.triton_dequant"),
            gemm=importlib.import_module(f"{pkg}.triton_gemm"),
            hadamard=importlib.import_module(f"{pkg}.triton_hadamard"),
            mhc=importlib.import_module(f"{pkg}.triton_mhc"),
            mla=importlib.import_module(f"{pkg}.triton_mla"),
            mla_keys=importlib.import_module(f"{pkg}.triton_mla_keys"),
            moe=importlib.import_module(f"{pkg}.triton_moe"),
            mome=importlib.import_module(f"{pkg}.triton_mome"),
            norm=importlib.import_module(f"{pkg}.triton_norm"),
            reconstruct=importlib.import_module(f"{pkg}.triton_reconstruct"),
            rope=importlib.import_module(f"{pkg}.triton_rope"),
            router=importlib.import_module(f"{pkg}.triton_router"),
            viterbi=importlib.import_module(f"{pkg}.triton_viterbi"),
        )
    except Exception as e:  # ImportError, or a Triton that does not work on this platform
        _ERROR = f"{type(e).__name__}: {e}"
    return _MODULES


def cuda_kernel(x, module: str, name: str):
    """The kernel function ``module.name`` where ``x`` lives on CUDA and Triton runs, else None
    (the caller takes its PyTorch path: on a CPU, the interpreter would be far slower)."""
    if not x.is_cuda:
        return None
    ops = load()
    return None if ops is None else getattr(getattr(ops, module), name)


def unavailable_reason() -> str | None:
    load()
    return _ERROR


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
