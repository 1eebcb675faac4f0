"""The one segment driver: for each segment, method.read -> backbone forward -> score -> method.write."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .backbone import Backbone
from .methods.base import Method
from .metrics import NllSums
from .segments import Segment


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
    byte_end: int  # source bytes covered so far
    memory: int  # entries held by the method after this segment


@dataclass
class StreamResult:
    """What one method produced over one document."""

    sums: NllSums
    state: Any
    tokens: int
    seconds: float
    token_digest: str  # sha256 over the token ids seen: proves methods compared the same tokens
    extra: dict = field(default_factory=dict)


def run_stream(backbone: Backbone, method: Method, segments: Iterable[Segment], *, state: Any = None,
               on_segment: Callable[[SegmentEvent], None] | None = None) -> StreamResult:
    """Stream `segments` through `method`; returns the NLL sums and the final memory state."""
    state = method.init_state() if state is None else state
    sums, digest, tokens, t0 = NllSums(), hashlib.sha256(), 0, time.perf_counter()
    with torch.inference_mode():
        for i, seg in enumerate(segments):
            state, seg_nll = _step(backbone, method, state, seg, sums)
            digest.update(seg.ids.numpy().astype("<i8").tobytes())
            tokens = seg.start + len(seg)
            if on_segment is not None:
                total, scored = sums.nll, sums.tokens
                on_segment(SegmentEvent(
                    method=method.name, index=i, tokens=tokens, scored=scored, nll=seg_nll,
                    running_ppl=math.exp(total / scored) if scored else float("nan"),
                    seconds=time.perf_counter() - t0, byte_end=int(seg.byte_start[-1]),
                    memory=method.memory_size(state)))
    return StreamResult(sums, state, tokens, time.perf_counter() - t0, digest.hexdigest())


def _step(backbone: Backbone, method: Method, state: Any, seg: Segment, sums: NllSums) -> tuple[Any, float]:
    """One segment: read memory, forward, score the predicted tokens, write memory."""
    state, plan = method.read(state, seg)
    hidden = backbone.forward(seg.ids, plan)
    scored = seg.targets >= 0
    seg_nll = 0.0
    if bool(scored.any()):
        nll = backbone.token_nll(hidden[scored.to(hidden.device)], seg.targets[scored])
        positions = seg.token_index[scored] + 1  # document position of each predicted token
        sums.add(positions, nll, int(seg.target_bytes[scored].sum()))
        seg_nll = float(nll.double().sum())
    return method.write(state, seg, plan), seg_nll
