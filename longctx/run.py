"""One place that sets up every run: settings resolved once (flag > LONGCTX_* env > user config > preset >
default, with origins), the backbone loaded, the method built with its adapter, and the environment record
that every result carries. Every task (ppl, corpus, ask, generate, train, bench) starts here."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

import torch

from .config import RunSettings, resolve
from .cpus import load_average
from .errors import LongctxError, ModelError, UsageError
from .methods import get_method
from .methods.base import Method
from .model.backbone import Backbone
from .model.models import load_backbone
from .presets import Preset, load_preset
from .resources import peak_rss_mb
from .storage.adapters import attach_adapter, require_trained
from .storage.checkpoint import RunSpec


def resolve_settings(*, model: str | None = None, dtype: str | None = None, device: str | None = None,
             threads: int | None = None, segment: int | None = None, preset: Preset | None = None) -> RunSettings:
    """The run's settings from the flags given (None: not given), the environment, the user config and the
    preset, each with where it came from."""
    flags = {"model": model, "dtype": dtype, "device": device, "threads": threads, "segment": segment}
    return resolve(flags, {"segment": preset.segment} if preset is not None else None)


def backbone_for(run: RunSettings, device: Any = None) -> Backbone:
    """Load the model the settings name (`device` overrides theirs, e.g. a distributed rank's GPU)."""
    check_model_path(run["model"])
    return load_backbone(run["model"], dtype=run["dtype"], device=device or run["device"], threads=run["threads"])


def check_model_path(model: str | None) -> None:
    """A model written as a path (/x, ./x, ../x, ~/x) must be a directory: without this check the Hugging Face
    hub would answer a missing one with its repo-id rules, which say nothing about the real problem."""
    if not model or not model.startswith(("/", "./", "../", "~")):
        return
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        raise ModelError(f"model directory not found: {model}",
                         hint="give a local directory holding config.json, or a Hugging Face model id")
    if not os.path.isdir(path):
        raise ModelError(f"--model {model} is a file; give the directory that holds the model's config.json")


def environment() -> dict[str, Any]:
    """Library versions, threads, machine, the process's peak RSS so far and the command line, printed with
    every result (a result file without the command that produced it cannot be reproduced or checked)."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_avg_1m": load_average(), "peak_rss_mb": peak_rss_mb(), "command": list(sys.argv)}


def build_method(spec: str | Preset, backbone: Backbone, overrides: dict[str, Any] | None = None, *,
                 adapter: str | None = None, allow_untrained: bool = False) -> tuple[Method, Preset]:
    """Instantiate a method from a preset name/path (or Preset), with option overrides. A trainable method
    loads `adapter` (else the preset's); without one it refuses unless `allow_untrained`."""
    preset = load_preset(spec) if isinstance(spec, str) else spec
    cls = get_method(preset.method)
    options = cls.Options.from_mapping({**preset.options, **(overrides or {})}, where=f"{preset.method} option")
    method = cls(options, backbone)
    if adapter:
        attach_adapter(method, adapter, backbone)
    elif preset.adapter:
        _attach_preset_adapter(method, preset, preset.adapter, backbone, allow_untrained)
    else:
        require_trained(method, allow_untrained)
    return method, preset


def prepare_run(name: str, *, model: str | None = None, dtype: str | None = None, device: str | None = None,
                threads: int | None = None, segment: int | None = None, options: dict[str, Any] | None = None,
                adapter: str | None = None, allow_untrained: bool = False,
                backbone: Backbone | None = None) -> tuple[Backbone, RunSpec, float]:
    """One method ready to read a document: settings resolved (flag > env > user config > preset > default),
    the backbone loaded (unless given), the method built and its segment checked. Returns the seconds the
    backbone took to load (0 when given)."""
    preset = load_preset(name)
    run = resolve_settings(model=model, dtype=dtype, device=device, threads=threads, segment=segment, preset=preset)
    t0 = time.perf_counter()
    if backbone is None:
        backbone = backbone_for(run)
    load_s = time.perf_counter() - t0
    method, _ = build_method(preset, backbone, options, adapter=adapter, allow_untrained=allow_untrained)
    method.check_segment(run["segment"])
    return backbone, RunSpec(method, preset.name, run["segment"], None), load_s


def _attach_preset_adapter(method: Method, preset: Preset, adapter: str, backbone: Backbone,
                           allow_untrained: bool) -> None:
    """The preset's adapter (`adapter`) fits the model it was trained on; on another model the method runs
    untrained only when that is allowed, else the refusal says why and what to do."""
    try:
        attach_adapter(method, adapter, backbone)
    except LongctxError as e:
        if not allow_untrained:
            raise UsageError(f"preset '{preset.name}' names adapter '{adapter}', which does not fit this run "
                             f"({e}); pass --adapter NAME, or --allow-untrained to run {method.name} untrained") from None
