"""The resumable work directory ``OUT_DIR/.work``.

After each decoder layer (and the head) is quantized, its EXL3 tensors and
quality records are saved here, together with the calibration hidden states
that the *quantized* layer produced (the next layer's input). A restarted
conversion with the same options skips every finished layer and continues
from the last saved hidden states. Files are written under a temporary name
and renamed, and a layer counts as done only once its record file exists, so
an interruption never leaves a half-written layer that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConversionError

JOB_FILE = "job.json"


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_write_json(data, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class WorkDir:
    def __init__(self, out_dir: Path, job: dict):
        self.path = out_dir / ".work"
        self.job = job

    def open(self) -> bool:
        """Create or reopen the work directory; True when resuming. Refuses a job made with other options."""
        job_file = self.path / JOB_FILE
        if job_file.exists():
            try:
                previous = json.loads(job_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConversionError(f"{job_file} is unreadable ({e}); delete {self.path} to start over") from e
            if previous != self.job:
                changed = sorted(k for k in set(previous) | set(self.job) if previous.get(k) != self.job.get(k))
                raise ConversionError(
                    f"{self.path} holds an unfinished conversion made with different options "
                    f"({', '.join(f'{k}: {previous.get(k)!r} -> {self.job.get(k)!r}' for k in changed)}); "
                    f"rerun with the same options to resume, or delete {self.path} to start over")
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(self.job, job_file)
        return False

    # ------------------------------------------------------------ units (layers, head)

    def _record_path(self, unit: str) -> Path:
        return self.path / f"{unit}.json"

    def is_done(self, unit: str) -> bool:
        return self._record_path(unit).exists()

    def save_unit(self, unit: str, tensors: dict[str, torch.Tensor], records: dict) -> None:
        _atomic_save_tensors(tensors, self.path / f"{unit}.safetensors")
        _atomic_write_json(records, self._record_path(unit))  # last: marks the unit done

    def load_records(self, unit: str) -> dict:
        return json.loads(self._record_path(unit).read_text())

    def load_tensors(self, unit: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / f"{unit}.safetensors"))

    # ------------------------------------------------------------ hidden states

    def save_hidden(self, after_layer: int, hidden: torch.Tensor) -> None:
        _atomic_save_tensors({"hidden": hidden}, self.path / f"hidden_{after_layer}.safetensors")
        stale = self.path / f"hidden_{after_layer - 1}.safetensors"
        if stale.exists():
            stale.unlink()

    def load_hidden(self, after_layer: int) -> torch.Tensor | None:
        path = self.path / f"hidden_{after_layer}.safetensors"
        return load_file(str(path))["hidden"] if path.exists() else None
