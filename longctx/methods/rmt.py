"""`rmt`: the Recurrent Memory Transformer (Bulatov et al., 2022), decoder-only form (docs/methods/rmt.md).

Each segment runs as [memory; x; memory]: the tokens read the memory through the read slots before them,
the write slots after them see the whole segment, and their final hidden states become the next memory.
Memory is m vectors at the input; the first segment reads a learned initial memory. Final-norm states
are rescaled by a learned per-channel factor before they are read back as input embeddings, because
their scale differs from the token embeddings' (docs/methods/rmt.md; `scale: none` feeds them raw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model.attention import ForwardPlan
from ..text.segments import Segment
from .base import MethodOptions, UniMem, option
from .recurrent import Scale, TrainableMethod, gaussian, scale_param
from .registry import register


@dataclass(frozen=True)
class RMTOptions(MethodOptions):
    tokens: int = option(16, "memory tokens m (read slots before each segment, write slots after it)")
    scale: Scale = option("learned", "learned = written memory times a trained per-channel factor; none = raw final-norm states")
    init_seed: int = option(0, "seed of the untrained initial parameters")

    def __post_init__(self) -> None:
        self.check(self.tokens >= 1, "tokens", "must be >= 1")


@dataclass
class TokenMemory:
    """RMT's memory: `memory [m, d]`, written by segment `segments - 1`, after the document's first `tokens`
    tokens; `last_byte` is where the last of them starts (provenance for `memory dump`)."""

    memory: torch.Tensor
    segments: int = 0
    tokens: int = 0
    last_byte: int = 0

    def after(self, new: torch.Tensor, seg: Segment) -> TokenMemory:
        """The memory written by `seg`."""
        return TokenMemory(new, self.segments + 1, seg.start + len(seg), int(seg.byte_start[-1]))

    def detached(self) -> TokenMemory:
        return TokenMemory(self.memory.detach(), self.segments, self.tokens, self.last_byte)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"memory": self.memory.detach(), "counters": torch.tensor([self.segments, self.tokens, self.last_byte])}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], device: torch.device) -> TokenMemory:
        c = [int(x) for x in t["counters"].tolist()]
        return cls(t["memory"].to(device), *c)

    def group(self) -> dict[str, Any]:
        """`memory dump`'s row: m vectors summarising the document so far."""
        kind = "memory tokens (learned initial)" if self.segments == 0 else f"memory tokens (after segment {self.segments - 1})"
        return {"kind": kind, "entries": int(self.memory.shape[0]), "tokens": [0, self.tokens], "byte_start": 0,
                "byte_last_token": self.last_byte}


class RMTParams(nn.Module):
    """RMT's trainable parameters (declared for the type checker; `build_params` sets them)."""

    memory: nn.Parameter
    scale: nn.Parameter | None


@register
class RMT(TrainableMethod[RMTOptions, TokenMemory]):
    params: RMTParams
    name = "rmt"
    Options = RMTOptions
    summary = "Recurrent Memory Transformer: m memory tokens read and written at the input (trainable)"
    param_options = ("tokens", "scale")

    def build_params(self, gen: torch.Generator) -> RMTParams:
        o, d = self.options, self.backbone.config.hidden_size
        p = RMTParams()
        p.memory = gaussian(gen, (o.tokens, d), self.embedding_std())
        p.scale = scale_param(self.output_scale_init(), d, o.scale)
        return p

    def unimem(self) -> UniMem:
        m = self.options.tokens
        return UniMem(management=f"{m} memory tokens, overwritten every segment",
                      writing=f"model-forward (final states of {m} write slots)",
                      reading=f"full (all {m} read slots)", injection="input embeddings")

    def check_segment(self, segment: int) -> None:
        self.check_span(segment, 2 * self.options.tokens)

    def pending_cacheable(self) -> bool:
        return True  # [read slots; tokens; write slots]: the read slots are the memory, fixed until the write

    def init_state(self) -> TokenMemory:
        return TokenMemory(self.params.memory)

    def memory_size(self, state: TokenMemory) -> int:
        return int(state.memory.shape[0])

    def read(self, state: TokenMemory, seg: Segment) -> tuple[TokenMemory, ForwardPlan]:
        mem = self.as_input(state.memory)
        embeds = torch.cat((mem, self.embed(seg.ids), mem))
        return state, self.memory_plan(embeds, mem.shape[0], len(seg))

    def write(self, state: TokenMemory, seg: Segment, plan: ForwardPlan) -> TokenMemory:
        return state.after(self.written(plan.out.final_hidden[-self.options.tokens :]), seg)

    def detach_state(self, state: TokenMemory) -> TokenMemory:
        return state.detached()

    def state_tensors(self, state: TokenMemory) -> dict[str, torch.Tensor]:
        return state.tensors()

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> TokenMemory:
        return TokenMemory.from_tensors(tensors, self.backbone.device)

    def dump(self, state: TokenMemory) -> list[dict[str, Any]]:
        return [state.group()]
