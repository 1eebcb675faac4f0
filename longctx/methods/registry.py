"""The method registry: names to classes, filled as method modules are imported (`@register`).

The first lookup (`get_method`, `longctx.methods.METHODS`) imports every built-in named in the catalog, then
the third-party methods found through the `longctx.methods` entry-point group. A package declares, in its
pyproject.toml,

    [project.entry-points."longctx.methods"]
    upper-xl = "longctx_upper_xl:UpperXL"

and its `Method` subclass is registered (by `@register`, or here if the class is not yet registered). A
plugin that fails to load is skipped with a warning naming it, so one broken package never breaks the
command line. docs/methods/write-your-own.md shows a whole one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from typing import TypeVar

from ..errors import LongctxError, LongctxWarning, UsageError, did_you_mean
from .base import AnyMethod, Method
from .catalog import BUILTINS, GROUP

METHODS: dict[str, type[AnyMethod]] = {}
MethodT = TypeVar("MethodT", bound=type[AnyMethod])


def register(cls: MethodT) -> MethodT:
    """Class decorator adding a method to the registry under `cls.name`; a second class under a name already
    taken is refused (a plugin cannot silently replace a built-in, nor two plugins each other)."""
    taken = METHODS.get(cls.name)
    if taken is not None and taken is not cls:
        raise UsageError(f"method name '{cls.name}' is taken by {taken.__module__}.{taken.__qualname__}; "
                         f"{cls.__module__}.{cls.__qualname__} must register under another name")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[AnyMethod]:
    """Look a method up by name (the first lookup imports the built-ins and plugins), listing the known
    ones when it is not there."""
    import_all()
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method '{name}'{did_you_mean(name, METHODS)}; available: "
                         f"{', '.join(sorted(METHODS))}") from None


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


_imported = False  # the first lookup imports everything; later ones find it done


def import_all() -> None:
    """Import every built-in method's module (each registers its class), then the plugins; once."""
    global _imported
    if _imported:
        return
    _imported = True  # first: a plugin that looks a method up while it loads must not recurse
    for target in BUILTINS.values():
        importlib.import_module(target.partition(":")[0])  # by name: the catalog is the list of built-ins
    load_plugins()
