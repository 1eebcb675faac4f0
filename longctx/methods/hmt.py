"""`hmt`: the Hierarchical Memory Transformer (He et al., 2024), as docs/methods/hmt.md describes it.

Per segment x_n (two backbone passes):
1. summary pass: [T; last `sum_fraction` of x_{n-1}; T] with the learned prompt T; the last final state is S_n.
   The paper reads the first part of x_n itself, so x_n's tokens would see a summary of the tokens after them;
   reading the text just before x_n keeps every token causal (`summary: current` is the paper's form, and
   is declared non-causal);
2. recall: one-query cross-attention over the cached memory embeddings C (the last N):
   a = softmax((S_n W_q)(C W_k)ᵀ / √h), P_n = a·C. With C empty, P_n is the learned first memory;
3. main pass: [P_n; sensory; x_n; P_n], sensory = the previous segment's last k tokens re-embedded;
   x_n's logits are scored, the last final state (rescaled, as in `rmt`) is M_n, appended to C (FIFO N).
`recall: false` is training stage 1 (P_n = M_{n-1}, no summary pass, as the paper trains first).
Unlike the reference code, generation past one segment and truncated BPTT work (docs/methods/hmt.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..model.attention import ForwardPlan
from ..text.segments import Segment
from .base import MethodOptions, UniMem, option
from .recurrent import Scale, TrainableMethod, gaussian, scale_param
from .registry import register


@dataclass(frozen=True)
class HMTOptions(MethodOptions):
    sensory: int = option(32, "sensory memory k: the previous segment's last k tokens, re-embedded before the segment")
    cache: int = option(100, "long-term memory N: memory embeddings of the last N segments recall reads (FIFO)")
    recall_dim: int | None = option(None, "h, width of the recall projections W_q, W_k (null = the model's hidden size)")
    sum_fraction: float = option(0.5, "share of each segment the summary pass reads (its first part)")
    recall: bool = option(True, "cross-attention recall over the cache (stage 2); false = stage 1, reuse the last memory")
    summary: Literal["previous", "current"] = option(
        "previous", "text the summary pass reads: previous = the end of the segment before (causal); current = the "
        "start of this segment, as in the paper (non-causal: a token sees a summary of the tokens after it)")
    scale: Scale = option("learned", "learned = written memory times a trained per-channel factor; none = raw final-norm states")
    init_seed: int = option(0, "seed of the untrained initial parameters")

    def __post_init__(self) -> None:
        self.check(self.sensory >= 0, "sensory", "must be >= 0")
        self.check(self.cache >= 1, "cache", "must be >= 1")
        self.check(self.recall_dim is None or self.recall_dim >= 1, "recall_dim", "must be >= 1 or null")
        self.check(0.0 < self.sum_fraction <= 1.0, "sum_fraction", "must be in (0, 1]")

    def summary_length(self, tokens: int) -> int:
        """Tokens of a `tokens`-long segment the summary pass reads."""
        return max(1, round(tokens * self.sum_fraction))


@dataclass
class HMTState:
    """`cache [c, d]` memory embeddings M (oldest first); `spans [c, 4]` the segment each came from (first and
    end token, first token's byte, last token's byte); the previous segment's last tokens (`sensory [<=k]`,
    starting at document token `sensory_at`), the end of the previous segment the summary pass reads
    (`tail`, `summary: previous`) and the segment count."""

    cache: torch.Tensor
    spans: torch.Tensor
    sensory: torch.Tensor
    segments: int = 0
    sensory_at: tuple[int, int] = (0, 0)  # document token and byte where the sensory tokens start
    tail: torch.Tensor | None = None  # [<= sum_fraction x segment] ids (empty or None: nothing read yet)


class HMTParams(nn.Module):
    """HMT's trainable parameters (declared for the type checker; `build_params` sets them)."""

    memory: nn.Parameter
    prompt: nn.Parameter
    w_q: nn.Parameter
    w_k: nn.Parameter
    scale: nn.Parameter | None


@register
class HMT(TrainableMethod[HMTOptions, HMTState]):
    params: HMTParams
    name = "hmt"
    Options = HMTOptions
    summary = "Hierarchical Memory Transformer: sensory tokens + segment summary + recall over cached memories (trainable)"
    param_options = ("recall_dim", "scale")

    @property
    def causal(self) -> bool:
        return self.options.summary == "previous"

    def build_params(self, gen: torch.Generator) -> HMTParams:
        d = self.backbone.config.hidden_size
        h, std = self.options.recall_dim or d, self.embedding_std()
        p = HMTParams()
        p.memory = gaussian(gen, (1, d), std)  # first segment's memory, before anything was written
        p.prompt = gaussian(gen, (1, d), std)  # T, the summary prompt
        p.w_q = gaussian(gen, (d, h), d**-0.5)
        p.w_k = gaussian(gen, (d, h), d**-0.5)
        p.scale = scale_param(self.output_scale_init(), d, self.options.scale)
        return p

    def unimem(self) -> UniMem:
        o = self.options
        reading = (f"similarity: softmax cross-attention over the last {o.cache} memories" if o.recall
                   else "position: the last memory") + f" + position: the last {o.sensory} tokens"
        return UniMem(management=f"{o.sensory} sensory tokens + 1 memory embedding + FIFO cache of {o.cache}",
                      writing="model-forward (one final state per segment)", reading=reading,
                      injection="input embeddings")

    def check_segment(self, segment: int) -> None:
        self.check_span(segment, self.options.sensory + 2)

    def init_state(self) -> HMTState:
        dev, d = self.backbone.device, self.backbone.config.hidden_size
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return HMTState(torch.zeros(0, d, device=dev), torch.zeros(0, 4, dtype=torch.long, device=dev), empty)

    def memory_size(self, state: HMTState) -> int:
        return int(state.cache.shape[0]) + int(state.sensory.numel())

    def read(self, state: HMTState, seg: Segment) -> tuple[HMTState, ForwardPlan]:
        x = self.embed(seg.ids)
        prior = self.as_input(self.recall(state, self.summary_text(state, x)))
        sensory = self.embed(state.sensory)
        embeds = torch.cat((prior, sensory, x, prior))
        return state, self.memory_plan(embeds, 1 + sensory.shape[0], len(seg))

    def pending_cacheable(self) -> bool:
        """[P_n; sensory; tokens; P_n]: P_n depends on the segment's own tokens only with `summary: current`."""
        return self.options.summary == "previous"

    def summary_text(self, state: HMTState, x: torch.Tensor) -> torch.Tensor:
        """Embeddings `[j, d]` the summary pass reads: the previous segment's end, or (paper) this one's start."""
        if self.options.summary == "current":
            return x[: self.options.summary_length(x.shape[0])]
        return self.embed(state.tail) if state.tail is not None else x[:0]  # [T; T] for a state without a tail

    def recall(self, state: HMTState, text: torch.Tensor) -> torch.Tensor:
        """P_n `[1, d]`: the memory this segment starts from, recalled with a summary of `text`."""
        if state.cache.shape[0] == 0:
            return self.params.memory
        if not self.options.recall:
            return state.cache[-1:]
        summary = self.summarize(text)
        p = self.params
        q = summary.float() @ p.w_q
        k = state.cache.float() @ p.w_k
        weights = torch.softmax(q @ k.T / math.sqrt(p.w_q.shape[1]), dim=-1)
        return weights @ state.cache.float()

    def summarize(self, text: torch.Tensor) -> torch.Tensor:
        """S_n `[1, d]`: the last final state of [T; text; T]."""
        t = self.as_input(self.params.prompt)
        embeds = torch.cat((t, text, t))
        pos = torch.arange(embeds.shape[0], device=self.backbone.device)
        return self.backbone.forward(torch.empty(0), ForwardPlan(query_pos=pos, key_pos=pos), embeds=embeds)[-1:]

    def write(self, state: HMTState, seg: Segment, plan: ForwardPlan) -> HMTState:
        new = self.written(plan.out.final_hidden[-1:].float())
        n = self.options.cache
        span = torch.tensor([[seg.start, seg.start + len(seg), int(seg.byte_start[0]), int(seg.byte_start[-1])]],
                            device=state.spans.device)
        k = min(self.options.sensory, len(seg))
        sensory = seg.ids[len(seg) - k :].to(state.sensory.device)
        at = (seg.start + len(seg) - k, int(seg.byte_start[len(seg) - k])) if k else (seg.start + len(seg), 0)
        tail = seg.ids[len(seg) - self.options.summary_length(len(seg)) :].to(state.sensory.device).clone()
        return HMTState(torch.cat((state.cache, new))[-n:], torch.cat((state.spans, span))[-n:], sensory,
                        state.segments + 1, at, tail)

    def detach_state(self, state: HMTState) -> HMTState:
        return HMTState(state.cache.detach(), state.spans, state.sensory, state.segments, state.sensory_at, state.tail)

    def state_tensors(self, state: HMTState) -> dict[str, torch.Tensor]:
        tail = state.tail if state.tail is not None else state.sensory[:0]  # no tensor is None in a snapshot
        return {"cache": state.cache.detach(), "spans": state.spans, "sensory": state.sensory, "tail": tail,
                "counters": torch.tensor([state.segments, *state.sensory_at])}

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> HMTState:
        dev = self.backbone.device
        c = [int(x) for x in tensors["counters"].tolist()]
        tail = tensors.get("tail")
        return HMTState(tensors["cache"].to(dev), tensors["spans"].to(dev), tensors["sensory"].to(dev), c[0],
                        (c[1], c[2]), tail.to(dev) if tail is not None else None)

    def dump(self, state: HMTState) -> list[dict[str, Any]]:
        """One row per cached memory (the segment it summarises), then the sensory tokens."""
        first = state.segments - len(state.spans)
        out = [{"kind": f"memory of segment {first + i}", "entries": 1, "tokens": [a, b], "byte_start": bs,
                "byte_last_token": bl} for i, (a, b, bs, bl) in enumerate(state.spans.tolist())]
        n = int(state.sensory.numel())
        if n:
            out.append({"kind": "sensory tokens", "entries": n, "tokens": [state.sensory_at[0], state.sensory_at[0] + n],
                        "byte_start": state.sensory_at[1],
                        "byte_last_token": int(state.spans[-1, 3]) if len(state.spans) else state.sensory_at[1]})
        return out
