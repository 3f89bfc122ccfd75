"""The converter's quality oracle for random tiny models: the same model with unshaped noise."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file


def with_weight_noise(src, dst, relative_errors: dict[str, float], seed: int):
    """A copy of the model in ``src`` whose listed linears (``{module key: relative error}``) carry
    Gaussian noise of that relative size, as large as their measured quantization error but with
    no shaping by calibration Hessians."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for key, err in relative_errors.items():
        w = tensors[f"{key}.weight"].float()
        z = torch.randn(w.shape, generator=g)
        tensors[f"{key}.weight"] = (w + z * (err * w.norm() / z.norm())).to(tensors[f"{key}.weight"].dtype)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
