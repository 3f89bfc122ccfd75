"""What both host integrations share: option checking, model-directory checks, loading a model and
its generator with the host's options, draft statistics, and load-progress phases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Exl3TritonError, InvalidArgumentError
from ..runtime.drafting_options import DraftOptions

log = logging.getLogger("exl3_triton.integrations")


# ------------------------------------------------------------------ option values

def option_int(name: str, value, *, minimum: int | None = None) -> int | None:
    """``value`` as an int (None stays None); a wrong value raises an error naming the option."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidArgumentError(f"option {name}: expected an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgumentError(f"option {name}: expected an integer, got {value!r}") from None
    if isinstance(value, float) and number != value:
        raise InvalidArgumentError(f"option {name}: expected an integer, got {value!r}")
    if minimum is not None and number < minimum:
        raise InvalidArgumentError(f"option {name}: must be >= {minimum}, got {number}")
    return number


def option_fraction(name: str, value) -> float | None:
    """``value`` as a number from 0 to 1 (None stays None); a wrong value raises an error naming the option."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if isinstance(value, bool) or number is None or not 0.0 <= number <= 1.0:
        raise InvalidArgumentError(f"option {name}: expected a number from 0 to 1, got {value!r}")
    return number


def option_bool(name: str, value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.strip().lower() in ("true", "yes", "1", "on")
    raise InvalidArgumentError(f"option {name}: expected true or false, got {value!r}")


def option_gb_list(name: str, value) -> list[float] | None:
    """A GPU split: a list of GB per GPU (or the webui's "20,7,7" text). Empty means none."""
    if value is None or value == "" or value == []:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise InvalidArgumentError(f"option {name}: expected a list of GB per GPU, got {value!r}")
    try:
        split = [float(x) for x in items]
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"option {name}: expected numbers (GB per GPU), got {value!r}") from None
    if any(x < 0 for x in split) or not any(x > 0 for x in split):
        raise InvalidArgumentError(f"option {name}: GB per GPU must be >= 0 with at least one > 0, got {value!r}")
    return split


def option_choice(name: str, value, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f"option {name}: {value!r} is not one of {', '.join(choices)}")
    return value


# ------------------------------------------------------------------ model directory

def check_model_dir(model_dir: str | Path) -> str:
    """Fail early, with a message a host can show, for a directory exl3-triton cannot run (missing,
    not a Hugging Face model, quantized with another method, unknown architecture). Returns the
    architecture string."""
    from ..arch import registry
    from ..checkpoint import Checkpoint

    try:
        checkpoint = Checkpoint(model_dir)
        registry.resolve(checkpoint.architecture, config_path=checkpoint.config_path)
    except Exl3TritonError as e:
        raise InvalidArgumentError(f"exl3-triton cannot load {model_dir}: {e}") from e
    if not (Path(model_dir) / "tokenizer.json").exists():
        raise InvalidArgumentError(f"exl3-triton cannot load {model_dir}: it has no tokenizer.json, "
                                   "which a host needs to turn text into tokens")
    return checkpoint.architecture


# ------------------------------------------------------------------ loading

@dataclass
class HostOptions:
    """What a host decides about a load, in this package's terms."""

    max_seq_len: int | None = None
    cache_tokens: int | None = None
    chunk_size: int | None = None
    max_batch_size: int | None = None
    gpu_split: list[float] | str | None = None
    device: str | None = None
    dtype: str | None = None
    backend: str | None = None
    draft: DraftOptions = field(default_factory=DraftOptions)

    def generator_kwargs(self) -> dict:
        kw = {"max_seq_len": self.max_seq_len, "cache_tokens": self.cache_tokens}
        if self.chunk_size is not None:
            kw["chunk_size"] = self.chunk_size
        if self.max_batch_size is not None:
            kw["max_batch_size"] = self.max_batch_size
        return kw


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_generator(model, options: HostOptions):
    from ..runtime.generator import Generator

    kwargs = options.generator_kwargs()
    net = model.network  # mode "mtp" drafts with MTP layers or a block drafter (DeepSeek-V4 DSpark)
    if options.draft.mode == "mtp" and not getattr(net, "mtp_depth", 0) and getattr(net, "block_drafter", None) is None:
        raise InvalidArgumentError(f"draft mode 'mtp': {model.checkpoint.model_dir} has no MTP draft layers; "
                                   "choose draft mode ngram, model or disabled")
    return Generator(model, draft=options.draft, **kwargs)


def load_model(model_dir: str | Path, options: HostOptions, progress=None):
    """Check, load and wrap a model for a host: returns ``(model, generator)``."""
    from ..model import load

    check_model_dir(model_dir)
    model = load(model_dir, device=None if options.gpu_split else (options.device or default_device()),
                 dtype=options.dtype, backend=options.backend, gpu_split=options.gpu_split, progress=progress)
    return model, make_generator(model, options)


def draft_counts(job) -> tuple[int, int] | None:
    """(accepted, rejected) drafted tokens of a finished job, or None when it did not draft."""
    stats = getattr(job.stats, "draft", None)
    if stats is None:
        return None
    d = stats.as_dict()
    return d["draft_accept"], d["draft_reject"]


# ------------------------------------------------------------------ load progress

class ProgressPhase:
    """Turns a model's ``progress(done, total)`` calls into one host progress phase: it starts at
    ``(0, total)`` and ends with exactly one ``(total, total)`` (TabbyAPI starts a new bar on 0 and
    moves to the next phase on done == total)."""

    def __init__(self):
        self.total: int | None = None
        self.last = -1

    def feed(self, done: int, total: int) -> list[tuple[int, int]]:
        out = []
        if self.total is None:
            self.total = max(int(total), 1)
            out.append((0, self.total))
            self.last = 0
        done = min(int(done), self.total)
        if done > self.last:
            out.append((done, self.total))
            self.last = done
        return out

    def finish(self) -> list[tuple[int, int]]:
        out = [] if self.total is not None else self.feed(0, 1)
        if self.last < self.total:
            out.append((self.total, self.total))
            self.last = self.total
        return out
