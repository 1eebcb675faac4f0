"""Memory methods, one module each; importing this package registers the built-ins."""

from . import full, hmt, infllm, longformer, memorizing, memoryllm, mplus, rmt, sinks, uio, window, xl  # noqa: F401  (registration side effect)
from .base import METHODS, Method, MethodOptions, UniMem, get_method, register

__all__ = ["METHODS", "Method", "MethodOptions", "UniMem", "get_method", "register"]
