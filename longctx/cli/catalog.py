"""What can be run: `methods` (the memory methods and their options) and `presets list/show`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
import yaml

from . import app, presets_app
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

