"""`--threads auto`: the CPUs a process may use (affinity, cgroup quota) and the threads the load leaves."""

from __future__ import annotations

import pytest

from longctx.config import resolve
from longctx.cpus import auto_threads, available_cpus, cgroup_quota, parse_threads
from longctx.errors import UsageError


@pytest.mark.parametrize("cpus,load,threads", [(2, 0.0, 2), (2, 0.3, 2), (2, 0.7, 1), (2, 5.0, 1),
                                               (16, 3.2, 13), (16, 40.0, 1), (1, 0.0, 1)])
def test_auto_uses_what_the_load_leaves(cpus, load, threads):
    assert auto_threads(cpus, load) == threads


def test_cgroup_quota_caps_the_cpus(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("150000 100000\n")
    assert cgroup_quota(f) == 1.5
    f.write_text("max 100000\n")
    assert cgroup_quota(f) is None
    assert cgroup_quota(tmp_path / "absent") is None
    assert 1 <= available_cpus()


def test_threads_values_from_flags_env_and_config(monkeypatch):
    assert parse_threads("3") == 3 and parse_threads(None) is None
    assert 1 <= parse_threads("auto") <= available_cpus()  # type: ignore[operator]
    with pytest.raises(UsageError, match="'auto'"):
        parse_threads("many")
    monkeypatch.setenv("LONGCTX_THREADS", "auto")
    run = resolve({"threads": None})
    assert run.origins["threads"] == "env" and 1 <= run["threads"] <= available_cpus()
