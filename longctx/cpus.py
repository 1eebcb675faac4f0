"""The CPUs a run may use and how busy they are: what `--threads auto` chooses from (no torch import)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import UsageError

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else max(1, cpus)


def cgroup_quota(path: Path = CPU_MAX) -> float | None:
    """CPUs' worth of time the cgroup allows, None when unlimited or unknown."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), None where the system does not report one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_averages() -> list[float] | None:
    """1, 5 and 15 minute load averages (rounded for records), None where the system does not report them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def auto_threads(cpus: int | None = None, load: float | None = None) -> int:
    """Threads for `--threads auto`: every available CPU on a quiet machine, else the CPUs the other
    processes leave free, at least one. Under contention a second thread waits for a core at every
    synchronisation point of every matmul (docs/benchmarks.md "Threads under load")."""
    cpus = available_cpus() if cpus is None else cpus
    load = (load_average() or 0.0) if load is None else load
    return max(1, min(cpus, int(cpus - load + 0.5)))


def parse_threads(value: str | int | None) -> int | None:
    """A `--threads` value: a positive integer, or "auto" (`auto_threads`); None stays None."""
    if value is None or isinstance(value, int):
        return value
    if value.strip().lower() == "auto":
        return auto_threads()
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--threads must be a positive integer or 'auto' (got {value!r})") from None
