"""Reading token ids into a method's memory without scoring them, and greedy continuation from that memory.

Used where only what comes after the text matters (passkey and needle benchmarks, `ask`, `generate`):
no logits are computed for the ingested tokens, which saves the lm_head's share of every forward.
Generated tokens are written to memory like any other text, one-token segments at a time, so a
continuation longer than a segment is read back by the method as it grows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .attention import ForwardPlan
from .backbone import Backbone
from .methods.base import Method
from .segments import Segment
from .stream import forward_segment as step


@dataclass
class Ingested:
    """Memory after reading some tokens, and the forward of the last one (its hidden state and plan)."""

    state: Any
    tokens: int  # document tokens read so far (the next token's index)
    last_hidden: torch.Tensor  # [d]
    last_plan: ForwardPlan


def plain_segments(ids: torch.Tensor, segment: int, start: int = 0) -> Iterator[Segment]:
    """Segments of `ids` with no targets (nothing is scored) and byte offsets unknown (-1)."""
    for s in range(0, len(ids), segment):
        part = ids[s : s + segment]
        n = len(part)
        yield Segment(start + s, part, torch.full((n,), -1), torch.full((n,), -1), torch.zeros(n, dtype=torch.long))


def ingest(backbone: Backbone, method: Method, segments: Iterator[Segment], state: Any = None) -> Ingested:
    """Read every segment into memory; keep only what the next token needs."""
    state = method.init_state() if state is None else state
    hidden = plan = None
    tokens = 0
    with torch.inference_mode():
        for seg in segments:
            state, hidden, plan = step(backbone, method, state, seg)
            tokens = seg.start + len(seg)
    if hidden is None:
        raise ValueError("nothing to ingest: the text has no tokens")
    return Ingested(state, tokens, hidden[-1], plan)


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
            ids = torch.tensor([token])
            seg = Segment(done.tokens, ids, torch.tensor([-1]), torch.tensor([-1]), torch.zeros(1, dtype=torch.long))
            state, hidden, plan = step(backbone, method, done.state, seg)
            done = Ingested(state, done.tokens + 1, hidden[-1], plan)
    return out, done
