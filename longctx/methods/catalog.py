"""What methods exist, without importing them: the built-ins' table and the plugins' entry points.

`longctx methods` lists every method's name, one-line summary and option defaults from here, so it starts
without torch. The built-ins' summaries and options are read from `catalog.json`, which is generated from
the classes themselves (`python -m longctx.methods.catalog --write`; a test fails when it is stale).
Plugins are listed by their entry-point name and target; their classes load only when a run asks for them.
Looking a method up to run it (`registry.get_method`) imports the classes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GROUP = "longctx.methods"  # the entry-point group third-party methods declare
CATALOG = Path(__file__).with_name("catalog.json")

# name -> "module:Class" of every built-in method; a new built-in is added here and to catalog.json
BUILTINS: dict[str, str] = {
    "full": "longctx.methods.full:Full",
    "hmt": "longctx.methods.hmt:HMT",
    "infllm": "longctx.methods.infllm:InfLLM",
    "longformer": "longctx.methods.longformer:Longformer",
    "memorizing": "longctx.methods.memorizing:Memorizing",
    "memoryllm": "longctx.methods.memoryllm:MemoryLLM",
    "mplus": "longctx.methods.mplus:MPlus",
    "rmt": "longctx.methods.rmt:RMT",
    "sinks": "longctx.methods.sinks:Sinks",
    "uio": "longctx.methods.uio:UIO",
    "unimix": "longctx.methods.memorizing:UniMix",
    "window": "longctx.methods.window:Window",
    "xl": "longctx.methods.xl:XL",
}


@dataclass(frozen=True)
class Entry:
    """One method as `longctx methods` lists it: `options` holds (name, default) pairs; None = not known
    without importing the method (a plugin's)."""

    name: str
    target: str  # "module:Class"
    summary: str
    options: tuple[tuple[str, Any], ...] | None
    plugin: bool = False


def entries() -> list[Entry]:
    """Every method, built-ins from the catalog and plugins from their entry points, sorted by name."""
    data = json.loads(CATALOG.read_text(encoding="utf-8"))
    out = [Entry(name, BUILTINS[name], row["summary"], tuple((o["name"], o["default"]) for o in row["options"]))
           for name, row in data.items()]
    taken = {e.name for e in out}
    out += [Entry(ep.name, ep.value, f"plugin ({ep.value})", None, plugin=True)
            for ep in importlib.metadata.entry_points(group=GROUP) if ep.name not in taken]
    return sorted(out, key=lambda e: e.name)


def describe_builtins() -> dict[str, dict[str, Any]]:
    """The catalog's content, read from the classes (imports them): what `--write` stores."""
    out: dict[str, dict[str, Any]] = {}
    for name, target in sorted(BUILTINS.items()):
        module, _, cls_name = target.partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        if cls.name != name:
            raise RuntimeError(f"catalog name '{name}' is {target}, which registers as '{cls.name}'")
        options = [{"name": n, "type": t, "default": d, "help": h} for n, t, d, h in cls.Options.describe_fields()]
        out[name] = {"summary": cls.summary, "options": options}
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m longctx.methods.catalog --write | --check`: regenerate or verify catalog.json."""
    ap = argparse.ArgumentParser(description="Regenerate or check the method catalog (catalog.json).")
    ap.add_argument("--write", action="store_true", help="write catalog.json from the classes")
    args = ap.parse_args(argv)
    text = json.dumps(describe_builtins(), indent=1) + "\n"
    if args.write:
        CATALOG.write_text(text, encoding="utf-8")
        return 0
    if CATALOG.read_text(encoding="utf-8") != text:
        print(f"{CATALOG} is stale: run python -m longctx.methods.catalog --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
