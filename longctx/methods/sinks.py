"""`sinks`: StreamingLLM attention sinks + a rolling window with cache-relative positions (Xiao et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodOptions, UniMem, option
from .kvcache import KVCacheMethod, KVPolicy, Positions
from .registry import register


@dataclass(frozen=True)
class SinksOptions(MethodOptions):
    sinks: int = option(4, "first tokens of the document kept forever as attention sinks")
    window: int = option(2044, "previous tokens each token sees besides the sinks")
    positions: Positions = option("relative", "relative: positions inside the cache (bounded); absolute: document indices")

    def __post_init__(self):
        self.check(self.sinks >= 0, "sinks", "must be >= 0")
        self.check(self.window >= 1, "window", "must be >= 1")


@register
class Sinks(KVCacheMethod[SinksOptions]):
    name = "sinks"
    Options = SinksOptions
    summary = "attention sinks + rolling window, token-level (StreamingLLM peer)"

    def policy(self) -> KVPolicy:
        o = self.options
        return KVPolicy(sinks=o.sinks, capacity=o.window, band=o.window, positions=o.positions)

    def unimem(self) -> UniMem:
        o = self.options
        return UniMem(management=f"FIFO of {o.window} tokens + {o.sinks} sinks", writing="direct (segment K/V)",
                      reading=f"position: {o.sinks} sinks + the {o.window} previous tokens of each query",
                      injection="all layers")
