"""Placing a model's layers on several GPUs of one machine.

``plan_layers`` fills devices in order: the embedding and the first layers go to
the first device until its budget is used, then the next, and the last device
also takes the final norm and the output head. Budgets come from ``gpu_split``
(GB per device, as TabbyAPI and ExLlama take it) or, with ``"auto"``, from each
device's free memory minus a reserve for the cache and activations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import InvalidArgumentError

GB = 1024**3
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class DevicePlan:
    layer_devices: tuple[torch.device, ...]
    embed_device: torch.device
    head_device: torch.device

    @property
    def devices(self) -> list[torch.device]:
        return sorted({self.embed_device, self.head_device, *self.layer_devices}, key=str)


def tensor_bytes_by_layer(checkpoint, num_layers: int) -> tuple[list[int], int, int]:
    """Bytes stored per decoder layer, for the embedding, and for everything else (norm, head)."""
    layers = [0] * num_layers
    embed = other = 0
    for name in checkpoint.tensor_names():
        nbytes = checkpoint.info(name).nbytes
        m = _LAYER.search(name)
        if m and int(m.group(1)) < num_layers:
            layers[int(m.group(1))] += nbytes
        elif "embed" in name:
            embed += nbytes
        else:
            other += nbytes
    return layers, embed, other


def plan_layers(layer_bytes: list[int], embed_bytes: int, head_bytes: int, budgets_gb: list[float],
                devices: list[torch.device]) -> DevicePlan:
    if len(budgets_gb) != len(devices):
        raise InvalidArgumentError(f"gpu_split has {len(budgets_gb)} entries but {len(devices)} devices are used")
    if any(b < 0 for b in budgets_gb):
        raise InvalidArgumentError(f"gpu_split entries must be >= 0 GB, got {budgets_gb}")
    left = [b * GB for b in budgets_gb]
    dev = 0
    left[0] -= embed_bytes
    placed = []
    for i, size in enumerate(layer_bytes):
        while dev < len(devices) and left[dev] < size:
            dev += 1
        if dev == len(devices):
            total = (sum(layer_bytes) + embed_bytes + head_bytes) / GB
            raise InvalidArgumentError(
                f"the model does not fit: layer {i} of {len(layer_bytes)} has no room left; the model needs "
                f"{total:.2f} GB and gpu_split gives {sum(budgets_gb):.2f} GB ({', '.join(f'{b:g}' for b in budgets_gb)})")
        left[dev] -= size
        placed.append(devices[dev])
    last = placed[-1] if placed else devices[0]
    if left[devices.index(last)] < head_bytes:
        later = [d for d in range(devices.index(last) + 1, len(devices)) if left[d] >= head_bytes]
        if not later:
            raise InvalidArgumentError(f"the model does not fit: no room for the output head ({head_bytes / GB:.2f} GB) "
                                       f"with gpu_split {budgets_gb}")
        last = devices[later[0]]
    return DevicePlan(tuple(placed), devices[0], last)


def auto_budgets(devices: list[torch.device], reserve_gb: float) -> list[float]:
    """Free memory of each CUDA device minus ``reserve_gb`` for the cache and activations."""
    out = []
    for d in devices:
        free, _ = torch.cuda.mem_get_info(d)
        out.append(max(0.0, free / GB - reserve_gb))
    return out


def make_plan(checkpoint, num_layers: int, gpu_split, devices: list[torch.device] | None = None,
              reserve_gb: float = 2.0) -> DevicePlan:
    """The device plan for ``gpu_split`` (list of GB, or "auto") over ``devices`` (default: every CUDA GPU)."""
    if devices is None:
        if not torch.cuda.is_available():
            raise InvalidArgumentError("gpu_split needs CUDA GPUs, and none is available")
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    layer_bytes, embed, other = tensor_bytes_by_layer(checkpoint, num_layers)
    if gpu_split == "auto":
        budgets = auto_budgets(devices, reserve_gb)
    elif isinstance(gpu_split, (list, tuple)) and all(isinstance(b, (int, float)) for b in gpu_split):
        budgets = [float(b) for b in gpu_split]
        devices = devices[:len(budgets)] if len(budgets) <= len(devices) else devices
    else:
        raise InvalidArgumentError(f"gpu_split must be a list of GB per GPU or 'auto', got {gpu_split!r}")
    return plan_layers(layer_bytes, embed, other, budgets, devices)
