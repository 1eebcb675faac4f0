"""What a new user meets first: input refused before the model loads, runs that extend, the next-step line,
progress that says how long, printed commands that run as typed, results kept when a save fails."""

from __future__ import annotations

import errno
import io
import json
import sys

import pytest
from rich.console import Console
from tiny_tokenizers import sample_text
from typer.testing import CliRunner

import longctx.run as run_module
from longctx.cli import app, render
from longctx.invocation import command_line
from longctx.storage.snapshot import SnapshotStore
from longctx.stream import SegmentEvent

runner = CliRunner()


@pytest.fixture
def book(tmp_path) -> str:
    p = tmp_path / "book.txt"
    p.write_text(sample_text(3000), encoding="utf-8")
    return str(p)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: these refusals must come before it."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(run_module, "load_backbone", load)


def ppl(*args: str):
    return runner.invoke(app, ["ppl", *args])


@pytest.mark.parametrize("command", [["ppl"], ["ask", "--questions", "/dev/null"], ["generate"]])
def test_missing_or_empty_input_is_refused_before_the_model_loads(command, tmp_path, no_model):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    for path, needle in ((str(tmp_path / "nope.txt"), "input file not found"), (str(empty), "input is empty")):
        args = [command[0], path, *command[1:]]
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_model_path_that_does_not_exist_is_named(book, no_model):
    r = ppl(book, "--model", "/nonexistent/model")
    assert r.exit_code == 2 and "model directory not found: /nonexistent/model" in r.stderr, r.stderr
    assert "repo" not in r.stderr.lower()


def test_compare_with_an_empty_name_is_refused(book, no_model):
    r = ppl(book, "--compare", "xl,,window")
    assert r.exit_code == 2 and "has an empty method name" in r.stderr, r.stderr


def test_misspelled_method_gets_a_suggestion(book, model_dir):
    r = ppl(book, "--model", model_dir, "--method", "hmtt")
    assert r.exit_code == 2 and "did you mean 'hmt'?" in r.stderr, r.stderr


def test_max_tokens_takes_16k_and_refuses_words(book, no_model):
    from longctx.cli.perplexity import _max_tokens

    assert (_max_tokens("16k"), _max_tokens("300"), _max_tokens("ALL"), _max_tokens(None)) == (16384, 300, "all", None)
    r = ppl(book, "--max-tokens", "lots")
    assert r.exit_code == 2 and "--max-tokens: 'lots' is not a token count" in r.stderr, r.stderr


def test_unwritable_snapshot_directory_is_refused_before_the_run(book, model_dir, isolated_home):
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "snapshots").write_text("not a directory")  # fails for root too, unlike chmod
    r = ppl(book, "--model", model_dir, "--segment", "32", "--max-tokens", "64", "--save-memory", "m")
    assert r.exit_code == 2 and "cannot save snapshots under" in r.stderr and r.stdout == "", r.stderr
    assert "Traceback" not in r.stderr


def test_failed_final_save_keeps_the_result_and_exits_1(book, model_dir, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SnapshotStore, "_write_version", full_disk)
    r = ppl(book, "--model", model_dir, "--segment", "32", "--max-tokens", "64", "--save-memory", "m")
    assert r.exit_code == 1, r.stderr
    assert "PPL =" in r.stdout  # the result is printed
    assert "could not write snapshot 'm': the disk is full" in r.stderr and "result above is complete" in r.stderr
    assert "Traceback" not in r.stderr
    r = ppl(book, "--model", model_dir, "--segment", "32", "--max-tokens", "64", "--save-memory", "m", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["runs"][0]["save_error"].startswith("could not write")


def test_extend_a_finished_run_from_the_command_line(book, model_dir):
    base = ("--model", model_dir, "--segment", "32")
    assert ppl(book, *base, "--max-tokens", "64", "--save-memory", "m").exit_code == 0
    longer = ppl(book, *base, "--max-tokens", "128", "--json")
    extended = ppl(book, "--model", model_dir, "--resume", "m", "--max-tokens", "128", "--json")
    assert extended.exit_code == 0, extended.stderr
    a, b = json.loads(longer.stdout)["runs"][0], json.loads(extended.stdout)["runs"][0]
    assert (a["nll_sum"], a["tokens"], a["bytes"]) == (b["nll_sum"], b["tokens"], b["bytes"])
    whole = ppl(book, "--model", model_dir, "--resume", "m", "--max-tokens", "all", "--json")
    assert json.loads(whole.stdout)["runs"][0]["tokens"] > 128


def test_a_cut_run_prints_the_command_for_the_whole_document(book, model_dir, monkeypatch):
    monkeypatch.setattr(sys, "argv", [".venv/bin/longctx"])
    r = ppl(book, "--model", model_dir, "--segment", "32", "--max-tokens", "64", "--compare", "window,xl")
    assert r.exit_code == 0, r.stderr
    assert "next, the whole document (~" in r.stderr
    assert f".venv/bin/longctx ppl {book} --method xl --model {model_dir} --segment 32" in r.stderr
    quiet = ppl(book, "--model", model_dir, "--segment", "32", "--max-tokens", "64", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and "PPL =" in quiet.stdout


def test_printed_commands_use_the_way_longctx_was_started(monkeypatch):
    monkeypatch.setattr(sys, "argv", [".venv/bin/longctx", "ppl"])
    assert command_line("ppl", "my book.txt", "--resume", "s") == ".venv/bin/longctx ppl 'my book.txt' --resume s"
    monkeypatch.setattr(sys, "argv", ["/x/lib/python3/site-packages/longctx/__main__.py"])
    assert command_line("ppl", "b.txt").startswith("python -m longctx ppl")


def test_interrupt_message_does_not_stutter(book, model_dir, monkeypatch):
    from longctx.interrupts import GracefulInterrupt

    monkeypatch.setattr(GracefulInterrupt, "__call__", lambda self: True)
    r = ppl(book, "--model", model_dir, "--segment", "32")
    assert r.exit_code == 130 and "interrupted: stopped after 32 tokens" in r.stderr, r.stderr


def _event(tokens: int, byte_end: int) -> SegmentEvent:
    return SegmentEvent("xl", 0, tokens, tokens - 1, 1.0, 20.0, 1.0, byte_end, 10)


def test_plain_progress_counts_from_the_resume_point_with_times(monkeypatch):
    monkeypatch.setattr(render, "PLAIN_EVERY_S", 0.0)
    now = [0.0]
    monkeypatch.setattr(render.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    view = render.ProgressView(Console(file=out, width=200), total=None, unit="bytes")
    view.start_method("xl", "xl(...)", total=1000, unit="tokens", start=600)
    now[0] = 5.0
    view.update(_event(700, 5000))  # the first update: no rate yet (one segment is no rate)
    now[0] = 15.0
    view.update(_event(800, 6000))  # 100 tokens in 10 s; 200 left -> 20 s
    lines = out.getvalue().splitlines()
    assert "70.0%" in lines[1] and "— tok/s" in lines[1]
    assert "80.0%" in lines[2] and "10 tok/s" in lines[2] and "0:15 elapsed" in lines[2] and "~0:20 left" in lines[2]


def test_piped_tables_keep_long_names_whole(tiny_backbone, tmp_path):
    import longctx

    name = "ask-a-rather-long-document-name-for-a-snapshot-0123456789abcdef"
    p = tmp_path / "b.txt"
    p.write_text(sample_text(400), encoding="utf-8")
    longctx.perplexity(str(p), ["xl"], backbone=tiny_backbone, segment=16, max_tokens=32, save_memory=name)
    r = runner.invoke(app, ["memory", "ls"])
    assert r.exit_code == 0 and name in r.stdout and "…" not in r.stdout, r.stdout


def test_doctor_names_the_dtype_auto_picks_and_why(monkeypatch, isolated_home):
    import longctx.machine as machine

    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "fma"})
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["dtype_auto"]["cpu"] == "fp32" and "neither AMX nor AVX512-BF16" in info["dtype_auto"]["why"]
    assert info["machine"]["cpu_flags"] == ["avx2"]
    assert info["home"]["path"] == str(isolated_home) and info["home"]["free_gib"] > 0
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    text = runner.invoke(app, ["doctor"]).stdout
    assert "auto = bf16 on this CPU: the CPU has AVX512-BF16" in text and "GiB free" in text


def test_ask_says_which_memory_it_reused_and_how_old_it_is(book, model_dir):
    args = ["ask", book, "Who came?", "--model", model_dir, "--segment", "32", "--method", "xl",
            "--max-new-tokens", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "memory: read" in first.stderr, first.stderr
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.stderr
    line = next(x for x in again.stderr.splitlines() if x.startswith("memory: reused "))
    assert " s ago (loaded in " in line
