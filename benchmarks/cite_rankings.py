"""Which span `ask --cite` names first, under every ranking rule, on the same answers.

Each document is read once per method and its questions answered once (`ask(..., cite=True)`); every
answer's picks (`Answer.evidence`) are then ranked under each rule of `citations.RANKINGS`, and the item
records whether the rule's *first* citation overlaps the fact's sentence. So the rules differ only in
ranking, never in what the model read or answered. RAG answers are ranked by similarity (what `ask`
prints) and, for comparison, in document order (the order its prompt reads them).

Documents:
- needle documents (`longctx bench needle`'s: book filler, `--needles` facts at depths spread over 10-90 %,
  one question per fact plus one about an absent fact, all asked in one call);
- with `--hard` (tuning set only): the shapes an earlier ranking failed on. One-fact documents asked one
  question (a lone salient fact, which a question-independent probe also reads) and a repetitive market
  ledger with one fact among near-identical lines.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cite_rankings.py ../shared/data/austen_persuasion.txt \
        --set tuning --lengths 8192 --trials 3 --hard -m infllm-qa -m rag --threads 1 \
        --out benchmarks/results/cite_rankings_tuning_8k.json

Every item keeps its answer's picks (sparse), so a changed rule can be compared on the same answers without
the model: `--rerank RESULT.json --out NEW.json` ranks the saved picks under the current rules (the picks of
questions whose items were not saved, such as the absent fact's, are missing from the cross-question rule).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from longctx.bench.needle import Fact, answered, make_document, make_facts
from longctx.bench.passkey import Filler
from longctx.bench.record import bench_backbone, git_state, run_record
from longctx.bench.splits import eval_set
from longctx.tasks.citations import (
    RANKINGS,
    Citation,
    Evidence,
    RetrievalTally,
    rank_spans,
    rank_weights,
    retrieved_citations,
)
from longctx.tasks.qa import Answer, ask

RAG_RULES = ("similarity", "document order")
STALLS = ["fishmonger", "baker", "chandler", "cooper", "draper", "grocer", "saddler", "tanner", "vintner"]
GOODS = ["herrings", "loaves", "candles", "barrels", "bolts of cloth", "sacks of flour", "bridles", "hides"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]


@dataclass
class Document:
    """A document to ask about: its text, the facts it holds (one question each) and any extra questions."""

    name: str
    shape: str  # needle, one-fact or ledger
    text: str
    facts: list[Fact]
    extra_questions: list[str] = field(default_factory=list)  # asked too (the absent fact), not scored


@dataclass
class Item:
    """One answer about a fact, and whether each rule's first citation holds the fact's sentence."""

    document: str
    shape: str
    method: str
    question: str
    expected: str
    answer: str
    correct: bool
    first: dict[str, bool | None]  # rule -> first citation overlaps the fact (None: nothing cited)
    first_bytes: dict[str, list[int] | None]
    evidence: dict[str, Any] | None = None  # the picks, sparse (re-rank offline: `citations.rank_weights`)


def needle_documents(filler: Filler, tokenizer, length: int, trials: int, needles: int,
                     rng: random.Random) -> list[Document]:
    """The needle benchmark's documents, with its absent-fact question asked last."""
    docs = []
    for trial in range(trials):
        facts, absent = make_facts(rng, needles)
        doc = make_document(tokenizer, filler, length, facts, absent, rng)
        docs.append(Document(f"needle-{length}-{trial}", "needle", doc.text, doc.facts, [absent.question]))
    return docs


def hard_documents(filler: Filler, tokenizer, rng: random.Random, count: int = 2) -> list[Document]:
    """`count` one-fact documents of 3k tokens asked one question, and one market ledger."""
    docs = []
    for i in range(count):
        facts, absent = make_facts(rng, 1)
        doc = make_document(tokenizer, filler, 3072, facts, absent, rng)
        docs.append(Document(f"one-fact-3072-{i}", "one-fact", doc.text, doc.facts))
    docs.append(ledger_document(rng))
    return docs


def ledger_document(rng: random.Random, lines: int = 160) -> Document:
    """A repetitive market ledger (about 3k tokens): near-identical lines, one fact sentence among them."""
    fact = make_facts(rng, 1)[0][0]
    rows = [f"On {rng.choice(WEEKDAYS)} the {rng.choice(STALLS)} sold {rng.randint(2, 90)} {rng.choice(GOODS)} "
            f"for {rng.randint(1, 40)} shillings." for _ in range(lines)]
    rows.insert(rng.randrange(lines // 5, 4 * lines // 5), fact.sentence)
    return Document("ledger-0", "ledger", "MARKET LEDGER\n\n" + "\n".join(rows) + "\n", [fact])


def holds(c: Citation | None, data: bytes, sentence: str) -> bool | None:
    """The citation overlaps the sentence's bytes (None: no citation)."""
    if c is None:
        return None
    lo = data.index(sentence.encode("utf-8"))
    return c.byte_start < lo + len(sentence.encode("utf-8")) and c.byte_end > lo


def firsts(answer: Answer, answers: Sequence[Answer], method: str) -> dict[str, Citation | None]:
    """The first citation of the answer under every rule that applies to the method."""
    if method == "rag":
        by_place = sorted(answer.citations, key=lambda c: c.byte_start)
        return {"similarity": answer.citations[0] if answer.citations else None,
                "document order": by_place[0] if by_place else None}
    e = answer.evidence
    if e is None or e.tally.counts.sum() <= 0:
        return dict.fromkeys(RANKINGS)
    others = [a.evidence for a in answers if a.evidence is not None and a.evidence.tally.counts.sum() > 0]
    out: dict[str, Citation | None] = {}
    for rule in RANKINGS:
        cites = retrieved_citations(e, None, 1, rule=rule, others=others)
        out[rule] = cites[0] if cites else None
    return out


def run_document(doc: Document, method: str, backbone, tmp: Path, max_new_tokens: int) -> list[Item]:
    """Ask every question of the document in one call and score each fact's answer under every rule."""
    path = tmp / f"{doc.name}.txt"
    path.write_text(doc.text, encoding="utf-8")
    data = doc.text.encode("utf-8")
    report = ask(str(path), [f.question for f in doc.facts] + doc.extra_questions, method=method,
                 backbone=backbone, max_new_tokens=max_new_tokens, reuse=False, save=False, cite=True)
    items = []
    for fact, answer in zip(doc.facts, report.answers):
        cited = firsts(answer, report.answers, method)
        items.append(Item(doc.name, doc.shape, method, fact.question, fact.answer, answer.text,
                          answered(answer.text, fact.answer),
                          {r: holds(c, data, fact.sentence) for r, c in cited.items()},
                          {r: [c.byte_start, c.byte_end] if c else None for r, c in cited.items()},
                          sparse_evidence(answer, data, fact.sentence)))
    return items


def sparse_evidence(answer: Answer, data: bytes, sentence: str) -> dict[str, Any] | None:
    """The answer's picks, the probe's and the structural tokens as index lists, and the fact's tokens."""
    e = answer.evidence
    if e is None:
        return None
    first = e.tally.first
    starts = e.byte_start[first : e.tally.last]
    lo = data.index(sentence.encode("utf-8"))
    fact = ((starts >= lo) & (starts < lo + len(sentence.encode("utf-8")))).nonzero().flatten()

    def nz(t):
        if t is None:
            return None
        i = t.nonzero().flatten()
        return {"index": i.tolist(), "value": t[i].tolist()}
    return {"counts": nz(e.tally.counts), "baseline": nz(e.baseline.counts if e.baseline else None),
            "structural": e.structural.nonzero().flatten().tolist() if e.structural is not None else None,
            "fact_tokens": [int(fact.min()), int(fact.max()) + 1] if len(fact) else None, "tokens": len(starts)}


def summary(items: list[Item]) -> list[dict[str, Any]]:
    """Per method, shape (and all shapes) and rule: first citation holds the fact, over answered and all."""
    rows = []
    for method in sorted({i.method for i in items}):
        mine = [i for i in items if i.method == method]
        for shape in sorted({i.shape for i in mine}) + ["all"]:
            group = [i for i in mine if shape in ("all", i.shape)]
            for rule in group[0].first:
                right = [i for i in group if i.correct]
                rows.append({"method": method, "shape": shape, "rule": rule, "items": len(group),
                             "first": sum(bool(i.first[rule]) for i in group), "answered": len(right),
                             "answered_first": sum(bool(i.first[rule]) for i in right)})
    return rows


def saved_evidence(saved: dict[str, Any]) -> Evidence:
    """An `Evidence` rebuilt from an item's sparse picks (token indices count from the document's start)."""
    n = saved["tokens"]

    def tally(sparse: dict[str, list] | None) -> RetrievalTally | None:
        if sparse is None:
            return None
        t = RetrievalTally(0, n)
        t.counts[sparse["index"]] = torch.tensor(sparse["value"], dtype=torch.long)
        return t
    structural = None
    if saved["structural"] is not None:
        structural = torch.zeros(n, dtype=torch.bool)
        structural[saved["structural"]] = True
    counts = tally(saved["counts"])
    assert counts is not None
    return Evidence(counts, torch.arange(n + 1), n, tally(saved["baseline"]), structural)


def rerank(source: dict[str, Any]) -> list[Item]:
    """The source's items with every memory method's first citation ranked again from the saved picks
    (token spans against the fact's tokens); RAG items are kept as they were."""
    items = [Item(**{**i, "first": dict(i["first"]), "first_bytes": dict(i["first_bytes"])}) for i in source["items"]]
    groups: dict[tuple[str, str], list[Item]] = {}
    for item in items:
        if item.method != "rag" and item.evidence is not None and item.evidence["counts"] is not None:
            groups.setdefault((item.document, item.method), []).append(item)
    for group in groups.values():
        evidence = [saved_evidence(i.evidence) for i in group if i.evidence is not None]
        for item, e in zip(group, evidence):
            lo, hi = item.evidence["fact_tokens"] if item.evidence else (0, 0)
            item.first, item.first_bytes = {}, {}
            for rule in RANKINGS:
                spans = rank_spans(rank_weights(rule, e, evidence), 1)
                item.first[rule] = (spans[0][0] < hi and spans[0][1] > lo) if spans else None
                item.first_bytes[rule] = None  # token spans only: the document text is not saved
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("filler", nargs="?")
    ap.add_argument("--rerank", help="a result file of this script: rank its saved picks under the current rules")
    ap.add_argument("--set", default="tuning", choices=["tuning", "report"])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--needles", type=int, default=4)
    ap.add_argument("--hard", action="store_true", help="add one-fact documents and a ledger (tuning set only)")
    ap.add_argument("-m", "--method", action="append", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.rerank:
        source = json.loads(Path(args.rerank).read_text(encoding="utf-8"))
        items = rerank(source)
        record = {**source["record"], "command": list(sys.argv), "git": git_state(),
                  "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "reranked_from": {"file": args.rerank, "command": source["record"]["command"],
                                    "git": source["record"].get("git"), "timestamp_utc": source["record"].get("timestamp_utc")}}
        result = {**source, "summary": summary(items), "items": [asdict(i) for i in items], "record": record}
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
        return
    if not args.filler:
        ap.error("give the filler book (or --rerank RESULT.json)")
    split = eval_set(args.set)
    split.check_filler(args.filler)
    seed = split.seed(args.seed)
    if args.hard and args.set != "tuning":
        ap.error("--hard documents are tuning items")
    backbone = bench_backbone(threads=args.threads)
    filler, rng = Filler.from_file(args.filler, backbone.tokenizer), random.Random(seed)
    docs = [d for n in args.lengths for d in needle_documents(filler, backbone.tokenizer, n, args.trials,
                                                                args.needles, rng)]
    if args.hard:
        docs += hard_documents(filler, backbone.tokenizer, rng)
    items: list[Item] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="longctx-cite-") as tmp:
        for doc in docs:
            for method in args.method or ["infllm-qa"]:
                for item in run_document(doc, method, backbone, Path(tmp), args.max_new_tokens):
                    items.append(item)
                    print(json.dumps({k: v for k, v in asdict(item).items() if k not in ("first_bytes", "evidence")}),
                          flush=True)
    result = {"benchmark": "cite_rankings", "set": split.describe(wording=False), "seed": seed,
              "filler": args.filler, "lengths": args.lengths, "trials": args.trials, "needles": args.needles,
              "hard": args.hard, "methods": args.method or ["infllm-qa"], "max_new_tokens": args.max_new_tokens,
              "seconds": time.perf_counter() - t0, "summary": summary(items), "items": [asdict(i) for i in items],
              "record": run_record(backbone, seed=seed)}
    Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
