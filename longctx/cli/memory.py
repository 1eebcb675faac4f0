"""`memory ls/dump/show/rm/export/import/migrate`: the saved memory snapshots (LONGCTX_HOME/snapshots)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
import yaml

from . import memory_app
from .exits import _errors_to_exit
from .options import ThreadsOpt


@memory_app.command("ls")
@_errors_to_exit
def memory_ls(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List snapshots: name, method, model, document, tokens consumed, bytes on disk and in RAM, created."""
    import time

    from rich.table import Table

    from ..storage.memory import list_snapshots
    from .render import mib, print_json, stdout_console

    rows = list_snapshots()
    if json_out:
        print_json({"schema_version": 1, "snapshots": rows})
        return
    table = Table(title="Snapshots")
    for col in ("name", "method", "model", "document", "tokens", "on disk", "in RAM", "created"):
        table.add_column(col)
    for r in rows:
        if r.get("damaged"):
            table.add_row(r["name"], f"[red]DAMAGED[/]: {r['damaged']}", "", "", "", "", "", "")
            continue
        table.add_row(r["name"] + (" *" if r["latest"] else ""), r["method"], r["model"], r["document"],
                      f"{r['tokens']:,}", mib(r["size_bytes"]), mib(r["ram_bytes"]),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])))
    stdout_console().print(table)


@memory_app.command("dump")
@_errors_to_exit
def memory_dump(name: Annotated[str | None, typer.Argument(help="Snapshot name (default: the latest).")] = None,
                json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """What a memory holds: tensors and shapes, entries in use, and the source span + excerpt of each group."""
    from ..storage.memory import dump_snapshot
    from .render import print_dump, print_json, stdout_console

    info = dump_snapshot(name)
    print_json({"schema_version": 1, **info}) if json_out else print_dump(info, stdout_console())


@memory_app.command("show")
@_errors_to_exit
def memory_show(name: Annotated[str | None, typer.Argument(help="Snapshot name (default: the latest).")] = None,
                json_out: Annotated[bool, typer.Option("--json", help="Print JSON (the manifest).")] = False) -> None:
    """The verified manifest of a snapshot (fingerprint, method, document, progress, files)."""
    from ..storage.memory import show_snapshot
    from .render import print_json

    info = show_snapshot(name)
    if json_out:
        print_json({"schema_version": 1, **info})
    else:
        sys.stdout.write(yaml.safe_dump(info, sort_keys=False, width=100))


@memory_app.command("rm")
@_errors_to_exit
def memory_rm(name: Annotated[str, typer.Argument(help="Snapshot name.")]) -> None:
    """Delete a snapshot (every version)."""
    from ..storage.memory import remove_snapshot

    remove_snapshot(name)
    typer.echo(f"removed {name}", err=True)


@memory_app.command("export")
@_errors_to_exit
def memory_export(name: Annotated[str, typer.Argument(help="Snapshot name.")],
                  directory: Annotated[str, typer.Argument(help="New directory to write (must not exist).")]) -> None:
    """Copy a snapshot's current version to a directory (verified)."""
    from ..storage.memory import export_snapshot

    typer.echo(str(export_snapshot(name, directory)))


@memory_app.command("import")
@_errors_to_exit
def memory_import(directory: Annotated[str, typer.Argument(help="An exported snapshot directory.")],
                  name: Annotated[str | None, typer.Option(help="Store under this name (default: its own).")] = None) -> None:
    """Verify an exported snapshot and add it to the store."""
    from ..storage.memory import import_snapshot

    typer.echo(import_snapshot(directory, name))



@memory_app.command("migrate")
@_errors_to_exit
def memory_migrate(
    name: Annotated[str, typer.Argument(help="Snapshot name.")],
    threads: ThreadsOpt = None,
) -> None:
    """Re-record an old snapshot's model by the semantic fingerprint, after proving it fits.

    Snapshots from before the semantic fingerprint recorded a hash of the whole config, transformers' version
    included. The proof: the config equals the model's but for that version, the tokenizer is the same, the
    state restores into its method. A new version is written; the old one is kept.
    """
    from ..model.models import load_backbone
    from ..storage.migration import migrate_snapshot
    from ..storage.snapshot import SnapshotStore
    from .render import print_migration

    saved = SnapshotStore().load(name, tensors=False).manifest["fingerprint"]
    backbone = load_backbone(saved["model"], dtype=saved["dtype"], threads=threads)
    print_migration(migrate_snapshot(name, backbone), "snapshot")
