"""Knowledge retention, as MemoryLLM and M+ measure it: facts read first, then unrelated book text, then the
question about each fact after every distance.

One trial is one token stream per method: the question frame's head, `facts` invented facts (needle.py's,
"The ferry to Sark leaves only on Tuesday mornings."), then book filler. The method reads the stream once;
whenever the filler read since the facts reaches a distance (2k, 8k, 32k, 128k tokens), each question is
asked over its own copy of the memory (`decode.fork`) and answered greedily, and reading goes on from the
memory as it was. So every distance costs one reading of the longest, and all methods read the same tokens.
Checkpoints fall on segment boundaries of the whole stream, so the segmentation is that of one straight
reading. An answer is correct when it contains the expected words (needle.py's normalized match).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import UsageError
from ..methods.base import Method
from ..model.backbone import Backbone
from ..resources import release_memory
from ..tasks.decode import Ingested, continue_streamed, extend, fork, ingest, plain_segments
from ..tasks.sampling import stop_ids
from ..text.prompts import QAFrame, qa_frame
from .needle import Fact, answered, make_facts
from .passkey import Filler
from .splits import eval_set

DISTANCES = (2048, 8192, 32768, 131072)


@dataclass
class RetentionConfig:
    distances: Sequence[int] = DISTANCES
    trials: int = 1  # token streams (fact sets and filler offsets) per method
    facts: int = 4  # facts read together at the start of each stream
    seed: int | None = None  # None: the set's first seed (0 tuning, 1000 report)
    max_new_tokens: int = 24
    instruction: str | None = None  # None = ask's default
    eval_set: str = "tuning"  # tuning or report (splits.py): which seeds may be used, which novel not

    def __post_init__(self):
        self.distances = tuple(sorted(int(d) for d in self.distances))
        if self.trials < 1 or self.facts < 1 or not self.distances or self.distances[0] < 1:
            raise UsageError("retention needs >= 1 trial, >= 1 fact and distances >= 1 token")
        self.seed = eval_set(self.eval_set).seed(self.seed)


@dataclass
class RetentionItem:
    method: str
    trial: int
    distance: int  # nominal distance (the configured one)
    filler_tokens: int  # tokens actually read between the facts and the question (a segment boundary)
    fact: str
    question: str
    expected: str
    answer: str
    correct: bool


@dataclass
class RetentionReport:
    config: RetentionConfig
    methods: dict[str, str] = field(default_factory=dict)  # name -> protocol
    items: list[RetentionItem] = field(default_factory=list)
    reading: list[dict[str, Any]] = field(default_factory=list)  # per method and trial: tokens, seconds, memory

    def cells(self) -> list[dict[str, Any]]:
        """Accuracy per (method, distance)."""
        out = []
        for m in self.methods:
            for d in self.config.distances:
                rs = [r for r in self.items if r.method == m and r.distance == d]
                if rs:
                    out.append({"method": m, "distance": d, "items": len(rs), "correct": sum(r.correct for r in rs),
                                "accuracy": sum(r.correct for r in rs) / len(rs)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": "retention", "config": asdict(self.config),
                "set": eval_set(self.config.eval_set).describe(wording=False), "methods": self.methods,
                "cells": self.cells(), "items": [asdict(r) for r in self.items], "reading": self.reading}


@dataclass
class _Stream:
    """One trial's tokens: [head; facts; filler], where the filler starts and each distance's checkpoint."""

    ids: torch.Tensor
    facts: list[Fact]
    filler_start: int


def make_stream(tokenizer, filler: Filler, facts: list[Fact], length: int, rng: random.Random,
                head: list[int]) -> _Stream:
    """The facts as one paragraph after the frame's head, then `length` tokens of book from a random offset."""
    fact_ids = tokenizer(" ".join(f.sentence for f in facts) + "\n\n", add_special_tokens=False)["input_ids"]
    hay, _ = filler.take(rng.randrange(len(filler.ids)), length)
    ids = torch.cat((torch.tensor(head + fact_ids, dtype=torch.long), hay))
    return _Stream(ids, facts, len(head) + len(fact_ids))


def checkpoints(stream: _Stream, distances: Sequence[int], segment: int) -> list[int]:
    """Stream length at each distance, rounded up to a segment boundary of the stream (never past its end)."""
    ends = []
    for d in distances:
        end = stream.filler_start + d
        ends.append(min(-(-end // segment) * segment, len(stream.ids)))
    return ends


def retention(backbone: Backbone, methods: Sequence[str], filler_path: str, config: RetentionConfig, *,
              options: dict[str, dict[str, Any]] | None = None, allow_untrained: bool = False,
              on_item: Callable[[RetentionItem], None] | None = None) -> RetentionReport:
    """Every method reads the same streams and answers the same questions at every distance."""
    from ..run import prepare_run

    eval_set(config.eval_set).check_filler(filler_path)
    tok = backbone.tokenizer
    frame = qa_frame(tok, None, config.instruction)
    head = tok(frame.head, add_special_tokens=not frame.chat)["input_ids"]
    filler = Filler.from_file(filler_path, tok)
    rng = random.Random(config.seed)
    report = RetentionReport(config)
    stops = stop_ids(tok, backbone.model)
    for trial in range(config.trials):
        facts, _ = make_facts(rng, config.facts)
        stream = make_stream(tok, filler, facts, config.distances[-1], rng, head)
        for name in methods:
            _, spec, _ = prepare_run(name, backbone=backbone, options=(options or {}).get(name),
                                     allow_untrained=allow_untrained)
            report.methods[name] = spec.method.describe()
            ask = _Asker(backbone, spec.method, frame, stops, config.max_new_tokens)
            report.reading.append(_read(spec.method, spec.segment, stream, config, ask, name, trial, report, on_item))
            release_memory()
    return report


@dataclass
class _Asker:
    backbone: Backbone
    method: Method
    frame: QAFrame
    stops: set[int]
    max_new_tokens: int

    def __call__(self, done: Ingested, question: str) -> str:
        """The greedy answer to `question` over a copy of `done` (the original memory is left as it was)."""
        tail = self.backbone.tokenizer(self.frame.tail(question), add_special_tokens=False)["input_ids"]
        q = extend(self.backbone, self.method, fork(self.method, done), torch.tensor(tail, dtype=torch.long))
        text, _ = continue_streamed(self.backbone, self.method, q, self.max_new_tokens, stop=self.stops,
                                    stop_text=self.frame.stops)
        return text.strip()


def _read(method: Method, segment: int, stream: _Stream, config: RetentionConfig, ask: _Asker, name: str,
          trial: int, report: RetentionReport, on_item: Callable[[RetentionItem], None] | None) -> dict[str, Any]:
    """Read the stream checkpoint by checkpoint, asking every question at each; returns the reading's cost."""
    done: Ingested | None = None
    read_s, at = 0.0, 0
    for distance, end in zip(config.distances, checkpoints(stream, config.distances, segment)):
        t0 = time.perf_counter()
        piece = stream.ids[at:end]
        if done is None:
            done = ingest(ask.backbone, method, plain_segments(piece, segment), segment=segment)
        elif len(piece):
            done = extend(ask.backbone, method, done, piece)
        read_s, at = read_s + time.perf_counter() - t0, end
        for fact in stream.facts:
            answer = ask(done, fact.question)
            item = RetentionItem(name, trial, distance, end - stream.filler_start, fact.kind, fact.question,
                                 fact.answer, answer, answered(answer, fact.answer))
            report.items.append(item)
            if on_item is not None:
                on_item(item)
    assert done is not None  # RetentionConfig refuses an empty list of distances
    return {"method": name, "trial": trial, "tokens": at, "read_seconds": read_s,
            "tokens_per_s": at / read_s if read_s else None, "memory_entries": method.memory_size(done.state)}


def retention_bench(filler_path: str, methods: Sequence[str], config: RetentionConfig, *, model: str | None = None,
                    dtype: str | None = None, device: str | None = None, threads: int | None = None,
                    options: dict[str, dict[str, Any]] | None = None, backbone: Backbone | None = None,
                    allow_untrained: bool = False,
                    on_item: Callable[[RetentionItem], None] | None = None) -> dict[str, Any]:
    """`longctx bench retention` as a library call: load the model, run every method, describe the run."""
    from .record import named_bench

    return named_bench(retention, filler_path, methods, config, model=model, dtype=dtype, device=device, threads=threads,
                       backbone=backbone, options=options, allow_untrained=allow_untrained, on_item=on_item)
