"""Typed reading of Hugging Face ``config.json`` values with errors that name the key and file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError

_MISSING = object()


class ConfigReader:
    """Reads typed keys from a config dict; ``prefix`` names a nested section in messages."""

    def __init__(self, cfg: dict, path: str | Path, prefix: str = ""):
        self.cfg = cfg
        self.path = path
        self.prefix = prefix

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return self.cfg.get(key) is not None

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        value = self.cfg.get(key, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise ConfigError(f"required key '{self._name(key)}' is missing", path=self.path)
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if bool not in kinds and isinstance(value, bool) or not isinstance(value, kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise ConfigError(f"key '{self._name(key)}' should be {names}, got {value!r}", path=self.path)
        return value

    def require(self, key: str, allowed: tuple, value: Any, why: str = "") -> None:
        """Reject a value the adapter does not implement, naming key and allowed values."""
        if value not in allowed:
            extra = f" ({why})" if why else ""
            raise ConfigError(
                f"key '{self._name(key)}' = {value!r} is not supported; supported: {', '.join(map(repr, allowed))}{extra}",
                path=self.path,
            )

    def section(self, key: str) -> "ConfigReader":
        sub = self.get(key, dict)
        return ConfigReader(sub, self.path, prefix=f"{self._name(key)}.")
