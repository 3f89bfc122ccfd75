"""``load()`` and ``Model``: a checkpoint, its adapter and its tokenizer, ready to run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .arch import registry
from .arch.base import CausalLM
from .checkpoint import Checkpoint
from .errors import InvalidArgumentError
from .options import RuntimeOptions
from .tokenizer import Tokenizer

ProgressCallback = Callable[[int, int], None]


class Model:
    """A loaded model.

    ``model.forward(ids)`` runs the whole sequence (no cache) and returns fp32
    logits; ``model.tokenizer`` is None if the directory has no tokenizer.json.
    """

    def __init__(self, checkpoint: Checkpoint, network: CausalLM, tokenizer: Tokenizer | None,
                 options: RuntimeOptions):
        self.checkpoint = checkpoint
        self.network = network
        self.tokenizer = tokenizer
        self.options = options

    @property
    def config(self):
        return self.network.config

    @property
    def architecture(self) -> str:
        return self.checkpoint.architecture

    @property
    def vocab_size(self) -> int:
        return self.network.vocab_size

    def check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Validate a batch of token ids (``[T]`` or ``[B, T]``) -> ``[B, T]`` long on the model's device."""
        ids = torch.as_tensor(ids)
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() not in (1, 2) or ids.numel() == 0:
            raise InvalidArgumentError(
                f"token ids must be a non-empty integer tensor of shape [T] or [B, T], got {ids.dtype} {list(ids.shape)}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bool(bad.any()):
            raise InvalidArgumentError(
                f"token id {int(ids[bad][0])} is outside the vocabulary [0, {self.vocab_size})")
        if ids.dim() == 1:
            ids = ids[None]
        return ids.to(device=self.options.device, dtype=torch.long)

    @torch.inference_mode()
    def forward(self, ids) -> torch.Tensor:
        """Logits fp32 ``[B, T, vocab]`` (``[T, vocab]`` for 1-D input) for the whole sequence."""
        squeeze = torch.as_tensor(ids).dim() == 1
        logits = self.network(self.check_ids(ids))
        return logits[0] if squeeze else logits

    def __repr__(self) -> str:
        return f"Model({self.architecture}, {self.checkpoint.model_dir}, device={self.options.device})"


def load(
    model_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    gpu_split: list[float] | str | None = None,
    devices: list | None = None,
    progress: ProgressCallback | None = None,
) -> Model:
    """Load a model directory (EXL3 or unquantized) for the architecture its config names.

    ``gpu_split``: spread the layers over several GPUs, as a list of GB per GPU or
    ``"auto"`` (by free memory); ``devices`` overrides which devices that means
    (default: every CUDA GPU). ``progress(done, total)`` is called as layers load.
    """
    checkpoint = Checkpoint(model_dir)
    tokenizer = Tokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").exists() else None
    return load_checkpoint(checkpoint, tokenizer=tokenizer, device=device, dtype=dtype, backend=backend,
                           gpu_split=gpu_split, devices=devices, progress=progress)


def load_checkpoint(checkpoint, *, tokenizer: Tokenizer | None = None, device=None, dtype=None, backend=None,
                    gpu_split=None, devices=None, progress: ProgressCallback | None = None) -> Model:
    """Build a model from an already opened checkpoint (or anything with the same interface, such as
    the benchmarks' synthetic checkpoints)."""
    options = RuntimeOptions.create(device=device if gpu_split is None else (devices or ["cuda"])[0],
                                    dtype=dtype, backend=backend)
    adapter = registry.resolve(checkpoint.architecture, config_path=checkpoint.config_path)
    if gpu_split is not None:
        from dataclasses import replace

        from .devices import make_plan

        num_layers = adapter.config_from_checkpoint(checkpoint).num_layers
        plan = make_plan(checkpoint, num_layers, gpu_split,
                         devices=[torch.device(d) for d in devices] if devices else None)
        options = replace(options, plan=plan, device=plan.embed_device)
    network = adapter.from_checkpoint(checkpoint, options, progress=progress)
    network.eval()
    return Model(checkpoint, network, tokenizer, options)
