"""The passkey benchmark's plumbing on a tiny random model: prompts, placement, scoring, diagnostics, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_retrieval import build
from tiny_tokenizers import sample_text
from typer.testing import CliRunner

from longctx.bench.passkey import (
    Filler,
    PasskeyConfig,
    RagReader,
    TrialResult,
    first_integer,
    make_trial,
    passkey,
    retrieval_hits,
    where_held,
)
from longctx.cli import app
from longctx.tasks.decode import ingest, plain_segments
from longctx.tasks.qa import RagOptions
from longctx.tasks.rag import Embedder


@pytest.fixture
def filler_file(tmp_path):
    p = tmp_path / "filler.txt"
    words = sample_text(20_000, seed=3).replace("\r", " ")
    p.write_text(" ".join(f"{w}." if i % 9 == 8 else w for i, w in enumerate(words.split(" "))), encoding="utf-8")
    return str(p)


def test_trials_are_deterministic_exact_length_and_place_the_line_at_a_sentence_start(tiny_backbone, filler_file):
    tok = tiny_backbone.tokenizer
    filler = Filler.from_file(filler_file, tok)
    a = make_trial(tok, filler, 600, 0.5, random.Random(5))
    b = make_trial(tok, filler, 600, 0.5, random.Random(5))
    assert torch.equal(a.ids, b.ids) and a.key == b.key and len(a.ids) <= 600
    start, end = a.needle
    assert str(a.key) in tok.decode(a.ids[start:end].tolist())
    assert bool(filler.sentence_end[filler.ids == a.ids[start - 1]].any())  # the token before ends a sentence
    assert start / len(a.ids) < 0.55


def test_where_held_and_retrieval_hits_follow_the_memory(tiny_backbone):
    m = build(tiny_backbone, "memorizing", window=16, sinks=2, memory=64, topk=4, layers="all")
    ids = torch.randint(3, 400, (96,), generator=torch.Generator().manual_seed(0))
    done = ingest(tiny_backbone, m, plain_segments(ids, 16))
    assert where_held(m, done.state, (90, 94)) == "window"
    assert where_held(m, done.state, (30, 34)) == "store"
    assert where_held(m, done.state, (1, 4)) == "partly"  # sink 1 held; 2-3 fell out of the 64-entry store
    xl = build(tiny_backbone, "xl", memory=16, sinks=0)
    assert where_held(xl, ingest(tiny_backbone, xl, plain_segments(ids, 16)).state, (30, 34)) == "gone"
    hits = retrieval_hits(done.last_plan.out.retrieved, (0, 96))
    assert hits == 1.0 and retrieval_hits({}, (0, 1)) is None


def test_failures_are_classified():
    r = lambda **k: TrialResult(**{"method": "m", "length": 1, "depth": 0.5, "key": 1, "answer": "", "correct": False,  # noqa: E731
                                   "held": "store", "retrieved": 0.0, "seconds": 0.0, **k})
    assert r(correct=True).failure is None
    assert r(held="gone").failure == "not held"
    assert r().failure == "not retrieved"
    assert r(retrieved=0.5).failure == "copy error" and r(held="window", retrieved=None).failure == "copy error"
    assert first_integer("is 12345. Remember") == "12345" and first_integer("none") == ""


def test_every_method_answers_the_same_prompts(tiny_backbone, filler_file):
    methods = [build(tiny_backbone, "memorizing", window=64, memory=512, topk=4), build(tiny_backbone, "window")]
    cfg = PasskeyConfig(lengths=[300, 400], depths=(0.2, 0.8), trials=3, segment=64, max_new_tokens=3)
    report = passkey(tiny_backbone, methods, filler_file, cfg)
    assert len(report.results) == 2 * 2 * 3
    by_method = {name: [(r.length, r.depth, r.key) for r in report.results if r.method == name]
                 for name in ("memorizing", "window")}
    assert by_method["memorizing"] == by_method["window"]
    cells = report.cells()
    assert [(c["method"], c["length"], c["trials"]) for c in cells] == [
        ("memorizing", 300, 3), ("memorizing", 400, 3), ("window", 300, 3), ("window", 400, 3)]
    assert all(c["correct"] == sum(r.correct for r in report.results
                                   if r.method == c["method"] and r.length == c["length"]) for c in cells)


def test_cli_bench_passkey_json(model_dir, filler_file):
    res = CliRunner().invoke(app, ["bench", "passkey", filler_file, "--model", model_dir, "-m", "memorizing", "-m",
                                   "sinks", "--lengths", "300", "--trials", "2", "--segment", "64", "--json", "--dtype", "fp32",
                                   "-o", "memorizing.window=32", "-o", "sinks.window=32", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["benchmark"] == "passkey" and set(out["methods"]) == {"memorizing", "sinks"}
    assert len(out["trials"]) == 4 and out["model"]["dtype"] == "float32" and "torch" in out["environment"]


@pytest.mark.parametrize(("args", "message"), [(["--lengths", "1x"], "token count"),
                                               (["--depths", "a"], "fractions"), (["--trials", "0"], "trial")])
def test_cli_bench_passkey_bad_arguments(model_dir, filler_file, args, message):
    res = CliRunner().invoke(app, ["bench", "passkey", filler_file, "--model", model_dir, *args])
    assert res.exit_code == 2 and message in res.output


def test_labels_keep_two_configurations_of_one_method_apart(tiny_backbone, filler_file):
    methods = [build(tiny_backbone, "memorizing", window=64, memory=512, topk=4),
               build(tiny_backbone, "memorizing", window=64, memory=512, topk=2)]
    cfg = PasskeyConfig(lengths=[300], depths=(0.5,), trials=1, segment=64, max_new_tokens=2)
    report = passkey(tiny_backbone, methods, filler_file, cfg, labels=["top4", "top2"])
    assert list(report.methods) == ["top4", "top2"] and [r.method for r in report.results] == ["top4", "top2"]
    assert "topk=4" in report.methods["top4"] and report.methods["top2"].startswith("memorizing(")


def test_rag_answers_the_same_prompts_from_the_chunks_it_retrieves(tiny_backbone, filler_file, encoder_dir):
    """`rag` reads the task line, the retrieved chunks and the question: with every chunk retrieved the key is
    in its prompt ("retrieved"); with one chunk, retrieved says whether that chunk holds the key."""
    full = build(tiny_backbone, "full")
    every = RagReader(full, Embedder.load(encoder_dir), RagOptions(topk=1000, chunk_tokens=16))
    cfg = PasskeyConfig(lengths=[300], depths=(0.3, 0.7), trials=2, segment=64, max_new_tokens=2)
    report = passkey(tiny_backbone, [every, build(tiny_backbone, "window")], filler_file, cfg)
    rag = [r for r in report.results if r.method == "rag"]
    assert [(r.key, r.depth) for r in rag] == [(r.key, r.depth) for r in report.results if r.method == "window"]
    assert all(r.held == "store" and r.retrieved == 1.0 for r in rag)
    assert report.methods["rag"].startswith("rag(topk=1000, chunk_tokens=16, ") and "reader=full" in report.methods["rag"]
    one = RagReader(full, every.embedder, RagOptions(topk=1, chunk_tokens=16))
    trial = make_trial(tiny_backbone.tokenizer, Filler.from_file(filler_file, tiny_backbone.tokenizer), 300, 0.5,
                       random.Random(0))
    haystack = trial.ids[trial.head : len(trial.ids) - trial.question]
    context = one.context(tiny_backbone, haystack, "What is the pass key?")
    assert 0 < len(tiny_backbone.tokenizer(context, add_special_tokens=False)["input_ids"]) <= 24
    assert context in every.context(tiny_backbone, haystack, "What is the pass key?")


def test_cli_bench_passkey_rag(model_dir, filler_file, encoder_dir):
    res = CliRunner().invoke(app, ["bench", "passkey", filler_file, "--model", model_dir, "-m", "rag", "--lengths", "300",
                                   "--trials", "1", "--json", "--dtype", "fp32", "-o", f"rag.embedder={encoder_dir}",
                                   "-o", "rag.chunk_tokens=16", "-o", "rag.topk=2", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert list(out["methods"]) == ["rag"] and out["trials"][0]["held"] == "store"
    assert out["methods"]["rag"].startswith("rag(topk=2, chunk_tokens=16")
