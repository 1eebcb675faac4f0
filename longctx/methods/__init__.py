"""Memory methods, one module each; importing this package registers the built-ins, then the plugins."""

from . import full, hmt, infllm, longformer, memorizing, memoryllm, mplus, rmt, sinks, uio, window, xl  # noqa: F401  (registration side effect)
from .base import METHODS, Method, MethodOptions, UniMem, get_method, register
from .plugins import load_plugins

load_plugins()  # third-party methods declared under the `longctx.methods` entry-point group

__all__ = ["METHODS", "Method", "MethodOptions", "UniMem", "get_method", "register"]
