"""Which parts of the source an answer read: the entries similarity reading retrieved, as byte spans.

While an answer is generated, every forward's plan records, per retrieval layer, the document token each
head's top-k picked for each query (`ForwardOutputs.retrieved`). `RetrievalTally` counts, for the query that
chooses the next token (the last prompt token, then each generated token), how often every document token
was picked over layers, heads and steps. The most-picked tokens seed spans (seeds close together join),
ranked by their share of all picks; each span carries its byte offsets and an excerpt of the source.
Methods that read memory by position (windows, sinks, memory tokens) retrieve nothing: their citation is
what memory held.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..model.attention import ForwardPlan

MERGE_GAP = 16  # picked tokens at most this far apart form one span
FOCUS_TOKENS = 48  # the most-picked tokens that seed spans
EXCERPT_CONTEXT = 60  # source bytes shown on each side of a span


@dataclass
class Citation:
    """A source span: `kind` "retrieved" (with the share of all picks in `weight`) or "held"."""

    kind: str
    tokens: tuple[int, int]  # document token indices [start, end)
    byte_start: int
    byte_end: int
    weight: float | None
    excerpt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RetrievalTally:
    """Counts of retrieved document tokens in [first, last) (prompt-head and question tokens are excluded)."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.counts = torch.zeros(max(last - first, 0), dtype=torch.long)
        self.forwards = 0

    def add(self, plan: ForwardPlan | None) -> None:
        """Tally the picks of the query row that predicts the next token."""
        if plan is None or not plan.out.retrieved:
            return
        self.forwards += 1
        row = plan.token_rows.stop - 1 if plan.token_rows is not None else -1
        for picked in plan.out.retrieved.values():
            idx = picked[:, row].flatten().cpu()
            idx = idx[(idx >= self.first) & (idx < self.last)] - self.first
            self.counts += torch.bincount(idx, minlength=len(self.counts))

    def spans(self, limit: int = 3, focus: int = FOCUS_TOKENS) -> list[tuple[int, int, float]]:
        """The `limit` heaviest spans as (start, end, share of all picks), heaviest first. Only the `focus`
        most-picked tokens seed spans (picks spread thinly over the whole store would otherwise merge into
        one span as long as the document); seeds at most MERGE_GAP apart join, and a span's share counts
        every pick inside it."""
        total = int(self.counts.sum())
        if not total:
            return []
        k = min(focus, int((self.counts > 0).sum()))
        seeds = sorted(torch.topk(self.counts, k).indices.tolist())
        runs, start, prev = [], seeds[0], seeds[0]
        for t in seeds[1:]:
            if t - prev > MERGE_GAP:
                runs.append((start, prev + 1))
                start = t
            prev = t
        runs.append((start, prev + 1))
        scored = [(a + self.first, b + self.first, int(self.counts[a:b].sum()) / total) for a, b in runs]
        return sorted(scored, key=lambda r: -r[2])[:limit]


def span_bytes(byte_start: torch.Tensor, tokens: tuple[int, int], doc_end: int) -> tuple[int, int]:
    """Byte span of document tokens [a, b): from token a's start to token b's (or the document's end)."""
    a, b = tokens
    end = int(byte_start[b]) if b < len(byte_start) else doc_end
    return int(byte_start[a]), end


def excerpt(path: str | None, start: int, end: int, context: int = EXCERPT_CONTEXT, limit: int = 400) -> str | None:
    """The span's text with some context on each side (whitespace collapsed); None if the file is gone."""
    if not path or not Path(path).is_file():
        return None
    lo = max(0, start - context)
    with open(path, "rb") as f:
        f.seek(lo)
        raw = f.read(min(end - lo + context, limit + 2 * context))
    return " ".join(raw.decode("utf-8", errors="replace").split())


def held_citations(runs: list[dict[str, Any]], first: int, last: int, byte_start: torch.Tensor,
                   doc_end: int, path: str | None) -> list[Citation]:
    """What a position-reading memory held (from `method.dump()` runs), clipped to the document's tokens."""
    out = []
    for run in runs:
        a, b = max(run["tokens"][0], first), min(run["tokens"][1], last)
        if b > a:
            lo, hi = span_bytes(byte_start, (a, b), doc_end)
            out.append(Citation("held", (a - first, b - first), lo, hi, None, excerpt(path, lo, hi, context=0)))
    return out


def retrieved_citations(tally: RetrievalTally, byte_start: torch.Tensor, doc_end: int, path: str | None,
                        limit: int = 3) -> list[Citation]:
    """The tally's heaviest spans as citations (document token indices count from the document's start)."""
    out = []
    for a, b, share in tally.spans(limit):
        lo, hi = span_bytes(byte_start, (a, b), doc_end)
        out.append(Citation("retrieved", (a - tally.first, b - tally.first), lo, hi, round(share, 4),
                            excerpt(path, lo, hi)))
    return out
