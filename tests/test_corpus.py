"""Many documents: per-file results, micro and macro averages, file lists, and the resumable run log."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny_tokenizers import sample_text
from typer.testing import CliRunner

import longctx
import longctx.run as run_module  # where every task loads its model
import longctx.tasks.corpus as corpus_module
from longctx.cli import app
from longctx.errors import InputError, UsageError
from longctx.storage.checkpoint import Interrupted
from longctx.tasks.corpus import perplexity_many, read_file_list

runner = CliRunner()
STABLE = ("ppl", "nll_sum", "nll_mean", "tokens", "bytes", "bits_per_byte", "segments", "token_sha256")


@pytest.fixture
def docs(tmp_path) -> list[str]:
    paths = []
    for i, size in enumerate((1200, 2000, 900)):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(sample_text(size, seed=i), encoding="utf-8")
        paths.append(str(p))
    return paths


def stable(files: list[dict]) -> list[dict]:
    """Per-file numbers that must not depend on timing."""
    return [{k: f[k] for k in ("path", "sha256", *STABLE)} for f in files]


def test_per_file_results_and_micro_macro_averages(tiny_backbone, docs):
    report = perplexity_many(docs, "window", backbone=tiny_backbone, segment=64)
    singles = [longctx.perplexity(p, ["window"], backbone=tiny_backbone, segment=64).runs[0].to_dict() for p in docs]
    files = report.to_dict()["files"]
    assert [f["path"] for f in files] == docs
    for f, one in zip(files, singles):
        assert {k: f[k] for k in STABLE} == {k: one[k] for k in STABLE}
    micro, macro = report.micro(), report.macro()
    nll, tokens = math.fsum(s["nll_sum"] for s in singles), sum(s["tokens"] for s in singles)
    assert micro["tokens"] == tokens and micro["nll_sum"] == nll
    assert micro["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-12)
    assert micro["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(s["bytes"] for s in singles))
    assert macro["ppl"] == pytest.approx(sum(s["ppl"] for s in singles) / 3, rel=1e-12)
    assert macro["nll_mean"] == pytest.approx(sum(s["nll_mean"] for s in singles) / 3, rel=1e-12)
    assert macro["files"] == 3


def test_cli_arguments_plus_file_list_json_and_table(model_dir, docs, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"# the rest of the corpus\n\n  {docs[1]}  \n#{docs[0]}\n{docs[2]}\n")
    args = ["ppl", docs[0], "--files", str(lst), "--model", model_dir, "--segment", "64"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schema_version"] == 1 and out["kind"] == "corpus"
    assert [f["path"] for f in out["files"]] == docs and out["micro"]["tokens"] == sum(f["tokens"] for f in out["files"])
    assert out["protocol"].startswith("xl(") and out["segment"] == 64 and out["log"] is None
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert "micro" in r.stdout and "macro" in r.stdout and "micro PPL = " in r.stdout and "| files = 3 |" in r.stdout
    assert "[2/3]" in r.stderr


def test_cli_jsonl_has_segment_and_file_events(model_dir, docs):
    r = runner.invoke(app, ["ppl", *docs[:2], "--model", model_dir, "--segment", "256", "--jsonl"])
    assert r.exit_code == 0, r.stderr
    events = [json.loads(x)["event"] for x in r.stdout.splitlines()]
    assert events.count("file") == 2 and events[-1] == "result" and "segment" in events


def test_file_list_rules(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("a.txt\n-\n")
    with pytest.raises(UsageError, match=r"line 2: '-' \(stdin\) cannot be listed"):
        read_file_list(str(lst))
    lst.write_text("# only comments\n\n")
    with pytest.raises(UsageError, match="lists no files"):
        read_file_list(str(lst))
    with pytest.raises(InputError, match="file list not found"):
        read_file_list(str(tmp_path / "nope.txt"))


def test_missing_and_unusable_documents_fail_before_any_work(model_dir, docs, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load when a document is missing")

    monkeypatch.setattr(run_module, "load_backbone", no_model)
    log = tmp_path / "run.jsonl"
    lst = tmp_path / "list.txt"
    lst.write_text(f"{docs[0]}\n{tmp_path / 'gone.txt'}\n{tmp_path}\n{docs[0]}\n")
    r = runner.invoke(app, ["ppl", "--files", str(lst), "--model", model_dir, "--run-log", str(log)])
    assert r.exit_code == 2, r.stdout
    assert "3 problem(s) with the 4 documents; nothing was scored" in r.stderr
    assert "gone.txt: not found" in r.stderr and "is a directory" in r.stderr and "listed twice" in r.stderr
    assert not log.exists() and r.stdout == ""


@pytest.mark.parametrize("args,needle", [
    (["-"], "'-' (stdin) can only be scored alone"),
    (["--compare", "window,xl"], "work on one document"),
    (["--save-memory", "x"], "work on one document"),
])
def test_single_document_features_refused_with_many(model_dir, docs, args, needle):
    r = runner.invoke(app, ["ppl", *docs[:2], "--model", model_dir, *args])
    assert r.exit_code == 2 and needle in r.stderr


def test_no_document_at_all_is_a_usage_error():
    r = runner.invoke(app, ["ppl"])
    assert r.exit_code == 2 and "give a document to score" in r.stderr


# -- the run log ---------------------------------------------------------------------------------------
def _interrupt_in_file(index: int, after_segments: int):
    """on_start/on_segment callbacks that raise KeyboardInterrupt part-way through document `index`."""
    state = {"file": -1, "segments": 0}

    def on_start(i, path):
        state["file"] = i

    def on_segment(ev):
        state["segments"] += state["file"] == index
        if state["file"] == index and state["segments"] >= after_segments:
            raise KeyboardInterrupt

    return on_start, on_segment


def test_interrupted_run_resumes_from_log_with_identical_totals(tiny_backbone, docs, tmp_path):
    log = str(tmp_path / "run.jsonl")
    whole = perplexity_many(docs, "xl", backbone=tiny_backbone, segment=32, options={"xl": {"memory": 64}})
    on_start, on_segment = _interrupt_in_file(1, after_segments=3)
    with pytest.raises(Interrupted, match="1 of 3 documents finished and are in run log"):
        perplexity_many(docs, "xl", backbone=tiny_backbone, segment=32, options={"xl": {"memory": 64}}, log=log,
                        on_start=on_start, on_segment=on_segment)
    assert len(Path(log).read_text().splitlines()) == 1
    scored = []
    resumed = perplexity_many(docs, "xl", backbone=tiny_backbone, segment=32, options={"xl": {"memory": 64}}, log=log,
                              on_start=lambda i, p: scored.append(i))
    assert scored == [1, 2] and [f.from_log for f in resumed.files] == [True, False, False]
    assert resumed.micro() == whole.micro() and resumed.macro() == whole.macro()
    assert stable(resumed.to_dict()["files"]) == stable(whole.to_dict()["files"])
    again = perplexity_many(docs, "xl", backbone=tiny_backbone, segment=32, options={"xl": {"memory": 64}}, log=log)
    assert all(f.from_log for f in again.files) and again.micro() == whole.micro()
    assert len(Path(log).read_text().splitlines()) == 3


def test_log_rescores_a_changed_file_and_refuses_another_setup(tiny_backbone, docs, tmp_path):
    log = str(tmp_path / "run.jsonl")
    perplexity_many(docs[:2], "window", backbone=tiny_backbone, segment=64, log=log)
    Path(docs[0]).write_text(sample_text(1300, seed=9), encoding="utf-8")  # same path, new content
    again = perplexity_many(docs[:2], "window", backbone=tiny_backbone, segment=64, log=log)
    assert [f.from_log for f in again.files] == [False, True]
    with pytest.raises(UsageError, match="different setup:\n  segment: log has 64, this run has 32"):
        perplexity_many(docs[:2], "window", backbone=tiny_backbone, segment=32, log=log)


def test_torn_last_log_line_is_rescored_and_garbage_refused(tiny_backbone, docs, tmp_path):
    log = tmp_path / "run.jsonl"
    perplexity_many(docs[:2], "window", backbone=tiny_backbone, segment=64, log=str(log))
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[1][:40])  # killed while appending the second line
    again = perplexity_many(docs[:2], "window", backbone=tiny_backbone, segment=64, log=str(log))
    assert [f.from_log for f in again.files] == [True, False]
    log.write_text("not json\n" + lines[0] + "\n")
    with pytest.raises(UsageError, match="line 1 is not JSON"):
        perplexity_many(docs[:2], "window", backbone=tiny_backbone, segment=64, log=str(log))


def test_cli_ctrl_c_then_same_command_continues(model_dir, docs, tmp_path, monkeypatch):
    log = tmp_path / "run.jsonl"
    args = ["ppl", *docs, "--model", model_dir, "--segment", "64", "--run-log", str(log), "--json"]
    real = corpus_module.perplexity
    calls = {"n": 0}

    def second_file_interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(corpus_module, "perplexity", second_file_interrupted)
    r = runner.invoke(app, args)
    assert r.exit_code == 130 and "Run the same command again to continue" in r.stderr and r.stdout == ""
    monkeypatch.undo()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert [f["from_log"] for f in json.loads(r.stdout)["files"]] == [True, False, False]
