"""What every benchmark result file carries beyond the method protocol: model, software, machine and moment.

A timing means little without the load the machine was under, and a number cannot be reproduced without
the exact code (commit, and whether the tree had uncommitted changes) and library versions it came from.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..cpus import load_averages
from ..errors import UsageError
from ..model.backbone import Backbone
from ..model.identity import library_versions
from ..run import environment

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../longctx
GIT_TIMEOUT_S = 5.0


def run_record(backbone: Backbone, *, seed: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a result file must carry beyond the method protocol, JSON-serialisable.

    Extends `longctx.run.environment()` (whose keys are kept as they are) with the model fingerprint,
    dtype and device, library versions, the git state of the package's checkout, the CPU model, RAM, load
    averages, the GPU in use, the command line, a UTC timestamp and the seed. `extra` keys are added last.
    """
    record = environment()
    record.update({
        "model": dict(backbone.fingerprint),
        "dtype": str(backbone.dtype).removeprefix("torch."),
        "device": str(backbone.device),
        "versions": library_versions(),
        "git": git_state(),
        "cpu_model": cpu_model(),
        "load_avg": load_averages(),
        "ram_total_mb": total_ram_mb(),
        "gpu": gpu_name(backbone.device),
        "command": list(sys.argv),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
    })
    record.update(extra or {})
    return record


def git_state(directory: Path = PACKAGE_DIR) -> dict[str, Any] | None:
    """`{"commit", "dirty"}` of the git checkout the package is imported from; None when it is not a checkout
    (an installed wheel), git is missing or fails. `dirty`: uncommitted changes, untracked files included."""
    root = _git(directory, "rev-parse", "--show-toplevel")
    # a wheel installed into a venv inside some other repository must not report that repository's commit
    if root is None or not _git(Path(root), "ls-files", "--", str(directory / "__init__.py")):
        return None
    commit = _git(Path(root), "rev-parse", "HEAD")
    if commit is None:  # a repository without commits
        return None
    status = _git(Path(root), "status", "--porcelain")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _git(directory: Path, *args: str) -> str | None:
    """stdout of one git command (stripped), or None on any failure: a record must never fail on git."""
    try:
        out = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                             timeout=GIT_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform.processor()` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None




def total_ram_mb() -> float | None:
    """Physical memory in MiB, where the OS reports it."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20, 1)
    except (AttributeError, ValueError, OSError):
        return None


def gpu_name(device: torch.device) -> str | None:
    """Name of the CUDA device the model runs on (the current one if it runs on the CPU); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device if device.type == "cuda" else None)


def bench_backbone(backbone: Backbone | None = None, *, model: str | None = None, dtype: str | None = None,
                   device: str | None = None, threads: int | None = None) -> Backbone:
    """The given backbone, else the model the settings name (flag > env > user config > default), loaded."""
    if backbone is not None:
        return backbone
    from ..run import backbone_for, resolve_settings

    return backbone_for(resolve_settings(model=model, dtype=dtype, device=device, threads=threads))


def described(result: dict[str, Any], filler: str, backbone: Backbone) -> dict[str, Any]:
    """A benchmark's result with what every result file carries: schema, filler, model, environment."""
    return {"schema_version": 1, **result, "filler": filler, "model": backbone.fingerprint, "environment": environment()}


def named_bench(run: Callable[..., Any], filler: str, methods: Sequence[str], config: Any, *,
                model: str | None = None, dtype: str | None = None, device: str | None = None,
                threads: int | None = None, backbone: Backbone | None = None, **kwargs: Any) -> dict[str, Any]:
    """A benchmark over named methods as a library call: each method named once, the model loaded unless
    given, `run(backbone, methods, filler, config, **kwargs)` run, and its report described."""
    if len(set(methods)) < len(methods):
        raise UsageError("name each method once")
    backbone = bench_backbone(backbone, model=model, dtype=dtype, device=device, threads=threads)
    return described(run(backbone, methods, filler, config, **kwargs).to_dict(), filler, backbone)
