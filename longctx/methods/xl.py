"""`xl`: Transformer-XL segment recurrence on a pretrained RoPE model, with sinks and bounded positions."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodOptions, UniMem, option
from .kvcache import KVCacheMethod, KVPolicy, Positions
from .registry import register


@dataclass(frozen=True)
class XLOptions(MethodOptions):
    memory: int = option(2048, "previous tokens' keys/values carried to the next segment (FIFO)")
    sinks: int = option(4, "first tokens of the document kept forever (0 = pure XL)")
    positions: Positions = option("relative", "relative: [sinks; memory; segment] numbered from 0 (bounded); absolute: document indices")

    def __post_init__(self):
        self.check(self.memory >= 0, "memory", "must be >= 0")
        self.check(self.sinks >= 0, "sinks", "must be >= 0")


@register
class XL(KVCacheMethod[XLOptions]):
    name = "xl"
    Options = XLOptions
    summary = "segment recurrence over the previous tokens' K/V, with sinks and re-based positions"

    def policy(self) -> KVPolicy:
        o = self.options
        return KVPolicy(sinks=o.sinks, capacity=o.memory, positions=o.positions)

    def unimem(self) -> UniMem:
        o = self.options
        return UniMem(management=f"FIFO of {o.memory} tokens + {o.sinks} sinks", writing="direct (segment K/V, no grad)",
                      reading="position: all memory + causal segment", injection="all layers")
