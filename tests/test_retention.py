"""Knowledge retention: one stream per method, questions at every distance over copies of the memory."""

from __future__ import annotations

import random

import pytest
import torch

from longctx.bench.needle import make_facts
from longctx.bench.passkey import Filler
from longctx.bench.retention import RetentionConfig, checkpoints, make_stream, retention
from longctx.errors import UsageError
from longctx.methods import get_method
from longctx.tasks.decode import extend, ingest, plain_segments


def _stream(tiny_backbone, synthetic_book, length=300):
    tok = tiny_backbone.tokenizer
    facts, _ = make_facts(random.Random(0), 2)
    return make_stream(tok, Filler.from_file(synthetic_book, tok), facts, length, random.Random(0), [5, 6, 7])


def test_stream_is_head_then_facts_then_filler_and_checkpoints_are_segment_boundaries(tiny_backbone, synthetic_book):
    s = _stream(tiny_backbone, synthetic_book)
    text = tiny_backbone.tokenizer.decode(s.ids[3 : s.filler_start].tolist())
    assert s.ids[:3].tolist() == [5, 6, 7] and all(f.sentence in text for f in s.facts)
    assert len(s.ids) == s.filler_start + 300
    ends = checkpoints(s, (10, 100, 300), 32)
    assert all(e % 32 == 0 or e == len(s.ids) for e in ends)
    assert all(e - s.filler_start >= d for e, d in zip(ends, (10, 100, 300)))  # never asked before the distance
    assert ends == sorted(ends) and ends[-1] == len(s.ids)


@pytest.mark.parametrize("name", ["xl", "hmt"])  # a key/value memory and a memory-token one (pending segments)
def test_reading_in_pieces_between_checkpoints_equals_one_straight_reading(tiny_backbone, synthetic_book, name):
    cls = get_method(name)
    opts = {"xl": {"memory": 40}, "hmt": {"sensory": 4, "cache": 3}}[name]
    m = cls(cls.Options.from_mapping(opts), tiny_backbone)
    s = _stream(tiny_backbone, synthetic_book, 200)
    a, b = checkpoints(s, (30, 200), 16)
    pieces = ingest(tiny_backbone, m, plain_segments(s.ids[:a], 16), segment=16)
    pieces = extend(tiny_backbone, m, pieces, s.ids[a:b])
    straight = ingest(tiny_backbone, m, plain_segments(s.ids[:b], 16), segment=16)
    assert pieces.tokens == straight.tokens and torch.equal(pieces.last_hidden, straight.last_hidden)
    for k, v in m.state_tensors(straight.state).items():
        assert torch.equal(m.state_tensors(pieces.state)[k], v), k


def test_every_method_answers_every_fact_at_every_distance_on_the_same_tokens(tiny_backbone, synthetic_book):
    config = RetentionConfig(distances=(200, 40), facts=2, max_new_tokens=3)
    options = {"xl": {"memory": 48}, "sinks": {"window": 48}}
    report = retention(tiny_backbone, ["xl", "sinks"], synthetic_book, config, options=options)
    assert config.distances == (40, 200)  # sorted
    for name in ("xl", "sinks"):
        items = [r for r in report.items if r.method == name]
        assert [(r.distance, r.fact) for r in items] == [(d, f) for d in (40, 200) for f in [i.fact for i in items[:2]]]
        assert all(r.filler_tokens >= r.distance for r in items)
    by = {n: [(r.distance, r.filler_tokens, r.question) for r in report.items if r.method == n] for n in ("xl", "sinks")}
    assert by["xl"] == by["sinks"]  # the same questions after the same tokens
    cells = report.to_dict()["cells"]
    assert {(c["method"], c["distance"]) for c in cells} == {(m, d) for m in ("xl", "sinks") for d in (40, 200)}
    assert all(c["items"] == 2 and 0 <= c["accuracy"] <= 1 for c in cells)
    assert [r["tokens"] for r in report.reading] == [report.reading[0]["tokens"]] * 2
    assert "memory=48" in report.methods["xl"]


def test_bad_configs_are_refused():
    with pytest.raises(UsageError):
        RetentionConfig(distances=())
    with pytest.raises(UsageError):
        RetentionConfig(facts=0)


def test_report_set_takes_its_own_seeds_and_refuses_the_tuning_novel(tiny_backbone, tmp_path):
    assert RetentionConfig().seed == 0 and RetentionConfig(eval_set="report").seed == 1000
    with pytest.raises(UsageError, match="not in the report set"):
        RetentionConfig(eval_set="report", seed=3)
    book = tmp_path / "austen_persuasion.txt"
    book.write_text("The tuning novel. " * 200)
    with pytest.raises(UsageError, match="another novel"):
        retention(tiny_backbone, ["sinks"], str(book), RetentionConfig(distances=(40,), eval_set="report"))
