"""`window`: independent segments, no memory (the floor every memory method must beat)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodOptions, UniMem
from .kvcache import KVCacheMethod, KVPolicy
from .registry import register


@dataclass(frozen=True)
class WindowOptions(MethodOptions):
    """`window` has no options: each segment is read alone, positions 0..segment-1."""


@register
class Window(KVCacheMethod[WindowOptions]):
    name = "window"
    Options = WindowOptions
    summary = "independent segments: each sees only itself (baseline)"

    def policy(self) -> KVPolicy:
        return KVPolicy(capacity=0)

    def unimem(self) -> UniMem:
        return UniMem(management="none (each segment alone)", writing="none", reading="none",
                      injection="none")
