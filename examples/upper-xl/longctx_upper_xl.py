"""`upper-xl`: Transformer-XL memory read only at a set of layers (UniMem's injection dimension).

An example of a method that lives outside longctx: it subclasses the K/V method base, declares its options,
and is found through the `longctx.methods` entry point in this package's pyproject.toml. Every layer still
computes and stores the segment's keys and values; only the layers in `layers` read them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from longctx.methods.base import MethodOptions, UniMem, option
from longctx.methods.kvcache import KVCacheMethod, KVPolicy
from longctx.methods.layersets import resolve_layers


@dataclass(frozen=True)
class UpperXLOptions(MethodOptions):
    memory: int = option(2048, "previous tokens' keys/values carried to the next segment (FIFO)")
    sinks: int = option(4, "first tokens of the document kept forever")
    layers: str = option("0.5-1", "layers that read the memory, as fractions of depth (0.5-1 = upper half)")

    def __post_init__(self):
        self.check(self.memory >= 0, "memory", "must be >= 0")
        self.check(self.sinks >= 0, "sinks", "must be >= 0")


class UpperXL(KVCacheMethod):
    name = "upper-xl"
    Options = UpperXLOptions
    summary = "segment recurrence over the previous tokens' K/V, read only at a set of layers (plugin example)"

    @cached_property
    def reading_layers(self) -> frozenset[int]:
        return frozenset(resolve_layers(self.options.layers, self.backbone.num_layers))

    def policy(self) -> KVPolicy:
        return KVPolicy(sinks=self.options.sinks, capacity=self.options.memory)

    def read(self, state, seg):
        state, plan = super().read(state, seg)
        if plan.memory_keys is not None:  # the other layers attend within the segment only
            keep = self.reading_layers
            plan.memory_keys = [k if i in keep else None for i, k in enumerate(plan.memory_keys)]
            plan.memory_values = [v if i in keep else None for i, v in enumerate(plan.memory_values)]
        return state, plan

    def unimem(self) -> UniMem:
        o = self.options
        return UniMem(management=f"FIFO of {o.memory} tokens + {o.sinks} sinks", writing="direct (segment K/V)",
                      reading="position: all memory + causal segment", injection=f"layers {o.layers}")
