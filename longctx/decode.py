"""Reading token ids into a method's memory without scoring them, and greedy continuation from that memory.

Used where only what comes after the text matters (passkey and needle benchmarks, `ask`, `generate`):
no logits are computed for the ingested tokens, which saves the lm_head's share of every forward.

Generated tokens are written to memory as the method writes any text, so a continuation longer than a
segment is read back by the method as it grows:
- key/value methods (`xl`, `sinks`, `memorizing`, ...) write each new token at once (a one-token segment
  appends one entry);
- memory-token methods (`rmt`, `hmt`, `unimix` with RMT tokens) write memory once per *segment*: the
  text since the last write (the prompt's final partial segment, then the generated tokens) is held as a
  pending segment that each step reads in full without writing, and is written when it reaches the
  segment length, exactly as if it had been part of the document (tested against ingesting it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import ForwardPlan
from .backbone import Backbone
from .methods.base import Method
from .segments import Segment
from .stream import forward_segment as step
from .stream import read_forward


@dataclass
class Ingested:
    """Memory after reading some tokens, and the forward of the last one (its hidden state and plan).

    `pending` holds tokens read but not yet written to a segment-recurrent memory (else empty); `segment`
    is the segment length memory is written at."""

    state: Any
    tokens: int  # document tokens read so far (the next token's index)
    last_hidden: torch.Tensor  # [d]
    last_plan: ForwardPlan
    pending: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    segment: int = 0


def plain_segments(ids: torch.Tensor, segment: int, start: int = 0) -> Iterator[Segment]:
    """Segments of `ids` with no targets (nothing is scored) and byte offsets unknown (-1)."""
    for s in range(0, len(ids), segment):
        part = ids[s : s + segment]
        yield _segment(start + s, part)


def _segment(start: int, ids: torch.Tensor) -> Segment:
    n = len(ids)
    return Segment(start, ids, torch.full((n,), -1), torch.full((n,), -1), torch.zeros(n, dtype=torch.long))


def ingest(backbone: Backbone, method: Method, segments: Iterator[Segment], state: Any = None) -> Ingested:
    """Read every segment into memory; keep only what the next token needs. For a memory-token method a
    final segment shorter than the first is read but left pending (generation continues it)."""
    state = method.init_state() if state is None else state
    hidden = plan = None
    tokens, size, pending = 0, 0, torch.zeros(0, dtype=torch.long)
    with torch.inference_mode():
        for seg in segments:
            size = size or len(seg)
            if method.writes_per_segment and len(seg) < size:
                _, hidden, plan = read_forward(backbone, method, state, seg)  # read, not written: pending
                pending = seg.ids
            else:
                state, hidden, plan = step(backbone, method, state, seg)
            tokens = seg.start + len(seg)
    if hidden is None:
        raise ValueError("nothing to ingest: the text has no tokens")
    return Ingested(state, tokens, hidden[-1], plan, pending, size)


def greedy(backbone: Backbone, method: Method, done: Ingested, max_new_tokens: int,
           stop: Callable[[int], bool] | None = None) -> tuple[list[int], Ingested]:
    """Greedy continuation of the ingested text; each new token is read into memory before the next."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = int(backbone.model.lm_head(done.last_hidden).argmax())
            out.append(token)
            if stop is not None and stop(token):
                break
            done = _advance(backbone, method, done, token)
    return out, done


def _advance(backbone: Backbone, method: Method, done: Ingested, token: int) -> Ingested:
    """Read one more token: at once into a key/value memory; into the pending segment of a memory-token one."""
    if not method.writes_per_segment:
        state, hidden, plan = step(backbone, method, done.state, _segment(done.tokens, torch.tensor([token])))
        return Ingested(state, done.tokens + 1, hidden[-1], plan, done.pending, done.segment)
    pending = torch.cat((done.pending, torch.tensor([token])))
    seg = _segment(done.tokens + 1 - len(pending), pending)
    if len(pending) >= (done.segment or len(pending)):
        state, hidden, plan = step(backbone, method, done.state, seg)
        return Ingested(state, done.tokens + 1, hidden[-1], plan, torch.zeros(0, dtype=torch.long), done.segment)
    _, hidden, plan = read_forward(backbone, method, done.state, seg)
    return Ingested(done.state, done.tokens + 1, hidden[-1], plan, pending, done.segment)
