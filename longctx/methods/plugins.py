"""Third-party methods, found through the `longctx.methods` entry-point group.

A package declares, in its pyproject.toml,

    [project.entry-points."longctx.methods"]
    upper-xl = "longctx_upper_xl:UpperXL"

and its `Method` subclass is registered (by `@register`, or here if the class is not yet registered) the
first time longctx's methods are imported. A plugin that fails to load is skipped with a warning naming it,
so one broken package never breaks the command line. docs/methods/write-your-own.md shows a whole one.
"""

from __future__ import annotations

import importlib.metadata
import warnings

from ..errors import LongctxError, LongctxWarning
from .base import METHODS, Method, register

GROUP = "longctx.methods"


def load_plugins() -> list[str]:
    """Register every method the installed packages declare; return the names registered."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=GROUP):
        try:
            obj = ep.load()
            if not (isinstance(obj, type) and issubclass(obj, Method)):
                raise TypeError(f"{ep.value} is not a longctx Method subclass")
            if METHODS.get(obj.name) is not obj:
                register(obj)
            loaded.append(obj.name)
        except (ImportError, AttributeError, TypeError, LongctxError) as e:
            warnings.warn(f"method plugin '{ep.name}' ({ep.value}) was not loaded: {e}", LongctxWarning, stacklevel=2)
    return loaded
