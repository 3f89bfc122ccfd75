"""Options that decide where and how a model runs (device, compute dtype, kernel backend)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import InvalidArgumentError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class RuntimeOptions:
    """How a loaded model computes.

    device:  where weights live and run ("cpu", "cuda", "cuda:1").
    dtype:   activation dtype; fp32 on CPU, fp16 on CUDA unless set.
    backend: kernel backend ("reference", "triton" or None for the best on the device).
    cache_decoded_weights: on the reference backend, keep each layer's decoded
             W_hat after first use (fast CPU runs of small models; costs 2 bytes
             per weight).
    batch_invariant: run each sequence's rows through the linear layers on
             their own, so that a job's output never depends on the jobs batched
             with it (on by default on CPU; on CUDA batched kernels are used for
             speed and results can differ in the last bits between batch sizes).
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    backend: str | None = None
    cache_decoded_weights: bool = True
    batch_invariant: bool = True
    plan: object = None  # devices.DevicePlan when layers are split over several devices

    def for_layer(self, index: int) -> "RuntimeOptions":
        """These options with the device that holds layer ``index``."""
        return self if self.plan is None else replace(self, device=self.plan.layer_devices[index])

    def for_embedding(self) -> "RuntimeOptions":
        return self if self.plan is None else replace(self, device=self.plan.embed_device)

    def for_head(self) -> "RuntimeOptions":
        return self if self.plan is None else replace(self, device=self.plan.head_device)

    @staticmethod
    def create(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               backend: str | None = None, cache_decoded_weights: bool = True,
               batch_invariant: bool | None = None) -> "RuntimeOptions":
        dev = torch.device(device or "cpu")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgumentError(f"device {str(dev)!r} was requested but CUDA is not available on this machine")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise InvalidArgumentError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        if dtype is None:
            dtype = torch.float16 if dev.type == "cuda" else torch.float32
        from .kernels.dispatch import resolve_backend

        resolve_backend(backend, dev)  # validates the name and availability
        if batch_invariant is None:
            batch_invariant = dev.type == "cpu"
        return RuntimeOptions(device=dev, dtype=dtype, backend=backend, cache_decoded_weights=cache_decoded_weights,
                              batch_invariant=batch_invariant)
