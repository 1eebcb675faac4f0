"""`longformer`: UniMem's Longformer form - a dilated window over past segments plus global tokens.

UniMem (Fang et al., 2024) reformulates Longformer for segment-wise LMs as: a memory of 2 segments of
per-layer K/V, cleared entirely when it overflows, read through a window with stride 2 (dilated), plus the
first 4 tokens as global tokens, at every layer. `overflow: fifo` is the variant UniMix keeps. Training-free
on a pretrained model the dilation hurts (docs/methods/longformer.md); `stride: 1` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodOptions, UniMem, option
from .kvcache import KVCacheMethod, KVPolicy, Overflow
from .registry import register


@dataclass(frozen=True)
class LongformerOptions(MethodOptions):
    window: int = option(1024, "previous tokens' K/V held in memory (UniMem: 2 segments of 512)")
    stride: int = option(2, "dilation: a query sees every stride-th memory token (1 = dense)")
    globals: int = option(4, "first tokens of the document every query attends to (global tokens)")
    overflow: Overflow = option("clear", "clear: forget the whole window when it overflows (UniMem); fifo: drop the oldest")

    def __post_init__(self):
        self.check(self.window >= 1, "window", "must be >= 1")
        self.check(self.stride >= 1, "stride", "must be >= 1")
        self.check(self.globals >= 0, "globals", "must be >= 0")


@register
class Longformer(KVCacheMethod[LongformerOptions]):
    name = "longformer"
    Options = LongformerOptions
    summary = "UniMem's Longformer: dilated window over past segments + global tokens, clear-all or FIFO"

    def policy(self) -> KVPolicy:
        o = self.options
        return KVPolicy(sinks=o.globals, capacity=o.window, stride=o.stride, overflow=o.overflow)

    def unimem(self) -> UniMem:
        o = self.options
        return UniMem(management=f"{o.window} tokens of K/V, {'clear-all' if o.overflow == 'clear' else 'FIFO'} on overflow",
                      writing="direct (segment K/V)",
                      reading=f"position: window with stride {o.stride} + {o.globals} global tokens",
                      injection="all layers")
