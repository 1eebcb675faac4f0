"""`full`: full attention within the model's own window, computed segment by segment with a K/V cache."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodOptions, UniMem, option
from .kvcache import KVCacheMethod, KVPolicy
from .registry import register


@dataclass(frozen=True)
class FullOptions(MethodOptions):
    context: int | None = option(None, "tokens one window may hold; null = the model's trained length")
    overlap: float = option(0.5, "fraction of the window re-prefilled when it overflows (0 = disjoint windows)")

    def __post_init__(self):
        self.check(self.context is None or self.context >= 2, "context", "must be >= 2 or null")
        self.check(0.0 <= self.overlap < 1.0, "overlap", "must be in [0, 1)")


@register
class Full(KVCacheMethod[FullOptions]):
    name = "full"
    Options = FullOptions
    summary = "every previous token within the model's window; re-prefills on overflow (baseline)"

    def context(self) -> int:
        return self.options.context or self.backbone.max_positions

    def policy(self) -> KVPolicy:
        ctx = self.context()
        return KVPolicy(capacity=None, context=ctx, keep=int(self.options.overlap * ctx))

    def unimem(self) -> UniMem:
        ctx = self.context()
        return UniMem(
            management=f"{ctx} tokens; on overflow recompute the newest {int(self.options.overlap * ctx)}",
            writing="direct (segment K/V)", reading="position: all cached tokens", injection="all layers")
