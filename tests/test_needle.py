"""Needle QA: deterministic facts, scoring rules, documents that hold exactly the facts they claim."""

from __future__ import annotations

import random

import pytest
import torch

from longctx.bench.needle import (
    NeedleConfig,
    answered,
    make_document,
    make_facts,
    needle_qa,
    normalize,
    says_absent,
)
from longctx.bench.passkey import Filler
from longctx.errors import UsageError


def test_facts_are_deterministic_distinct_and_the_absent_one_is_new():
    a, absent_a = make_facts(random.Random(5), 4)
    b, absent_b = make_facts(random.Random(5), 4)
    assert a == b and absent_a == absent_b
    subjects = [f.subject for f in a]
    assert len(set(subjects)) == 4 and absent_a.subject not in subjects
    assert all(f.answer in f.sentence and f.subject in f.question for f in a)
    assert make_facts(random.Random(6), 4)[0] != a


def test_normalized_match_and_absent_phrases():
    assert answered("It is kept inside the blue Teapot!", "teapot")
    assert answered("The horse is called Pickwick.", "Pickwick")
    assert not answered("The horse is called Pickwickian.", "Pickwick")  # whole words only
    assert normalize("The Music-Box, a gift") == "music box gift"
    assert answered("in a music box", "music box")
    assert says_absent("The document does not mention Lady Quill's horse.")
    assert says_absent("That is NOT in the document.")
    assert not says_absent("The horse is called Marigold.")


def test_document_holds_each_fact_once_at_a_sentence_start_in_depth_order(tiny_backbone, synthetic_book):
    tok = tiny_backbone.tokenizer
    filler = Filler.from_file(synthetic_book, tok)
    facts, absent = make_facts(random.Random(0), 3)
    doc = make_document(tok, filler, 1500, facts, absent, random.Random(0))
    assert sorted(f.sentence for f in doc.facts) == sorted(f.sentence for f in facts)
    positions = [doc.text.index(f.sentence) for f in doc.facts]
    assert positions == sorted(positions)  # doc.facts is in depth order, like doc.depths
    assert doc.depths == sorted(doc.depths) and 0.1 <= doc.depths[0] and doc.depths[-1] <= 0.9
    for f, p in zip(doc.facts, positions):
        assert doc.text.count(f.sentence) == 1
        assert doc.text[:p].rstrip().endswith(".")  # placed after a sentence end
    assert absent.sentence not in doc.text and absent.subject not in doc.text
    assert abs(doc.tokens - 1500) < 100


def test_needle_qa_runs_every_method_on_the_same_items(tiny_backbone, synthetic_book):
    config = NeedleConfig(lengths=[600], trials=2, needles=2, max_new_tokens=3)
    torch.manual_seed(0)
    report = needle_qa(tiny_backbone, ["xl", "sinks"], synthetic_book, config,
                       options={"xl": {"memory": 64}, "sinks": {"window": 64}})
    assert len(report.items) == 2 * 2 * (2 + 1)  # methods x documents x (facts + absent)
    by_method = {m: [(r.trial, r.question) for r in report.items if r.method == m] for m in ("xl", "sinks")}
    assert by_method["xl"] == by_method["sinks"]
    assert {r.kind for r in report.items} == {"needle", "absent"}
    cells = report.to_dict()["cells"]
    assert {(c["method"], c["kind"]) for c in cells} == {(m, k) for m in ("xl", "sinks") for k in ("needle", "absent")}
    assert all(c["items"] == (4 if c["kind"] == "needle" else 2) for c in cells)
    assert all(c["correct"] == sum(r.correct for r in report.items if r.method == c["method"] and r.kind == c["kind"])
               for c in cells)


def test_needle_config_refuses_nonsense():
    with pytest.raises(UsageError):
        NeedleConfig(lengths=[100])
    with pytest.raises(UsageError):
        NeedleConfig(lengths=[1024], needles=0)


def test_needle_bench_describes_the_run(tiny_backbone, synthetic_book):
    from longctx.bench.needle import needle_bench

    out = needle_bench(synthetic_book, ["xl"], NeedleConfig(lengths=[600], trials=1, needles=1, max_new_tokens=2),
                       backbone=tiny_backbone, options={"xl": {"memory": 64}})
    assert out["schema_version"] == 1 and out["benchmark"] == "needle" and out["model"]["model"] == "tiny-llama"
    assert out["filler"].endswith("book.txt") and "torch" in out["environment"] and len(out["items"]) == 2
    with pytest.raises(UsageError):
        needle_bench(synthetic_book, ["xl", "xl"], NeedleConfig(lengths=[600]), backbone=tiny_backbone)


def test_needle_items_say_whether_the_fact_was_retrieved(tiny_backbone, synthetic_book):
    config = NeedleConfig(lengths=[900], trials=1, needles=2, max_new_tokens=2)
    report = needle_qa(tiny_backbone, ["xl", "memorizing"], synthetic_book, config,
                       options={"xl": {"memory": 64}, "memorizing": {"memory": 1024, "window": 64, "topk": 4}})
    xl = [r for r in report.items if r.method == "xl" and r.kind == "needle"]
    mem = [r for r in report.items if r.method == "memorizing" and r.kind == "needle"]
    assert all(r.retrieved is None and r.failure is None for r in xl)  # reads by position: nothing to split
    assert all(isinstance(r.retrieved, bool) for r in mem)
    for r in mem:
        assert r.failure == (None if r.correct else ("read, not answered" if r.retrieved else "not retrieved"))
    cell = next(c for c in report.cells() if c["method"] == "memorizing" and c["kind"] == "needle")
    assert sum(cell["failures"].values()) == cell["items"] - cell["correct"]
    # the first citation holding the fact is a subset of any citation holding it
    assert all(r.cited_first is None for r in xl) and all(r.retrieved or not r.cited_first for r in mem)
    assert cell["cited_first"] == {"items": len(mem), "first": sum(bool(r.cited_first) for r in mem),
                                   "answered": sum(r.correct for r in mem),
                                   "answered_first": sum(bool(r.cited_first) and r.correct for r in mem)}
