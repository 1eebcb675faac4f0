"""YAML presets: a method, its segment length and options, validated against the method's dataclass."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError, did_you_mean
from .storage.paths import longctx_home

FORMAT = 1
KEYS = {"format", "method", "description", "segment", "options", "adapter"}


@dataclass(frozen=True)
class Preset:
    """A validated preset: `options` has passed the method's Options dataclass."""

    name: str
    method: str
    segment: int | None
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: str | None = None
    adapter: str | None = None  # trained parameters the method loads (name or directory), for trainable methods


def _packaged() -> dict[str, Any]:
    root = importlib.resources.files("longctx.preset_files")
    return {p.name.removesuffix(".yaml"): p for p in root.iterdir() if p.name.endswith(".yaml")}


def _user() -> dict[str, Path]:
    d = longctx_home() / "presets"
    return {p.stem: p for p in d.glob("*.yaml")} if d.is_dir() else {}


def available() -> dict[str, Any]:
    """Preset name -> file; user presets (LONGCTX_HOME/presets) shadow packaged ones."""
    return {**_packaged(), **_user()}


def summary(name: str) -> dict[str, Any]:
    """A preset's method, segment and description as its file states them, unvalidated (for listings:
    validating imports every method, and with them torch; `load_preset` validates)."""
    data = yaml.safe_load(available()[name].read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise UsageError(f"preset '{name}' must be a mapping")
    return {"name": name, "method": data.get("method"), "segment": data.get("segment"),
            "description": data.get("description", "")}


def load_preset(name_or_path: str) -> Preset:
    """Load a preset by name, or from a path ending in .yaml/.yml."""
    if name_or_path.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
        if not path.is_file():
            raise UsageError(f"preset file {path} does not exist")
        return parse_preset(path.read_text(encoding="utf-8"), name=path.stem, path=str(path))
    found = available()
    from .methods import METHODS  # here, not at import: listing presets needs no torch

    if name_or_path not in found and name_or_path in METHODS:  # a plugin's method: its own defaults
        return Preset(name_or_path, name_or_path, None, {}, METHODS[name_or_path].summary)
    if name_or_path not in found:
        known = sorted(set(found) | set(METHODS))
        raise UsageError(f"unknown method or preset '{name_or_path}'{did_you_mean(name_or_path, known)}; "
                         f"available: {', '.join(known)}")
    src = found[name_or_path]
    return parse_preset(src.read_text(encoding="utf-8"), name=name_or_path, path=str(src))


def parse_preset(text: str, *, name: str, path: str | None = None) -> Preset:
    """Validate preset YAML: format, known keys, known method, option names and types."""
    where = f"preset '{name}'"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a mapping with keys {', '.join(sorted(KEYS))}")
    if data.get("format") != FORMAT:
        raise UsageError(f"{where} has format {data.get('format')!r}; this longctx reads format {FORMAT}")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise UsageError(f"{where} has unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(KEYS))}")
    from .methods import get_method

    method = get_method(str(data.get("method")))
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise UsageError(f"{where}: 'options' must be a mapping")
    method.Options.from_mapping(options, where=f"{where} option")
    segment = data.get("segment")
    if segment is not None and (not isinstance(segment, int) or isinstance(segment, bool) or segment < 1):
        raise UsageError(f"{where}: 'segment' must be a positive integer (got {segment!r})")
    adapter = data.get("adapter")
    if adapter is not None and not (isinstance(adapter, str) and adapter):
        raise UsageError(f"{where}: 'adapter' must be an adapter name or directory (got {adapter!r})")
    return Preset(name=name, method=method.name, segment=segment, options=dict(options),
                  description=str(data.get("description", "")), path=path, adapter=adapter)
