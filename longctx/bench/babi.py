"""BABILong-style qa1 ("single supporting fact"): bAbI-like movement facts spread through book filler.

The bAbI data is not shipped, so stories are generated here from bAbI's qa1 vocabulary: four people (Mary,
John, Daniel, Sandra) move between six places ("Mary moved to the bathroom.", "John went back to the
hallway."), and the question asks where one of them is; the answer is that person's last location. As in
BABILong, the facts keep their order and go between sentences of book text at random sentence ends, the
filler budget being the length less the facts' tokens. Every method (and `rag`) reads the same documents,
one `ask` per document per method. Scoring is BABILong's label-set metric: the first sentence of the answer
must name the expected place and no other of the six (chance is 1/6). Deterministic from the seed.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..model.backbone import Backbone
from ..resources import release_memory
from .needle import MethodCost, normalize
from .passkey import Filler

ACTORS = ["Mary", "John", "Daniel", "Sandra"]
LOCATIONS = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]  # qa1's label set
VERBS = ["moved to", "went to", "journeyed to", "travelled to", "went back to"]
CHANCE = 1 / len(LOCATIONS)

# A short form of BABILong's qa1 instruction ("... If a person was in different locations, use the latest").
QA1_INSTRUCTION = ("The document tells where people moved. Answer with the last location of the person asked about, "
                   "in one word.")


@dataclass(frozen=True)
class Story:
    """qa1 facts in order, the question, its answer, and the index of the fact that answers it."""

    facts: tuple[str, ...]
    actor: str
    question: str
    answer: str
    supporting: int


def make_story(rng: random.Random, facts: int) -> Story:
    """`facts` moves of random people to random places (never to where the mover already is); the question is
    about someone who moved, and the answer is where they moved last."""
    if facts < 1:
        raise UsageError(f"a qa1 story needs >= 1 fact (got {facts})")
    where: dict[str, str] = {}
    last: dict[str, int] = {}
    sentences = []
    for i in range(facts):
        actor = rng.choice(ACTORS)
        place = rng.choice([p for p in LOCATIONS if p != where.get(actor)])
        sentences.append(f"{actor} {rng.choice(VERBS)} the {place}.")
        where[actor], last[actor] = place, i
    actor = rng.choice(sorted(where))
    return Story(tuple(sentences), actor, f"Where is {actor}?", where[actor], last[actor])


def locations_named(text: str) -> set[str]:
    """The qa1 labels in the first sentence of `text` (BABILong: lower case, cut at the first '.', and at any
    echoed "question" or example tags), as whole words after `normalize`."""
    first = text.lower().split(".")[0]
    for stop in ("<context>", "<example>", "question"):
        first = first.split(stop)[0]
    return {w for w in normalize(first).split() if w in LOCATIONS}


def babi_correct(answer: str, expected: str, question: str = "") -> bool:
    """The label-set metric: `expected` is the only location named (labels that the question names are ignored)."""
    return locations_named(answer) - locations_named(question) == {expected}


@dataclass
class BabiDocument:
    """A story spread through book text: the text, and the token depth (0-1) where each fact starts."""

    text: str
    story: Story
    depths: list[float]
    tokens: int

    @property
    def question(self) -> str:
        return self.story.question

    @property
    def answer(self) -> str:
        return self.story.answer


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cuts(rng: random.Random, ends, n: int) -> list[int]:
    """`n` sorted insertion points after sentence ends, distinct while there are enough (BABILong samples
    sentence boundaries uniformly); token positions evenly spread when the filler has no sentence end."""
    after = [int(i) + 1 for i in ends.nonzero().flatten()]
    if not after:
        return [len(ends) * (i + 1) // (n + 1) for i in range(n)]
    return sorted(rng.sample(after, n) if len(after) >= n else rng.choices(after, k=n))


def make_document(tokenizer, filler: Filler, length: int, story: Story, rng: random.Random) -> BabiDocument:
    """About `length` tokens in all (the facts alone when they fill it): book text from a random offset with the
    story's facts, in order, each after a random sentence end."""
    sentences = [" " + f for f in story.facts]
    sizes = [_n_tokens(tokenizer, s) for s in sentences]
    hay, ends = filler.take(rng.randrange(len(filler.ids)), max(length - sum(sizes), 0))
    cuts = _cuts(rng, ends, len(sentences))
    pieces, prev = [], 0
    for cut, sentence in zip(cuts, sentences):
        pieces += [tokenizer.decode(hay[prev:cut].tolist()), sentence]
        prev = cut
    pieces.append(tokenizer.decode(hay[prev:].tolist()))
    text = "".join(pieces).lstrip()
    tokens = _n_tokens(tokenizer, text)
    starts = [cut + sum(sizes[:i]) for i, cut in enumerate(cuts)]  # token offsets, up to merges at the joins
    return BabiDocument(text, story, [min(s / tokens, 1.0) for s in starts], tokens)


@dataclass
class BabiConfig:
    lengths: Sequence[int]  # document tokens (0 = the facts alone, BABILong's "0k")
    samples: int = 4  # documents per length
    facts: int = 4  # moves per story
    seed: int = 0
    max_new_tokens: int = 24
    instruction: str | None = QA1_INSTRUCTION  # None = ask's default

    def __post_init__(self):
        if self.samples < 1 or self.facts < 1 or not self.lengths:
            raise UsageError("qa1 needs >= 1 sample, >= 1 fact and a length")
        if any(n < 0 for n in self.lengths) or len(set(self.lengths)) < len(self.lengths):
            raise UsageError("qa1 lengths must be >= 0 tokens, each named once")
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.instruction is not None and not self.instruction.strip():
            raise UsageError("the qa1 instruction is empty; give words or None for ask's default")


@dataclass
class BabiItem:
    method: str
    length: int
    trial: int  # the document's index within its length
    question: str
    expected: str
    answer: str
    named: list[str]  # the locations the answer's first sentence names
    correct: bool
    depth: float  # where the supporting fact starts (0-1 of the document's tokens)
    facts_after: int  # facts after the supporting one (other people's moves)


@dataclass
class BabiReport:
    config: BabiConfig
    methods: dict[str, str] = field(default_factory=dict)  # name -> protocol
    items: list[BabiItem] = field(default_factory=list)
    costs: list[MethodCost] = field(default_factory=list)

    def cells(self) -> list[dict[str, Any]]:
        """Accuracy per (method, length) beside chance, how many answers named no place, and the ingestion rate."""
        out = []
        for m in self.methods:
            for n in self.config.lengths:
                rs = [r for r in self.items if r.method == m and r.length == n]
                if not rs:
                    continue
                costs = [c for c in self.costs if c.method == m and c.length == n]
                tok, secs = sum(c.document_tokens for c in costs), sum(c.ingest_seconds for c in costs)
                correct = sum(r.correct for r in rs)
                out.append({"method": m, "length": n, "items": len(rs), "correct": correct,
                            "accuracy": correct / len(rs), "chance": CHANCE,
                            "no_location": sum(not r.named for r in rs),
                            "ingest_tokens_per_s": tok / secs if secs else None,
                            "first_token_s": sum(c.first_token_s for c in costs) / len(costs) if costs else None})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": "babi-qa1", "config": asdict(self.config), "methods": self.methods,
                "cells": self.cells(), "items": [asdict(r) for r in self.items],
                "costs": [asdict(c) for c in self.costs]}


def babi_qa(backbone: Backbone, methods: Sequence[str], filler_path: str, config: BabiConfig, *,
            options: dict[str, dict[str, Any]] | None = None, allow_untrained: bool = False,
            on_item: Callable[[BabiItem], None] | None = None) -> BabiReport:
    """Every method on the same qa1 documents, one question per document, each document read once per method."""
    from ..tasks.qa import ask

    filler = Filler.from_file(filler_path, backbone.tokenizer)
    rng = random.Random(config.seed)
    report = BabiReport(config)
    with tempfile.TemporaryDirectory(prefix="longctx-babi-") as tmp:
        for length in config.lengths:
            for trial in range(config.samples):
                doc = make_document(backbone.tokenizer, filler, length, make_story(rng, config.facts), rng)
                path = Path(tmp) / f"babi-{length}-{trial}.txt"
                path.write_text(doc.text, encoding="utf-8")
                for m in methods:
                    r = ask(str(path), [doc.question], method=m, backbone=backbone, options=(options or {}).get(m),
                            allow_untrained=allow_untrained, max_new_tokens=config.max_new_tokens,
                            instruction=config.instruction, reuse=False, save=False)
                    report.methods[m] = r.protocol
                    _score(report, m, length, trial, doc, r, on_item)
                    release_memory()
    return report


def _score(report: BabiReport, method: str, length: int, trial: int, doc: BabiDocument, r,
           on_item: Callable[[BabiItem], None] | None) -> None:
    a, story = r.answers[0], doc.story
    report.items.append(BabiItem(method, length, trial, story.question, story.answer, a.text,
                                 sorted(locations_named(a.text)), babi_correct(a.text, story.answer, story.question),
                                 doc.depths[story.supporting], len(story.facts) - 1 - story.supporting))
    if on_item is not None:
        on_item(report.items[-1])
    mem = r.memory
    report.costs.append(MethodCost(method, length, trial, mem.get("ingest_seconds", 0.0),
                                   mem.get("document_tokens", doc.tokens), a.first_token_s))


def babi_bench(filler_path: str, methods: Sequence[str], config: BabiConfig, *, model: str | None = None,
               dtype: str | None = None, device: str | None = None, threads: int | None = None,
               options: dict[str, dict[str, Any]] | None = None, backbone: Backbone | None = None,
               allow_untrained: bool = False, on_item: Callable[[BabiItem], None] | None = None) -> dict[str, Any]:
    """BABILong-style qa1 as a library call: load the model, run every method, describe the run."""
    from .record import named_bench

    return named_bench(babi_qa, filler_path, methods, config, model=model, dtype=dtype, device=device, threads=threads,
                       backbone=backbone, options=options, allow_untrained=allow_untrained, on_item=on_item)
