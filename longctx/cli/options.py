"""Options several commands share, declared once, and the parsing of option values into library arguments."""

from __future__ import annotations

from typing import Annotated, Any

import typer
import yaml

from ..cpus import parse_threads
from ..errors import UsageError

# The settings resolve flag > LONGCTX_* env > user config > default (longctx.config.resolve), for the
# reading commands and the benchmarks alike (longctx.bench.record.bench_backbone).
ModelOpt = Annotated[str | None, typer.Option(help="A name from `longctx models`, a local directory or an HF model id (default: smollm2-135m). \\[env: LONGCTX_MODEL]")]
DtypeOpt = Annotated[str | None, typer.Option(help="auto, bf16, fp32 or fp16. \\[env: LONGCTX_DTYPE]")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto. \\[env: LONGCTX_DEVICE]")]


def threads_value(value: str | None) -> int | None:
    """`--threads N` or `--threads auto` (the CPUs the load leaves free: longctx.cpus.auto_threads)."""
    try:
        return parse_threads(value)
    except UsageError as e:
        raise typer.BadParameter(str(e).removeprefix("--threads ")) from None


ThreadsOpt = Annotated[int | None, typer.Option(parser=threads_value, metavar="N|auto", help="torch threads, or auto: every CPU when the machine is quiet, else those the load leaves free. \\[env: LONGCTX_THREADS]")]
SegmentOpt = Annotated[int | None, typer.Option(help="Tokens per forward (default: the preset's). \\[env: LONGCTX_SEGMENT]")]
# One method: `-o key=value`. Several methods (--compare, the benchmarks): `-o method.key=value` picks one.
OptionOpt = Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option override key=value (repeatable).")]
MethodsOptionOpt = Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option override: key=value or method.key=value (repeatable).")]
AdapterOpt = Annotated[str | None, typer.Option(help="Trained parameters for the method (default: the preset's).")]
UntrainedOpt = Annotated[bool, typer.Option("--allow-untrained", help="Run a trainable method without an adapter (its output then says nothing about the method).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", " /--quiet", " /-q", help="Progress and status lines on stderr (--quiet/-q: none; errors and warnings still show).")]


def _parse_overrides(pairs: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """`-o key=value` applies to every named method or preset; `-o method.key=value` to one."""
    if pairs and not methods:
        raise UsageError("with --resume alone, use -o method.key=value (or name --method)")
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option expects key=value or method.key=value (got {pair!r})")
        value = yaml.safe_load(raw) if raw else None
        target, _, name = key.rpartition(".")
        for m in ([target] if target else methods):
            out.setdefault(_preset_key(m), {})[name] = value
    return out


def _preset_key(method: str) -> str:
    """Overrides are looked up by preset name; a preset given as a .yaml path is named by its file stem."""
    from pathlib import Path

    return Path(method).stem if method.endswith((".yaml", ".yml")) else method


def _method_list(method: str | None, compare: str | None) -> list[str]:
    """--method then the --compare names, in order; an empty name (`xl,,window`) is refused, not dropped."""
    names = [m.strip() for m in compare.split(",")] if compare is not None else []
    if any(not m for m in names):
        raise UsageError(f"--compare {compare!r} has an empty method name; separate names with single commas "
                         "(e.g. --compare window,sinks,xl,full)")
    if method and method not in names:
        names.insert(0, method)
    return names or ["xl"]


def _counts(text: str, what: str) -> list[int]:
    """'16k,32k,1000' -> [16384, 32768, 1000]."""
    out = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        scale = 1024 if item.endswith("k") else 1
        try:
            out.append(int(item.removesuffix("k")) * scale)
        except ValueError:
            raise UsageError(f"{what}: '{item}' is not a token count (e.g. 16k or 16384)") from None
    return out


def _fractions(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated fractions (got {text!r})") from None
