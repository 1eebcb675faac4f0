"""The one segment driver: for each segment, method.read -> backbone forward -> score -> method.write."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .methods.base import Method, StepNLL
from .metrics import NllSums
from .model import lora
from .model.attention import ForwardPlan
from .model.backbone import Backbone
from .text.segments import Segment


@dataclass
class SegmentEvent:
    """Progress after one segment (also the `--jsonl` per-segment record)."""

    method: str
    index: int
    tokens: int  # tokens read so far
    scored: int  # tokens scored so far
    nll: float  # NLL sum of this segment
    running_ppl: float
    seconds: float
    byte_end: int  # byte offset where the tokens read so far end
    memory: int  # entries held by the method after this segment


@dataclass
class StreamResult:
    """What one method produced over one document (or up to an interruption)."""

    sums: NllSums
    state: Any
    tokens: int  # document tokens consumed (always a segment boundary)
    seconds: float
    token_digest: str  # sha256 over the token ids seen: proves methods compared the same tokens
    next_byte: int = 0  # byte offset of the first token not consumed
    interrupted: bool = False
    # (id, NLL) of the token just past a --max-tokens cut: predicted but not scored, so that a longer run
    # resumed from this one adds exactly the number the uninterrupted longer run computed
    after_cut: tuple[int, float] | None = None


def run_stream(backbone: Backbone, method: Method, segments: Iterable[Segment], *, state: Any = None,
               sums: NllSums | None = None, on_segment: Callable[[SegmentEvent], None] | None = None,
               stop: Callable[[], bool] | None = None, checkpoint_every: int | None = None,
               on_checkpoint: Callable[[StreamResult], object] | None = None) -> StreamResult:
    """Stream `segments` through `method`; returns the NLL sums and the final memory state.

    `state`/`sums` continue a resumed run. `stop()` is polled between segments (graceful interrupt); every
    `checkpoint_every` segments `on_checkpoint` receives a consistent partial result.
    """
    state = method.init_state() if state is None else state
    res = StreamResult(sums if sums is not None else NllSums(), state, 0, 0.0, "")
    digest, t0, done = hashlib.sha256(), time.perf_counter(), 0
    with torch.inference_mode():
        for seg in segments:
            res.state, seg_nll, after = _step(backbone, method, res.state, seg, res.sums)
            if after is not None:
                res.after_cut = (int(seg.after_cut), after)  # type: ignore[arg-type]  # set with `after`
            digest.update(seg.ids.numpy().astype("<i8").tobytes())
            res.tokens, res.next_byte, done = seg.start + len(seg), seg.next_byte, done + 1
            res.seconds, res.token_digest = time.perf_counter() - t0, digest.hexdigest()
            if on_segment is not None:
                on_segment(_event(method, done - 1, res, seg_nll, seg))
            if checkpoint_every and on_checkpoint is not None and done % checkpoint_every == 0:
                on_checkpoint(res)
            if stop is not None and stop():
                res.interrupted = True
                break
    res.seconds, res.token_digest = time.perf_counter() - t0, digest.hexdigest()
    return res


def _event(method: Method, i: int, res: StreamResult, seg_nll: float, seg: Segment) -> SegmentEvent:
    total, scored = res.sums.nll, res.sums.tokens
    return SegmentEvent(method=method.name, index=i, tokens=res.tokens, scored=scored, nll=seg_nll,
                        running_ppl=math.exp(total / scored) if scored else float("nan"), seconds=res.seconds,
                        byte_end=int(seg.next_byte), memory=method.memory_size(res.state))


def forward_segment(backbone: Backbone, method: Method, state: Any, seg: Segment) -> tuple[Any, torch.Tensor, ForwardPlan]:
    """One segment: read memory, forward, write memory. Returns the new state, the hidden states of the
    segment's own tokens `[q, d]` (memory-token rows removed) and the plan. Every task runs segments through
    this one function: scoring, ingestion, generation and training."""
    state, tokens, plan = read_forward(backbone, method, state, seg)
    return method.write(state, seg, plan), tokens, plan


def read_forward(backbone: Backbone, method: Method, state: Any, seg: Segment, *,
                 capture: bool = False) -> tuple[Any, torch.Tensor, ForwardPlan]:
    """`forward_segment` without the write: what the segment sees of memory, and its tokens' hidden states
    (with `capture`, every row's pre-rotation keys/values are kept in the plan's outputs)."""
    lora.activate(backbone, method.lora)
    state, plan = method.read(state, seg)
    plan.capture = plan.capture or capture
    hidden = backbone.forward(seg.ids, plan, embeds=plan.embeds)
    plan.out.hidden = hidden
    return state, (hidden if plan.token_rows is None else hidden[plan.token_rows]), plan


def scored_nll(backbone: Backbone, hidden: torch.Tensor, seg: Segment) -> torch.Tensor | None:
    """Per-token NLL of the segment's scored targets (those >= 0) from its tokens' hidden states; None if none."""
    scored = seg.targets >= 0
    if not bool(scored.any()):
        return None
    return backbone.token_nll(hidden[scored.to(hidden.device)], seg.targets[scored])


def _step(backbone: Backbone, method: Method, state: Any, seg: Segment,
          sums: NllSums) -> tuple[Any, float, float | None]:
    """One segment through `forward_segment`, then the predicted tokens scored; sums updated last. Also
    returns the NLL of the token after a --max-tokens cut (None when there is none), which is not scored."""
    state, hidden, _ = forward_segment(backbone, method, state, seg)
    targets = seg.targets
    if seg.after_cut is not None:  # predict it with the others: the same rows as a run that goes on
        targets = targets.clone()
        targets[-1] = seg.after_cut
    predicted = targets >= 0
    if not bool(predicted.any()):
        return state, 0.0, None
    nll = backbone.token_nll(hidden[predicted.to(hidden.device)], targets[predicted])
    after = None
    if seg.after_cut is not None:
        after, nll = float(nll[-1]), nll[:-1]
    scored = seg.targets >= 0
    if bool(scored.any()):
        positions = seg.token_index[scored] + 1  # document position of each predicted token
        sums.add(positions, nll, int(seg.target_bytes[scored].sum()))
    return state, float(nll.double().sum()), after


def step_nll(backbone: Backbone, method: Method) -> StepNLL:
    """The driver's one-segment read-and-score, as a function of (memory, segment): what a method that
    back-propagates while it reads (UIO) is handed, so that methods never import the driver."""
    def step(state: Any, seg: Segment) -> torch.Tensor | None:
        _, hidden, _ = read_forward(backbone, method, state, seg)
        return scored_nll(backbone, hidden, seg)
    return step
