"""`rmt`: the Recurrent Memory Transformer (Bulatov et al., 2022), decoder-only form (methods.md §3).

Each segment runs as [memory; x; memory]: the tokens read the memory through the read slots before them,
the write slots after them see the whole segment, and their final hidden states become the next memory.
Memory is m vectors at the input; the first segment reads a learned initial memory. Final-norm states
are rescaled by a learned per-channel factor before they are read back as input embeddings, because
their scale differs from the token embeddings' (methods.md §11.7; `scale: none` feeds them raw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attention import ForwardPlan
from ..segments import Segment
from .base import MethodOptions, UniMem, option, register
from .recurrent import Scale, TrainableMethod, gaussian, scale_param


@dataclass(frozen=True)
class RMTOptions(MethodOptions):
    tokens: int = option(16, "memory tokens m (read slots before each segment, write slots after it)")
    scale: Scale = option("learned", "learned = written memory times a trained per-channel factor; none = raw final-norm states")
    init_seed: int = option(0, "seed of the untrained initial parameters")

    def __post_init__(self) -> None:
        self.check(self.tokens >= 1, "tokens", "must be >= 1")


@dataclass
class TokenMemory:
    """RMT's memory: `memory [m, d]`, written by segment `segments - 1`, covering bytes before `byte_end`."""

    memory: torch.Tensor
    segments: int = 0
    byte_end: int = 0


@register
class RMT(TrainableMethod):
    name = "rmt"
    Options = RMTOptions
    summary = "Recurrent Memory Transformer: m memory tokens read and written at the input (trainable)"
    param_options = ("tokens", "scale")

    def build_params(self, gen: torch.Generator) -> nn.Module:
        o, d = self.options, self.backbone.config.hidden_size
        p = nn.Module()
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

    def init_state(self) -> TokenMemory:
        return TokenMemory(self.params.memory)

    def memory_size(self, state: TokenMemory) -> int:
        return int(state.memory.shape[0])

    def read(self, state: TokenMemory, seg: Segment) -> tuple[TokenMemory, ForwardPlan]:
        mem = self.as_input(state.memory)
        embeds = torch.cat((mem, self.embed(seg.ids), mem))
        return state, self.memory_plan(embeds, mem.shape[0], len(seg))

    def write(self, state: TokenMemory, seg: Segment, plan: ForwardPlan) -> TokenMemory:
        return TokenMemory(self.written(plan.hidden[-self.options.tokens :]), state.segments + 1, int(seg.next_byte))

    def detach_state(self, state: TokenMemory) -> TokenMemory:
        return TokenMemory(state.memory.detach(), state.segments, state.byte_end)

    def state_tensors(self, state: TokenMemory) -> dict[str, torch.Tensor]:
        return {"memory": state.memory.detach(), "counters": torch.tensor([state.segments, state.byte_end])}

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> TokenMemory:
        c = tensors["counters"].tolist()
        return TokenMemory(tensors["memory"].to(self.backbone.device), int(c[0]), int(c[1]))

    def dump(self, state: TokenMemory) -> list[dict[str, Any]]:
        src = "learned initial memory" if state.segments == 0 else f"written by segment {state.segments - 1}"
        return [{"kind": "memory tokens", "entries": self.memory_size(state), "source": src,
                 "bytes_summarised": [0, state.byte_end],
                 "rms": float(state.memory.detach().float().pow(2).mean().sqrt())}]
