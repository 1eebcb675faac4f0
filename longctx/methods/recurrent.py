"""What the memory-token methods (`rmt`, `hmt`) share: trainable parameters, input embeddings, the scale fix.

These methods write memory *through the model*: memory embeddings enter at the input (`inputs_embeds`)
and new memory is read from the final hidden states. Their parameters live in `self.params` (an
`nn.Module` kept in fp32, cast to the backbone's dtype where used), separate from the memory state.
Untrained, the parameters come from a fixed seed, so an untrained run is at least reproducible; it is
never presented as trained (`adapter` stays None and the protocol says UNTRAINED).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..errors import UsageError
from ..model.attention import ForwardPlan
from ..model.backbone import Backbone
from .base import Method, OptionsT, StateT

Scale = Literal["learned", "none"]


class TrainableMethod(Method[OptionsT, StateT]):
    """A method with parameters that `longctx train` learns and adapters carry."""

    trainable = True
    writes_per_segment = True
    # option names that change parameter shapes: an adapter only fits a method built with the same values
    param_options: ClassVar[tuple[str, ...]] = ()
    # methods whose adapters can start this one's training (their parameters are a subset of this one's)
    starts_from: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: OptionsT, backbone: Backbone):
        super().__init__(options, backbone)
        gen = torch.Generator().manual_seed(int(getattr(options, "init_seed", 0)))
        self.params = self.build_params(gen).to(backbone.device)
        self.adapter: dict[str, Any] | None = None  # manifest of the loaded adapter; None = untrained

    def build_params(self, gen: torch.Generator) -> nn.Module:
        """The method's trainable parameters (fp32), initialised from `gen`."""
        raise NotImplementedError

    def detach_state(self, state: StateT) -> StateT:
        """The same memory with its gradient history cut (truncated BPTT)."""
        raise NotImplementedError

    def memory_params(self) -> nn.Module:
        """`self.params`: what the trainer optimises and adapters carry."""
        return self.params

    def describe(self) -> str:
        base = super().describe()
        if self.adapter is None:
            return f"{base[:-1]}, UNTRAINED)"
        return f"{base[:-1]}, adapter={self.adapter.get('name', '?')}@{self.adapter.get('sha256', '')[:8]})"

    # ---- shared pieces ------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings `[q, d]` of token ids, in the backbone's dtype."""
        return self.backbone.model.get_input_embeddings()(ids.to(self.backbone.device))

    def as_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.backbone.dtype)

    def embedding_std(self) -> float:
        """σ of the input embeddings as the model feeds them (the matrix times the model's embedding scale,
        Gemma 3's sqrt(hidden)): RMT/HMT initialise memory vectors with it (docs/methods/rmt.md)."""
        weight = self.backbone.model.get_input_embeddings().weight.detach().float()
        return float(weight.std()) * self.backbone.embed_scale

    def output_scale_init(self) -> float:
        """Input-embedding RMS over final-norm output RMS: the factor that puts written memory (final-norm
        states) on the scale of token embeddings (docs/methods/rmt.md; SmolLM2's final states are ~50x larger).
        The norm's gain is measured by applying it (Gemma's norms scale by 1 + weight, Llama's by weight)."""
        emb = self.backbone.model.get_input_embeddings().weight.detach().float() * self.backbone.embed_scale
        norm = getattr(self.backbone.model.model, "norm", None)
        if norm is None:
            gain = torch.ones(1)
        else:  # a constant input of RMS 1000: the norm's epsilon moves the result by ~1e-11, below rounding
            with torch.no_grad():
                probe = torch.full((1, emb.shape[1]), 1000.0, dtype=self.backbone.dtype, device=self.backbone.device)
                gain = norm(probe).float().cpu() / 1000.0
        return float(emb.pow(2).mean().sqrt() / gain.pow(2).mean().sqrt().clamp_min(1e-6))

    def check_span(self, segment: int, extra: int) -> None:
        """Refuse a forward of `segment + extra` positions (the memory slots) past the trained range."""
        span = segment + extra
        if span > self.backbone.max_positions:
            raise UsageError(f"{self.describe()} with segment {segment} spans {span} positions, past the model's "
                             f"trained {self.backbone.max_positions}; use a smaller segment")

    def written(self, states: torch.Tensor) -> torch.Tensor:
        """New memory from write-slot final states: rescaled by the learned factor when there is one."""
        scale = getattr(self.params, "scale", None)
        return states if scale is None else states * scale.to(states.dtype)

    def memory_plan(self, embeds: torch.Tensor, first: int, count: int) -> ForwardPlan:
        """Plain causal forward over `embeds [n, d]` at positions 0..n-1; rows first..first+count are tokens."""
        pos = torch.arange(embeds.shape[0], device=self.backbone.device)
        return ForwardPlan(query_pos=pos, key_pos=pos, embeds=embeds, token_rows=slice(first, first + count))


def scale_param(init: float, dim: int, kind: Scale) -> nn.Parameter | None:
    """The learned per-channel factor applied to written memory (None when `kind` is "none")."""
    return nn.Parameter(torch.full((dim,), init)) if kind == "learned" else None


def gaussian(gen: torch.Generator, shape: tuple[int, ...], std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=gen) * std)
