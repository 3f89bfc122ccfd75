"""The exceptions a user can cause.

Every error that bad input can provoke (a broken checkpoint, an unknown
architecture, a mis-shaped tensor, a bad option) is raised as one of these, with
a message that names the file, tensor or option involved and says what to do.
Code that catches ``Exl3TritonError`` therefore catches everything a user can
trigger, and nothing else.
"""

from __future__ import annotations

from pathlib import Path


class Exl3TritonError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(Exl3TritonError):
    """A model directory, file or tensor is missing, unreadable or malformed.

    ``path`` is the file (or directory) at fault and ``tensor`` the tensor name,
    when there is one; both are also part of the message.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, tensor: str | None = None):
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        where = []
        if tensor is not None:
            where.append(f"tensor '{tensor}'")
        if path is not None:
            where.append(f"in {self.path}")
        prefix = (" ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class ConfigError(CheckpointError):
    """config.json (or quantization_config.json) is missing a key or holds a value we cannot run."""


class UnsupportedArchitectureError(ConfigError):
    """config.json names an architecture no registered adapter serves."""


class InvalidArgumentError(Exl3TritonError, ValueError):
    """A caller passed an option or tensor that does not fit (wrong shape, dtype, unknown option)."""


class ConversionError(Exl3TritonError):
    """The converter cannot go on: a work directory from different options, an unusable output directory,
    a tensor the converter cannot quantize. The message names the path, tensor or option."""
