"""The bench suite on a tiny model: every part runs every method on the same items, and the report says so."""

from __future__ import annotations

import json
import random

import pytest

from longctx.bench.report import suite_markdown
from longctx.bench.suite import REFERENCE, Suite, get_suite, leaders, paired_accuracy, run_suite
from longctx.errors import UsageError

TINY = Suite("tiny", segment=64, ppl_tokens=512, passkey_lengths=(600,), passkey_trials=2, needle_lengths=(600,),
             needles=1, retention_distances=(512,), babi_lengths=(512,), babi_samples=1, throughput_lengths=(128, 256),
             decode_tokens=2, max_new_tokens=3)
METHODS = ["xl", "window", "memorizing"]


@pytest.fixture
def book(tmp_path) -> str:
    rng = random.Random(2)
    words = ["the", "letter", "was", "written", "in", "haste", "and", "she", "read", "it", "twice"]
    text = " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "."
                    for _ in range(500))
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_every_part_runs_every_method_with_the_reference_first(tiny_backbone, book):
    result = run_suite(TINY, book, methods=METHODS, rag=False, backbone=tiny_backbone,
                       parts=["ppl", "passkey", "needle", "retention", "babi", "throughput"])
    data = json.loads(json.dumps(result.to_dict(), default=str))
    names = data["methods"]
    assert names[0] == REFERENCE and set(names) == {REFERENCE, *METHODS}
    ppl = data["parts"]["ppl"]
    assert [r["method"] for r in ppl["runs"]] == names
    assert len({r["token_sha256"] for r in ppl["runs"]}) == 1  # the same tokens for everyone
    assert [d["method"] for d in ppl["deltas"]] == names[1:] and all(d["reference"] == REFERENCE for d in ppl["deltas"])
    for part in ("passkey", "needle", "retention", "babi"):
        assert set(data["parts"][part]["methods"]) == set(names)
    retention = data["parts"]["retention"]["items"]
    assert {r["depth"] for r in retention if r["kind"] == "needle"} == {0.0}
    rows = data["parts"]["throughput"]["rows"]
    assert [(r["method"], r["prefill_tokens"]) for r in rows] == [(m, n) for n in (128, 256) for m in names]
    assert data["parts"]["throughput"]["machine"]["flops_per_s"] > 0
    assert data["record"]["suite"] == "tiny" and set(data["seconds"]) == {"ppl", "passkey", "needle", "retention",
                                                                           "babi", "throughput"}
    axes = {r["axis"] for r in data["leaders"]}
    assert "PPL (lower is better)" in axes and "passkey accuracy" in axes
    md = suite_markdown(data, "longctx bench --suite tiny")
    assert "### Leaders" in md and all(f"| {m} |" in md for m in names)


def test_paired_accuracy_pairs_the_same_items():
    items = [{"method": m, "length": 1, "trial": t, "question": "q", "depth": None, "correct": c}
             for m, t, c in [("a", 0, True), ("a", 1, True), ("a", 2, False), ("sinks", 0, False), ("sinks", 1, True),
                             ("sinks", 2, False)]]
    d = paired_accuracy(items, "a", "sinks")
    assert d["items"] == 3 and d["difference"] == pytest.approx(1 / 3)
    assert d["se"] == pytest.approx((((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2 / 3) ** 0.5)
    assert paired_accuracy(items, "missing", "sinks") is None


def test_leaders_pick_the_best_method_per_axis():
    parts = {"ppl": {"runs": [{"method": "sinks", "ppl": 20.0}, {"method": "xl", "ppl": 18.0}],
                     "deltas": [{"method": "xl", "delta_nll": -0.1, "delta_nll_se": 0.01, "ppl_ratio": 0.9}]}}
    [row] = leaders(parts, ["sinks", "xl"])
    assert row["leader"] == "xl" and row["reference"] == 20.0 and row["vs_reference"]["delta_nll"] == -0.1


def test_unknown_suite_and_part_are_usage_errors(tiny_backbone, book):
    with pytest.raises(UsageError):
        get_suite("huge")
    with pytest.raises(UsageError):
        run_suite(TINY, book, parts=["nope"], backbone=tiny_backbone)
