"""The `longctx` command line: each command parses, calls one library function, renders.

stdout carries results only (tables, --json, --jsonl); progress, warnings and errors go to stderr.
Exit codes: 0 ok, 1 runtime failure, 2 usage or bad input, 130 interrupted (docs/errors.md).

One module per command group; this one creates the apps, and importing the group modules registers their
commands (in the order `--help` lists them): perplexity (ppl), reading (ask, generate), text, catalog (methods, presets,
models), training (train, adapters), memory, bench, doctor. Shared option declarations live in options.py,
the mapping of library errors to exit codes in exits.py.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..version import __version__

# annotated: the command modules imported below import `app` back (an import cycle mypy cannot infer through)
app: typer.Typer = typer.Typer(name="longctx", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False, rich_markup_mode="rich",
                  help="Stream text of any length through a causal LM, segment by segment, with a memory method.")
presets_app = typer.Typer(no_args_is_help=True, help="List and show the YAML presets (a method, segment and options).")
app.add_typer(presets_app, name="presets")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: every named method on the same items, in one process.")
app.add_typer(bench_app, name="bench")
adapters_app = typer.Typer(help="List trained adapters (the default) and migrate old ones.")
app.add_typer(adapters_app, name="adapters")
models_app = typer.Typer(help="The named models: list them (the default), install or remove one.")
app.add_typer(models_app, name="models")
memory_app = typer.Typer(no_args_is_help=True, help="Inspect and manage saved memory snapshots (LONGCTX_HOME/snapshots).")
app.add_typer(memory_app, name="memory")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"longctx {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """longctx: perplexity, memory and long-document tools over pretrained causal LMs."""


# The command modules register on the apps above, so they are imported after them, in the order the
# top-level commands are listed by `--help` (sub-apps keep the order of add_typer above).
# isort: off
from . import perplexity, reading, text, catalog, training, memory, bench, doctor  # noqa: E402, F401
# isort: on
from .reading import DEFAULT_ASK_METHOD  # noqa: E402, F401


def main() -> None:
    """Console-script entry point."""
    app()
