"""Which parts of the source an answer read: the entries similarity reading retrieved, as byte spans.

While an answer is generated, every forward's plan records, per retrieval layer, the document token each
head's top-k picked for each query (`ForwardOutputs.retrieved`). `RetrievalTally` counts, for the query that
chooses the next token (the last prompt token, then each generated token), how often every document token
was picked over layers, heads and steps. Methods that read memory by position (windows, sinks, memory
tokens) retrieve nothing: their citation is what memory held.

Raw picks say where the heads rest more than where the answer is: the oldest stored tokens and chapter
headings draw picks whatever the question. So a citation ranks *relevance*, not picks, once every question
of a call has been answered (`rank_weights`, rule DEFAULT_RANKING): structural tokens (heading lines, the
method's attention sinks) are left out, and so are the tokens that every question of the call and a
question-independent probe (`BASELINE_QUESTION`, read once per call) picked. A lone question drops only
the structural tokens: the one salient fact of a document is often what the probe reads too. The other
rules of RANKINGS are kept for `benchmarks/cite_rankings.py`, which compares them on the same answers.
The heaviest remaining tokens seed spans (seeds close together join), ranked by their share of the
remaining picks; each span carries its byte offsets, that share, its share of all picks, and an excerpt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..model.attention import ForwardPlan
from ..text.documents import text_path

MERGE_GAP = 16  # picked tokens at most this far apart form one span
FOCUS_TOKENS = 48  # the most relevant tokens that seed spans
EXCERPT_CONTEXT = 60  # source bytes shown on each side of a span
# Read after the document like a question, once per document: what it retrieves is what any question would.
BASELINE_QUESTION = "What is this text about?"
PROBE_DAMPING = 0.5  # the share of the probe's picks the damped ranking subtracts
# A heading line: a markdown heading, a "Chapter 12" / "BOOK IV"-style line (the number is required: hard-wrapped
# prose has short lines that start with "Part of..."), a roman numeral alone, or a short line in capitals.
HEADING = re.compile(
    rb"^[ \t]*(?:#{1,6}[ \t].{0,80}|(?i:chapter|book|part|volume|section|act|scene|letter|canto)[ \t]+"
    rb"(?:[0-9]+|[IVXLCDM]+)\b.{0,80}|[IVXLCDM]{1,8}\.?|[A-Z0-9][A-Z0-9 \t.,:;'\-]{2,60})[ \t]*\r?$", re.MULTILINE)


@dataclass
class Citation:
    """A source span: `kind` "retrieved" or "held". A retrieved span's `weight` is its relevance share (of
    the answer's picks left by the ranking rule: structural tokens and what every question and the probe
    read removed), `reads` its share of all the answer's picks."""

    kind: str
    tokens: tuple[int, int]  # document token indices [start, end)
    byte_start: int
    byte_end: int
    weight: float | None
    excerpt: str | None = None
    reads: float | None = None

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
        """The `limit` heaviest spans of the raw picks as (start, end, share of all picks), heaviest first
        (`rank_spans` over the counts)."""
        return [(a + self.first, b + self.first, w) for a, b, w in rank_spans(self.counts.double(), limit, focus)]


def rank_spans(weights: torch.Tensor, limit: int = 3, focus: int = FOCUS_TOKENS) -> list[tuple[int, int, float]]:
    """The `limit` heaviest spans of non-negative per-token `weights` as (start, end, share of the total),
    heaviest first. Only the `focus` heaviest tokens seed spans (weight spread thinly over the whole store
    would otherwise merge into one span as long as the document); seeds at most MERGE_GAP apart join, and a
    span's share counts all weight inside it."""
    total = float(weights.sum())
    if total <= 0:
        return []
    k = min(focus, int((weights > 0).sum()))
    seeds = sorted(torch.topk(weights, k).indices.tolist())
    runs, start, prev = [], seeds[0], seeds[0]
    for t in seeds[1:]:
        if t - prev > MERGE_GAP:
            runs.append((start, prev + 1))
            start = t
        prev = t
    runs.append((start, prev + 1))
    scored = [(a, b, float(weights[a:b].sum()) / total) for a, b in runs]
    return sorted(scored, key=lambda r: -r[2])[:limit]


def heading_bytes(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of the heading lines of a text (see HEADING)."""
    return [(m.start(), m.end()) for m in HEADING.finditer(data) if m.group().strip()]


def structural_mask(byte_start: torch.Tensor, first: int, last: int, headings: list[tuple[int, int]],
                    sinks: int = 0) -> torch.Tensor:
    """Bool per document token [first, last): True for tokens that start inside a heading line, and for
    the method's attention sinks (absolute token index < `sinks`)."""
    starts = byte_start[first:last].contiguous()
    mask = torch.zeros(len(starts), dtype=torch.bool)
    if headings:
        lo = torch.searchsorted(starts, torch.tensor([a for a, _ in headings], dtype=starts.dtype))
        hi = torch.searchsorted(starts, torch.tensor([b for _, b in headings], dtype=starts.dtype))
        edges = torch.zeros(len(starts) + 1, dtype=torch.long)
        edges.index_add_(0, lo, torch.ones_like(lo))
        edges.index_add_(0, hi, -torch.ones_like(hi))
        mask |= edges.cumsum(0)[:-1] > 0
    mask[: max(0, min(sinks - first, len(mask)))] = True
    return mask


def relevance(counts: torch.Tensor, baseline: torch.Tensor | None, structural: torch.Tensor | None,
              damping: float = 1.0) -> torch.Tensor:
    """Per-token relevance of an answer's picks: structural tokens removed, then `damping` times the
    baseline's share of picks subtracted from the answer's share (negative parts clipped): with damping 1 a
    token that the baseline reads as much as this answer scores 0. Sums to at most 1."""
    w = shares(counts, structural)
    if baseline is not None and w.sum() > 0:
        w = (w - damping * shares(baseline, structural)).clamp(min=0)
    return w


def shares(counts: torch.Tensor, structural: torch.Tensor | None) -> torch.Tensor:
    """Each token's share of the picks left after the structural tokens are removed (all zero if none are)."""
    w = counts.double().clone()
    if structural is not None:
        w[structural] = 0
    total = w.sum()
    return w / total if total > 0 else w


@dataclass
class Evidence:
    """What one answer's citations are ranked from: its picks (`RetrievalTally`), the question-independent
    probe's picks and the structural tokens (None where not found)."""

    tally: RetrievalTally
    byte_start: torch.Tensor  # every token's byte offset in the text read (spans map back through it)
    doc_end: int  # the text's size in bytes
    baseline: RetrievalTally | None = None
    structural: torch.Tensor | None = None

    def shares(self) -> torch.Tensor:
        """The answer's share of picks per token, structural tokens left out."""
        return shares(self.tally.counts, self.structural)


def common_reads(evidence: Sequence[Evidence]) -> torch.Tensor | None:
    """Bool per token: picked by every question of the call that picked anything (None with fewer than two
    such questions: one question alone shares nothing)."""
    picked = [e.tally.counts > 0 for e in evidence if e.tally.counts.sum() > 0]
    if len(picked) < 2:
        return None
    return torch.stack(picked).all(0)


def rank_weights(rule: str, evidence: Evidence, others: Sequence[Evidence] = ()) -> torch.Tensor:
    """Per-token weights under one ranking `rule` (RANKINGS), from this answer's `evidence` and that of every
    question of the same call (`others`, this answer's included) for the cross-question rules."""
    e = evidence
    base = e.baseline.counts if e.baseline is not None else None
    if rule == "picks":
        return e.tally.counts.double()
    if rule == "structure":
        return e.shares()
    if rule == "probe":
        return relevance(e.tally.counts, base, e.structural)
    if rule == "damped":
        return relevance(e.tally.counts, base, e.structural, damping=PROBE_DAMPING)
    if rule == "shared":
        return shares(e.tally.counts, _either(e.structural, shared_reads(e, others)))
    raise ValueError(f"unknown citation ranking {rule!r} (one of {', '.join(RANKINGS)})")


def shared_reads(evidence: Evidence, others: Sequence[Evidence]) -> torch.Tensor | None:
    """Bool per token: read by every question of the call and by the probe (None with one question: a lone
    question's fact is often what the probe reads too, so the probe alone drops nothing)."""
    common = common_reads(others)
    if common is not None and evidence.baseline is not None:
        common &= evidence.baseline.counts > 0
    return common


def _either(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a | b


RANKINGS = ("picks", "structure", "probe", "damped", "shared")
DEFAULT_RANKING = "shared"  # chosen on the tuning set: docs/benchmarks.md "Which passage --cite names first"


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
    with open(text_path(path), "rb") as f:  # offsets are into the text the model read (a PDF's extracted text)
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


def retrieved_citations(evidence: Evidence, path: str | None, limit: int = 3, *, rule: str | None = None,
                        others: Sequence[Evidence] = ()) -> list[Citation]:
    """The spans of the answer's picks most relevant to it under ranking `rule` (default: DEFAULT_RANKING;
    `others`: the evidence of every question of the call), most relevant first, as citations (document token
    indices count from the document's start)."""
    tally = evidence.tally
    weights = rank_weights(rule or DEFAULT_RANKING, evidence, others)
    total = max(int(tally.counts.sum()), 1)
    out = []
    for a, b, share in rank_spans(weights, limit):
        lo, hi = span_bytes(evidence.byte_start, (a + tally.first, b + tally.first), evidence.doc_end)
        out.append(Citation("retrieved", (a, b), lo, hi, round(share, 4), excerpt(path, lo, hi),
                            round(int(tally.counts[a:b].sum()) / total, 4)))
    return out
