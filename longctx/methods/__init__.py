"""Memory methods, one module each, and their registry.

Importing this package imports no method: `catalog` lists them without torch (what `longctx methods`
shows). The names below load on first use (PEP 562); `METHODS` and `get_method` are the registry's, whose
first lookup imports every built-in, then the plugins declared under the `longctx.methods` entry-point group.
"""

from __future__ import annotations

from typing import Any

__all__ = ["METHODS", "Method", "MethodOptions", "UniMem", "get_method", "register"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import base, registry

    if name == "METHODS":
        registry.import_all()  # the whole registry: every built-in and plugin
    return getattr(registry if hasattr(registry, name) else base, name)
