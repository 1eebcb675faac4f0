"""Needle QA: sentence-level facts hidden in public-domain book filler, asked in natural words through `ask`.

Each document is book text of a given length with `needles` invented facts ("Captain Hollis keeps the key
to the boathouse inside a blue teapot.") at depths spread over 10-90 %, each starting a sentence. Every
method (and `rag`) reads the same document once and answers, each over its own copy of the memory:
- one question per fact ("Where does Captain Hollis keep the key to the boathouse?"), scored by normalized
  match: the answer, lower-cased with punctuation and articles removed, contains the expected words;
- one question about a fact of the same kind that is *not* in the document, scored correct when the answer
  says so ("not in the document", "does not mention", ...).
With one needle this is the single-needle task; with several, a multi-needle one whose other facts are
distractors. Names and values are drawn from fixed word lists, deterministic from the seed.
"""

from __future__ import annotations

import random
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..model.backbone import Backbone
from ..resources import release_memory
from .passkey import Filler
from .splits import eval_set

SURNAMES = ["Hollis", "Pemberton", "Ashcombe", "Thorne", "Wexley", "Marlowe", "Kestrel", "Ravensworth", "Dunmore",
            "Fairweather", "Blackwood", "Quill", "Harrowgate", "Penhallow", "Lockridge", "Treadwell"]
TITLES = ["Captain", "Doctor", "Colonel", "Mrs.", "Professor", "Lady", "Admiral", "Reverend"]
PLACES = ["Alderney", "Tresco", "Lundy", "Sark", "Skomer", "Rathlin", "Bardsey", "Iona", "Herm", "Staffa"]
THINGS = ["teapot", "birdcage", "hatbox", "violin case", "flowerpot", "music box", "tobacco tin", "sea chest"]
COLOURS = ["blue", "green", "yellow", "crimson", "silver", "orange"]
SPICES = ["cardamom", "nutmeg", "saffron", "cinnamon", "ginger", "cloves", "aniseed", "juniper"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
HORSES = ["Thunderbolt", "Marigold", "Bellerophon", "Pickwick", "Copperfield", "Nightingale", "Brambleberry"]
INSTRUMENTS = ["harp", "cello", "oboe", "flute", "bassoon", "harpsichord", "clarinet"]

ABSENT_PHRASES = ("not in the document", "not mentioned", "does not mention", "doesn't mention", "no mention",
                  "does not say", "doesn't say", "not stated", "does not state", "no information", "not specified",
                  "does not specify", "does not contain", "doesn't contain", "not provided", "unknown",
                  "i don't know", "i do not know", "cannot find", "can't find", "not given", "no answer")


@dataclass(frozen=True)
class Fact:
    """A sentence to hide, the question about it, and the words a correct answer contains."""

    kind: str
    subject: str  # the person or place it is about (distinct within a document)
    sentence: str
    question: str
    answer: str


def _person(rng: random.Random) -> str:
    return f"{rng.choice(TITLES)} {rng.choice(SURNAMES)}"


def _key(rng: random.Random) -> Fact:
    who, colour, thing = _person(rng), rng.choice(COLOURS), rng.choice(THINGS)
    return Fact("key", who, f"{who} keeps the key to the boathouse inside a {colour} {thing}.",
                f"Where does {who} keep the key to the boathouse?", thing)


def _spice(rng: random.Random) -> Fact:
    who, spice = _person(rng), rng.choice(SPICES)
    return Fact("spice", who, f"The secret ingredient in {who}'s famous pudding is {spice}.",
                f"What is the secret ingredient in {who}'s famous pudding?", spice)


def _ferry(rng: random.Random) -> Fact:
    place, day = rng.choice(PLACES), rng.choice(DAYS)
    return Fact("ferry", place, f"The ferry to {place} leaves only on {day} mornings.",
                f"On which day does the ferry to {place} leave?", day)


def _horse(rng: random.Random) -> Fact:
    who, horse = _person(rng), rng.choice(HORSES)
    return Fact("horse", who, f"{who}'s favourite horse is called {horse}.",
                f"What is the name of {who}'s favourite horse?", horse)


def _instrument(rng: random.Random) -> Fact:
    who, instrument = _person(rng), rng.choice(INSTRUMENTS)
    return Fact("instrument", who, f"Every evening {who} plays the {instrument} in the garden.",
                f"Which instrument does {who} play in the garden every evening?", instrument)


KINDS: list[Callable[[random.Random], Fact]] = [_key, _spice, _ferry, _horse, _instrument]


def make_facts(rng: random.Random, n: int) -> tuple[list[Fact], Fact]:
    """`n` facts of different kinds (cycling when n > kinds) about distinct subjects, and one more of a kind
    whose subject appears in none of them (the absent fact)."""
    facts: list[Fact] = []
    subjects: set[str] = set()
    kinds = rng.sample(KINDS, len(KINDS))
    while len(facts) < n + 1:
        fact = kinds[len(facts) % len(kinds)](rng)
        if fact.subject not in subjects:
            subjects.add(fact.subject)
            facts.append(fact)
    return facts[:n], facts[n]


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def answered(answer: str, expected: str) -> bool:
    """Normalized match: the expected words appear, in order, in the answer."""
    return f" {normalize(expected)} " in f" {normalize(answer)} "


def says_absent(answer: str) -> bool:
    """The answer says the document does not hold it."""
    text = " ".join(answer.lower().replace("\u2019", "'").split())
    return any(p in text for p in ABSENT_PHRASES)


@dataclass
class NeedleDocument:
    """A haystack with its facts: the text and the token depth of each fact."""

    text: str
    facts: list[Fact]
    absent: Fact
    depths: list[float]
    tokens: int


def make_document(tokenizer, filler: Filler, length: int, facts: list[Fact], absent: Fact,
                  rng: random.Random, depths: Sequence[float] | None = None) -> NeedleDocument:
    """About `length` tokens in all: book text from a random offset with the facts at depths spread over
    10-90 % (each at the nearest sentence end before its depth), or at the given `depths`, one per fact
    (retention: one fact at the start, the question `length` tokens later)."""
    fact_tokens = sum(len(tokenizer(" " + f.sentence, add_special_tokens=False)["input_ids"]) for f in facts)
    length = max(length - fact_tokens, 16)
    hay, ends = filler.take(rng.randrange(len(filler.ids)), length)
    if depths is None:
        depths = [0.1 + 0.8 * (i + 0.5) / len(facts) for i in range(len(facts))]
    elif len(depths) != len(facts):
        raise UsageError(f"{len(facts)} facts need {len(facts)} depths (got {len(depths)})")
    depths = sorted(depths)
    order = rng.sample(range(len(facts)), len(facts))  # which fact goes at which depth
    cuts = []
    for d in depths:
        before = ends[: int(d * length)].nonzero().flatten()
        cuts.append(int(before[-1]) + 1 if len(before) else int(d * length))
    pieces, prev = [], 0
    for cut, i in zip(cuts, order):
        pieces += [tokenizer.decode(hay[prev:cut].tolist()), " " + facts[i].sentence]
        prev = cut
    pieces.append(tokenizer.decode(hay[prev:].tolist()))
    text = "".join(pieces)
    placed = [facts[i] for i in order]
    return NeedleDocument(text, placed, absent, depths, len(tokenizer(text, add_special_tokens=False)["input_ids"]))


@dataclass
class NeedleConfig:
    lengths: Sequence[int]
    trials: int = 2  # documents per length
    needles: int = 4  # facts per document (1 = single needle)
    seed: int | None = None  # None: the set's first seed (0 tuning, 1000 report)
    max_new_tokens: int = 48
    instruction: str | None = None  # None = ask's default
    depths: Sequence[float] | None = None  # one per needle; None = spread over 10-90 %
    eval_set: str = "tuning"  # tuning or report (splits.py): which seeds may be used

    def __post_init__(self):
        if self.trials < 1 or self.needles < 1 or not self.lengths:
            raise UsageError("needle QA needs >= 1 trial, >= 1 needle and a length")
        if any(n < 512 for n in self.lengths):
            raise UsageError("needle QA lengths must be >= 512 tokens")
        if self.depths is not None and (len(self.depths) != self.needles or any(not 0 <= d <= 1 for d in self.depths)):
            raise UsageError("needle depths: one fraction in 0..1 per needle")
        self.seed = eval_set(self.eval_set).seed(self.seed)


@dataclass
class ItemResult:
    method: str
    length: int
    trial: int
    kind: str  # "needle" or "absent"
    fact: str
    depth: float | None
    question: str
    expected: str | None
    answer: str
    correct: bool
    # the fact's sentence was among the spans the answer's memory retrieved (`ask --cite`); None: nothing
    # was retrieved (position-reading methods, or an empty store), so misses cannot be split
    retrieved: bool | None = None
    # the answer's first (most relevant) citation overlaps the fact's sentence; None: nothing retrieved
    cited_first: bool | None = None

    @property
    def failure(self) -> str | None:
        """Why a wrong answer about a present fact was wrong: the fact was not retrieved, or it was and the
        model did not answer from it."""
        if self.correct or self.kind != "needle" or self.retrieved is None:
            return None
        return "read, not answered" if self.retrieved else "not retrieved"


@dataclass
class MethodCost:
    method: str
    length: int
    trial: int
    ingest_seconds: float
    document_tokens: int
    first_token_s: float  # question -> first answer token, mean over the document's questions
    decode_tokens: int = 0  # answer tokens after each answer's first, summed over the document's questions
    decode_seconds: float = 0.0  # the time they took (greedy decoding over the memory)


@dataclass
class NeedleReport:
    config: NeedleConfig
    methods: dict[str, str] = field(default_factory=dict)  # name -> protocol
    items: list[ItemResult] = field(default_factory=list)
    costs: list[MethodCost] = field(default_factory=list)

    def cells(self) -> list[dict[str, Any]]:
        """Accuracy per (method, length, kind), with the ingestion rate."""
        out = []
        for m in self.methods:
            for n in self.config.lengths:
                costs = [c for c in self.costs if c.method == m and c.length == n]
                for kind in ("needle", "absent"):
                    rs = [r for r in self.items if r.method == m and r.length == n and r.kind == kind]
                    if not rs:
                        continue
                    tok = sum(c.document_tokens for c in costs)
                    secs = sum(c.ingest_seconds for c in costs)
                    dec_tok, dec_s = sum(c.decode_tokens for c in costs), sum(c.decode_seconds for c in costs)
                    out.append({"method": m, "length": n, "kind": kind, "items": len(rs),
                                "correct": sum(r.correct for r in rs), "accuracy": sum(r.correct for r in rs) / len(rs),
                                "failures": _failures(rs), "cited_first": _cited_first(rs),
                                "ingest_tokens_per_s": tok / secs if secs else None,
                                "first_token_s": sum(c.first_token_s for c in costs) / len(costs) if costs else None,
                                "decode_tokens_per_s": dec_tok / dec_s if dec_s > 0 else None})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": "needle", "config": asdict(self.config),
                "set": eval_set(self.config.eval_set).describe(wording=False), "methods": self.methods,
                "cells": self.cells(),
                "items": [{**asdict(r), "failure": r.failure} for r in self.items],
                "costs": [asdict(c) for c in self.costs]}


def _cited_first(items: list[ItemResult]) -> dict[str, int] | None:
    """How many answers' first citation held the fact: of all items with citations and of those answered
    correctly (None: nothing was cited, e.g. the absent fact or a position-reading method)."""
    cited = [r for r in items if r.cited_first is not None]
    if not cited:
        return None
    right = [r for r in cited if r.correct]
    return {"items": len(cited), "first": sum(bool(r.cited_first) for r in cited),
            "answered": len(right), "answered_first": sum(bool(r.cited_first) for r in right)}


def _failures(items: list[ItemResult]) -> dict[str, int]:
    fails = [r.failure for r in items if r.failure]
    return {k: fails.count(k) for k in sorted(set(fails))}


def needle_qa(backbone: Backbone, methods: Sequence[str], filler_path: str, config: NeedleConfig, *,
              options: dict[str, dict[str, Any]] | None = None, allow_untrained: bool = False,
              on_item: Callable[[ItemResult], None] | None = None) -> NeedleReport:
    """Every method on the same documents and questions, each document read once per method."""
    from ..tasks.qa import ask

    eval_set(config.eval_set).check_filler(filler_path)
    filler = Filler.from_file(filler_path, backbone.tokenizer)
    rng = random.Random(config.seed)
    report = NeedleReport(config)
    with tempfile.TemporaryDirectory(prefix="longctx-needle-") as tmp:
        for length in config.lengths:
            for trial in range(config.trials):
                facts, absent = make_facts(rng, config.needles)
                doc = make_document(backbone.tokenizer, filler, length, facts, absent, rng, config.depths)
                path = Path(tmp) / f"needle-{length}-{trial}.txt"
                path.write_text(doc.text, encoding="utf-8")
                questions = [f.question for f in doc.facts] + [absent.question]
                for m in methods:
                    r = ask(str(path), questions, method=m, backbone=backbone, options=(options or {}).get(m),
                            allow_untrained=allow_untrained, max_new_tokens=config.max_new_tokens,
                            instruction=config.instruction, reuse=False, save=False, cite=True)
                    report.methods[m] = r.protocol
                    _score(report, m, length, trial, doc, r, on_item)
                    release_memory()
    return report


def _score(report: NeedleReport, method: str, length: int, trial: int, doc: NeedleDocument, r,
           on_item: Callable[[ItemResult], None] | None) -> None:
    data = doc.text.encode("utf-8")
    for fact, depth, a in zip(doc.facts, doc.depths, r.answers):
        report.items.append(ItemResult(method, length, trial, "needle", fact.kind, depth, fact.question, fact.answer,
                                       a.text, answered(a.text, fact.answer), _cited(a, data, fact.sentence),
                                       _cited(a, data, fact.sentence, first=True)))
        if on_item is not None:
            on_item(report.items[-1])
    last = r.answers[-1]
    report.items.append(ItemResult(method, length, trial, "absent", doc.absent.kind, None, doc.absent.question, None,
                                   last.text, says_absent(last.text)))
    if on_item is not None:
        on_item(report.items[-1])
    mem = r.memory
    report.costs.append(MethodCost(method, length, trial, mem.get("ingest_seconds", 0.0),
                                   mem.get("document_tokens", doc.tokens),
                                   sum(a.first_token_s for a in r.answers) / len(r.answers),
                                   sum(max(a.tokens - 1, 0) for a in r.answers),
                                   sum(a.seconds - a.first_token_s for a in r.answers if a.tokens > 1)))


def _cited(answer, data: bytes, sentence: str, *, first: bool = False) -> bool | None:
    """Whether a retrieved citation of the answer (with `first`, its first one) overlaps the fact's sentence
    (None: nothing retrieved)."""
    spans = [c for c in answer.citations if c.kind == "retrieved"][: 1 if first else None]
    if not spans:
        return None
    lo = data.index(sentence.encode("utf-8"))
    hi = lo + len(sentence.encode("utf-8"))
    return any(c.byte_start < hi and c.byte_end > lo for c in spans)


def needle_bench(filler_path: str, methods: Sequence[str], config: NeedleConfig, *, model: str | None = None,
                 dtype: str | None = None, device: str | None = None, threads: int | None = None,
                 options: dict[str, dict[str, Any]] | None = None, backbone: Backbone | None = None,
                 allow_untrained: bool = False, on_item: Callable[[ItemResult], None] | None = None) -> dict[str, Any]:
    """`longctx bench needle` as a library call: load the model, run every method, describe the run."""
    from .record import named_bench

    return named_bench(needle_qa, filler_path, methods, config, model=model, dtype=dtype, device=device, threads=threads,
                       backbone=backbone, options=options, allow_untrained=allow_untrained, on_item=on_item)
