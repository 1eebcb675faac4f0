"""Process resource readings for results: peak resident memory, resettable between runs on Linux."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs) so the next reading is per run."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size in MiB since the last reset (or process start)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory allocated by torch since the last reset, if a GPU is in use."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def release_memory() -> None:
    """Hand freed memory back to the system between runs. glibc keeps the heap pages of freed tensors:
    measured, `memorizing` over 8k tokens left 1.5-2.6 GiB resident after each `ask` that malloc_trim
    brought back to 0.7, and a benchmark of many long runs in one process grew to 12.6 GiB and was killed."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
