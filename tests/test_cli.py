"""The CLI end to end on a tiny model saved to a directory: exit codes, stdout/stderr split, JSON."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from tiny_tokenizers import sample_text
from typer.testing import CliRunner

from longctx.cli import app

runner = CliRunner()


@pytest.fixture
def book(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text(sample_text(6000), encoding="utf-8")
    return str(p)


def ppl(*args, input=None):
    return runner.invoke(app, ["ppl", *args], input=input)


def test_ppl_table_on_stdout_progress_on_stderr(model_dir, book):
    r = ppl(book, "--model", model_dir, "--segment", "64", "--max-tokens", "300")
    assert r.exit_code == 0, r.stderr
    assert "PPL =" in r.stdout and "method = xl(" in r.stdout and "tokens = 299" in r.stdout
    assert "xl:" in r.stderr and "PPL =" not in r.stderr


def test_ppl_json_compare_same_tokens(model_dir, book):
    r = ppl(book, "--model", model_dir, "--compare", "window,sinks,xl,full", "--segment", "32",
            "--max-tokens", "200", "--json", "-o", "sinks.window=40", "-o", "xl.memory=48")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schema_version"] == 1
    runs = {x["method"]: x for x in out["runs"]}
    assert list(runs) == ["window", "sinks", "xl", "full"]
    assert len({x["token_sha256"] for x in out["runs"]}) == 1
    assert all(x["tokens"] == 199 for x in out["runs"])
    assert runs["sinks"]["protocol"] == "sinks(sinks=4, window=40, positions=relative)"
    assert [d["method"] for d in out["deltas"]] == ["sinks", "xl", "full"]
    assert out["settings_origin"]["segment"] == "flag"
    assert runs["xl"]["unimem"]["management"].startswith("FIFO of 48 tokens")


def test_ppl_refuses_to_compare_a_non_causal_method_with_causal_ones(model_dir, book):
    common = ("--model", model_dir, "--segment", "32", "--max-tokens", "200", "--allow-untrained",
              "-o", "hmt.sensory=4", "-o", "hmt.summary=current")
    r = ppl(book, "--compare", "xl,hmt", *common)
    assert r.exit_code == 2 and "non-causal" in r.stderr and "not comparable" in r.stderr
    alone = ppl(book, "-m", "hmt", "--json", *common)
    assert alone.exit_code == 0, alone.stderr
    run = json.loads(alone.stdout)["runs"][0]
    assert run["causal"] is False and "non-causal" in run["protocol"]
    causal = ppl(book, "-m", "hmt", "--json", *common[:-2])
    assert json.loads(causal.stdout)["runs"][0]["causal"] is True


def test_ppl_jsonl_events_then_result(model_dir, book):
    r = ppl(book, "--model", model_dir, "--segment", "50", "--max-tokens", "160", "--jsonl", "-m", "window")
    assert r.exit_code == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["event"] for x in lines] == ["segment"] * 4 + ["result"]
    assert lines[-2]["tokens"] == 160 and lines[-1]["runs"][0]["tokens"] == 159


def test_ppl_reads_stdin(model_dir):
    r = ppl("-", "--model", model_dir, "--segment", "64", "--compare", "window,xl", "--json",
            input=sample_text(3000))
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["source"]["path"] == "<stdin>" and len(out["runs"]) == 2


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"\x00\x01binary\x00", "binary"),
    (b"good text then \xff bad", "byte 15"),
])
def test_bad_input_exits_2_without_traceback(model_dir, tmp_path, content, needle):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    r = ppl(str(p), "--model", model_dir)
    assert r.exit_code == 2
    assert needle in r.stderr and "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("args,needle", [
    (["--method", "nosuch"], "unknown method or preset 'nosuch'"),
    (["-o", "xl.bogus=1"], "unknown xl option key(s) bogus"),
    (["-o", "xl.memory=lots"], "must be int"),
    (["-o", "sinks.window=0", "-m", "sinks"], "option 'window' must be >= 1"),
    (["--dtype", "fp8"], "unknown dtype"),
    (["--max-tokens", "1"], "--max-tokens must be >= 2"),
    (["-o", "xl.memory=9000"], "past the model's trained 8192"),
])
def test_usage_errors_exit_2(model_dir, book, args, needle):
    r = ppl(book, "--model", model_dir, *args)
    assert r.exit_code == 2, r.stdout
    assert needle in r.stderr


def test_missing_file_and_directory(model_dir, tmp_path):
    assert ppl(str(tmp_path / "nope.txt"), "--model", model_dir).exit_code == 2
    r = ppl(str(tmp_path), "--model", model_dir)
    assert r.exit_code == 2 and "directory" in r.stderr


def test_model_dir_without_tokenizer(tmp_path, book):
    tiny_model().save_pretrained(tmp_path / "m")
    r = ppl(book, "--model", str(tmp_path / "m"))
    assert r.exit_code == 2 and "no tokenizer" in r.stderr


def test_env_and_user_config_precedence(model_dir, book, isolated_home, monkeypatch):
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.yaml").write_text("segment: 48\n")
    r = ppl(book, "--model", model_dir, "--max-tokens", "100", "--json")
    assert json.loads(r.stdout)["runs"][0]["segment"] == 48
    monkeypatch.setenv("LONGCTX_SEGMENT", "40")
    out = json.loads(ppl(book, "--model", model_dir, "--max-tokens", "100", "--json").stdout)
    assert out["runs"][0]["segment"] == 40 and out["settings_origin"]["segment"] == "env"


def test_presets_list_and_show():
    r = runner.invoke(app, ["presets", "list"])
    assert r.exit_code == 0 and all(n in r.stdout for n in ("full", "window", "sinks", "xl"))
    r = runner.invoke(app, ["presets", "show", "xl"])
    assert r.exit_code == 0 and "format: 1" in r.stdout and "# " in r.stdout
    assert runner.invoke(app, ["presets", "show", "nope"]).exit_code == 2


def test_methods_and_help():
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and "sinks" in r.stdout
    for args in (["--help"], ["ppl", "--help"], ["presets", "--help"]):
        assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, ["--version"]).stdout.startswith("longctx ")


def test_overrides_reach_user_presets_by_name(model_dir, book, isolated_home):
    (isolated_home / "presets").mkdir(parents=True, exist_ok=True)
    (isolated_home / "presets" / "xl-small.yaml").write_text("format: 1\nmethod: xl\nsegment: 32\noptions: {memory: 40}\n")
    for opt in ("memory=24", "xl-small.memory=24", "xl.memory=24"):
        r = ppl(book, "--model", model_dir, "-m", "xl-small", "-o", opt, "--max-tokens", "100", "--json")
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["runs"][0]["protocol"].startswith("xl(memory=24,")


@pytest.mark.parametrize("setting", [["--segment", "0"], ["--threads", "0"]])
def test_non_positive_settings_are_usage_errors(model_dir, book, setting):
    r = ppl(book, "--model", model_dir, *setting)
    assert r.exit_code == 2 and "must be >= 1" in r.stderr


def test_protocol_hash_covers_exactly_the_scored_prefix(model_dir, book):
    import hashlib

    out = json.loads(ppl(book, "--model", model_dir, "--max-tokens", "50", "--json").stdout)
    src = out["source"]
    data = open(book, "rb").read()
    assert src["bytes_hashed"] == src["end_byte"] < len(data)
    assert src["sha256_prefix"] == hashlib.sha256(data[: src["end_byte"]]).hexdigest()


def test_cli_reference_is_current():
    """docs/cli.md is generated from --help; regenerate with `python scripts/gen_cli_docs.py`."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts/gen_cli_docs.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_cli_starts_without_torch():
    """--help, --version, `memory ls`, `presets list`, `methods`, `models` and `doctor` import neither torch nor
    transformers (the package face is lazy; `methods` reads the method catalog, not the classes)."""
    import subprocess
    import sys

    code = ("import sys\nfrom typer.testing import CliRunner\nfrom longctx.cli import app\n"
            "for args in (['--help'], ['--version'], ['memory', 'ls'], ['presets', 'list'], ['ppl', '--help'],\n"
            "             ['methods'], ['doctor'], ['models'], ['models', '--json'], ['models', 'install', '--help']):\n"
            "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_misspelled_method_gets_a_suggestion(tmp_path):
    doc = tmp_path / "d.txt"
    doc.write_text("some text", encoding="utf-8")
    r = runner.invoke(app, ["ppl", str(doc), "--method", "hmtt"])
    assert r.exit_code == 2 and "unknown method or preset 'hmtt' (did you mean 'hmt'?)" in r.stderr
