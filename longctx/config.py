"""Run settings and where each value came from: flag > LONGCTX_* env > user config > preset > default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

from .cpus import auto_threads
from .errors import UsageError
from .storage.paths import longctx_home

DEFAULTS: dict[str, Any] = {"model": None, "dtype": "auto", "device": "cpu", "threads": None, "segment": 512}
INT_KEYS = {"threads", "segment"}


@dataclass(frozen=True)
class RunSettings:
    """Resolved run settings plus the origin of each ("flag", "env", "user config", "preset", "default")."""

    values: dict[str, Any]
    origins: dict[str, str]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def user_config() -> dict[str, Any]:
    """LONGCTX_HOME/config.yaml, if present (keys as in DEFAULTS)."""
    path = longctx_home() / "config.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise UsageError(f"{path} must be a mapping")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}")
    return data


def resolve(flags: dict[str, Any], preset: dict[str, Any] | None = None) -> RunSettings:
    """Merge the layers; `flags` holds None for options the user did not give."""
    layers = [("flag", {k: v for k, v in flags.items() if v is not None}), ("env", _env()),
              ("user config", user_config()), ("preset", preset or {}), ("default", DEFAULTS)]
    values, origins = {}, {}
    for key in DEFAULTS:
        for origin, layer in layers:
            if key in layer and (layer[key] is not None or origin == "default"):
                values[key], origins[key] = _typed(key, layer[key], origin), origin
                break
    return RunSettings(values, origins)


def _env() -> dict[str, Any]:
    return {k: os.environ[f"LONGCTX_{k.upper()}"] for k in DEFAULTS if f"LONGCTX_{k.upper()}" in os.environ}


def _typed(key: str, value: Any, origin: str) -> Any:
    if key == "threads" and isinstance(value, str) and value.strip().lower() == "auto":
        return auto_threads()
    if key in INT_KEYS and value is not None:
        try:
            number = int(value)
        except (TypeError, ValueError):
            auto = " or 'auto'" if key == "threads" else ""
            raise UsageError(f"{key} from {origin} must be an integer{auto} (got {value!r})") from None
        if number < 1:
            raise UsageError(f"{key} from {origin} must be >= 1 (got {number})")
        return number
    return value
