"""BABILong-style qa1: deterministic stories, the label-set metric, documents that keep the facts in order."""

from __future__ import annotations

import random

import pytest
import torch

from longctx.bench.babi import (
    ACTORS,
    CHANCE,
    LOCATIONS,
    BabiConfig,
    babi_correct,
    babi_qa,
    locations_named,
    make_document,
    make_story,
)
from longctx.bench.passkey import Filler
from longctx.errors import UsageError


def _mover(sentence: str) -> tuple[str, str]:
    words = sentence.rstrip(".").split()
    return words[0], words[-1]


def test_stories_are_deterministic_from_the_seed():
    assert make_story(random.Random(3), 6) == make_story(random.Random(3), 6)
    assert make_story(random.Random(3), 6) != make_story(random.Random(4), 6)
    with pytest.raises(UsageError):
        make_story(random.Random(0), 0)


@pytest.mark.parametrize("seed", range(20))
def test_the_answer_is_the_last_place_of_someone_who_moved(seed):
    story = make_story(random.Random(seed), 1 + seed % 8)
    moves = [_mover(f) for f in story.facts]
    assert all(who in ACTORS and place in LOCATIONS for who, place in moves)
    assert story.question == f"Where is {story.actor}?"
    mine = [i for i, (who, _) in enumerate(moves) if who == story.actor]
    assert mine and story.supporting == mine[-1]  # the asked person moved; the last move supports the answer
    assert moves[story.supporting][1] == story.answer


def test_label_set_metric():
    assert babi_correct("kitchen", "kitchen")
    assert babi_correct("The KITCHEN!", "kitchen")
    assert babi_correct("Mary is in the kitchen.", "kitchen")
    assert babi_correct("The most recent location of 'Mary' is 'kitchen'. Before that, the garden.", "kitchen")
    assert not babi_correct("Mary is in the garden.", "kitchen")
    assert not babi_correct("the kitchen or the garden", "kitchen")  # several places named: wrong
    assert not babi_correct("She is not there.", "kitchen")
    assert not babi_correct("kitchens", "kitchen")  # whole words only
    assert not babi_correct("Question: where is the kitchen", "kitchen")  # an echoed question is cut
    assert locations_named("Office, then hallway") == {"office", "hallway"}
    assert babi_correct("garden and kitchen", "kitchen", question="Where was Mary before the garden?")


@pytest.mark.parametrize("length", [0, 600, 1500])
def test_documents_keep_the_facts_in_order_after_sentence_ends(tiny_backbone, length, synthetic_book):
    tok = tiny_backbone.tokenizer
    filler = Filler.from_file(synthetic_book, tok)
    stories = (make_story(random.Random(seed), 5) for seed in range(100))
    story = next(s for s in stories if len(set(s.facts)) == 5)  # counting each fact once needs distinct sentences
    doc = make_document(tok, filler, length, story, random.Random(0))
    positions = [doc.text.index(f) for f in story.facts]
    assert positions == sorted(positions) and all(doc.text.count(f) == 1 for f in story.facts)
    assert all(p == 0 or doc.text[:p].rstrip().endswith(".") for p in positions)
    assert doc.depths == sorted(doc.depths) and all(0 <= d <= 1 for d in doc.depths)
    assert doc.question == story.question and doc.answer == story.answer
    if length:
        assert abs(doc.tokens - length) < 40
    else:
        assert doc.text == " ".join(story.facts)  # length 0: the facts alone
    assert make_document(tok, filler, length, story, random.Random(0)) == doc


def test_babi_qa_runs_every_method_on_the_same_items(tiny_backbone, synthetic_book):
    config = BabiConfig(lengths=[0, 600], samples=2, facts=3, max_new_tokens=3)
    torch.manual_seed(0)
    seen = []
    report = babi_qa(tiny_backbone, ["xl", "sinks"], synthetic_book, config,
                     options={"xl": {"memory": 64}, "sinks": {"window": 64}}, on_item=seen.append)
    assert len(report.items) == len(seen) == 2 * 2 * 2  # methods x lengths x samples, one question each
    by_method = {m: [(r.length, r.trial, r.question, r.expected, r.depth) for r in report.items if r.method == m]
                 for m in ("xl", "sinks")}
    assert by_method["xl"] == by_method["sinks"]
    assert all(0 <= r.facts_after < 3 and r.correct == babi_correct(r.answer, r.expected) for r in report.items)
    cells = report.to_dict()["cells"]
    assert {(c["method"], c["length"]) for c in cells} == {(m, n) for m in ("xl", "sinks") for n in (0, 600)}
    for c in cells:
        rs = [r for r in report.items if r.method == c["method"] and r.length == c["length"]]
        assert c["items"] == 2 and c["correct"] == sum(r.correct for r in rs)
        assert c["accuracy"] == c["correct"] / 2 and c["chance"] == CHANCE == 1 / 6
        assert c["no_location"] == sum(not r.named for r in rs)
    assert len(report.costs) == 8 and set(report.methods) == {"xl", "sinks"}


def test_babi_config_refuses_nonsense():
    for bad in (dict(lengths=[]), dict(lengths=[-1]), dict(lengths=[512, 512]), dict(lengths=[512], samples=0),
                dict(lengths=[512], facts=0), dict(lengths=[512], max_new_tokens=0),
                dict(lengths=[512], instruction="  ")):
        with pytest.raises(UsageError):
            BabiConfig(**bad)
    assert BabiConfig(lengths=[0, 512], instruction=None).instruction is None
