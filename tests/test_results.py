"""Every published figure has its result file, and every result file says how it was produced.

A result file's minimum run record (what makes a figure checkable and reproducible):
- the command that produced it: `command` at the top level, or in `record`, `environment` or `run_record`
  (`run_record` holds commands added after a run that did not store its own, with a note saying so);
- the model it measured: a `model` (or `record.model`) dict naming the model and its dtype, unless the
  benchmark loads no model at all (MODEL_FREE, each with its reason);
- the software it ran on: an `environment`, `environment_start` or `record` dict with the python and torch
  versions (the model-free benchmarks: python at the top level).
docs/benchmarks.md: every `## `/`### ` section holding a table names the command and a result file under
benchmarks/results/ that exists. README.md: every paragraph citing a measured figure names its result file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL_FREE = {"cli_startup": "times `longctx` commands starting up; no model is loaded",
              "pdf_extractors": "times PDF text extraction (pypdf, pdfminer.six); no model is loaded",
              "recall_curves": "splits training runs' step records (each run file has its own record); no model is loaded"}

RESULT_PATH = re.compile(r"benchmarks/results/[\w./-]+\.(?:json|md|png)")
# a command that produces results: a longctx command or a benchmark script (to_markdown.py only renders)
COMMAND = re.compile(r"longctx (?:ppl|bench|ask|train|generate)\b|benchmarks/(?!to_markdown)\w+\.py")
TABLE_RULE = re.compile(r"^\|(?: *:?-+:? *\|)+ *$", re.M)
# what a measured figure looks like in prose: an estimate with its error, a perplexity, bits per byte,
# a throughput or an accuracy count
FIGURE = re.compile(r"\d\s*±\s*\d|\bPPL \d|\d\s*(?:bits per byte|bits/byte|tok/s)|\b\d+/\d+ (?:correct|prompts|at)\b")


def result_files() -> list[Path]:
    return sorted(RESULTS.glob("*.json"))


def command_of(data: dict[str, Any]) -> Any:
    """The recorded command, wherever this file's writer put it (None when there is none)."""
    for holder in (data, data.get("record"), data.get("environment"), data.get("run_record")):
        if isinstance(holder, dict) and holder.get("command"):
            return holder["command"]
    return None


def model_of(data: dict[str, Any]) -> Any:
    record = data.get("record") if isinstance(data.get("record"), dict) else {}
    return data.get("model") or record.get("model")


def environment_of(data: dict[str, Any]) -> dict[str, Any] | None:
    """The first dict that records the python and torch versions."""
    for key in ("environment", "environment_start", "record"):
        env = data.get(key)
        if isinstance(env, dict) and env.get("python") and env.get("torch"):
            return env
    return None


def record_problems(data: Any) -> list[str]:
    """What a result file lacks of the minimum run record (empty: complete)."""
    if not isinstance(data, dict) or not data:
        return ["not a non-empty JSON object"]
    problems = [] if command_of(data) else ["no command"]
    if data.get("benchmark") in MODEL_FREE:
        return problems + ([] if data.get("python") else ["no python version"])
    model = model_of(data)
    if not (isinstance(model, dict) and model.get("model") and model.get("dtype")):
        problems.append("no model name and dtype")
    if environment_of(data) is None:
        problems.append("no environment (python and torch versions)")
    return problems


@pytest.mark.parametrize("path", result_files(), ids=lambda p: p.name)
def test_every_result_file_parses_and_carries_a_run_record(path):
    text = path.read_text(encoding="utf-8")
    assert text.strip(), f"{path.name} is empty"
    assert record_problems(json.loads(text)) == [], path.name


def test_the_record_check_rejects_what_lacks_a_record():
    complete = {"model": {"model": "m", "dtype": "bfloat16"}, "environment": {"python": "3", "torch": "2", "command": ["x"]}}
    assert record_problems(complete) == []
    assert record_problems({}) == ["not a non-empty JSON object"]
    assert record_problems({**complete, "environment": {"python": "3", "torch": "2"}}) == ["no command"]
    assert record_problems({"command": "x", "environment": complete["environment"]}) == ["no model name and dtype"]
    assert record_problems({"benchmark": "cli_startup", "command": "x"}) == ["no python version"]


def sections(markdown: str) -> list[tuple[str, str]]:
    """(heading, body) per `## ` or `### ` heading; deeper headings stay inside their section."""
    parts = re.split(r"^(#{2,3} .*)$", markdown, flags=re.M)
    return list(zip(parts[1::2], parts[2::2]))


def test_sections_split_at_second_and_third_level_headings_only():
    doc = "# T\n## A\na\n#### a1\nx\n### B\nb\n"
    assert sections(doc) == [("## A", "\na\n#### a1\nx\n"), ("### B", "\nb\n")]


def test_every_table_in_the_benchmarks_doc_names_its_command_and_result_file():
    missing = []
    for heading, body in sections((ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")):
        if not TABLE_RULE.search(body):
            continue
        paths = RESULT_PATH.findall(body)
        absent = [p for p in paths if not (ROOT / p).exists()]
        if not paths or absent or not COMMAND.search(body):
            missing.append((heading, "no result file" if not paths else absent or "no command"))
    assert missing == []


def test_every_result_file_the_docs_name_exists():
    text = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
    assert [p for p in sorted(set(RESULT_PATH.findall(text))) if not (ROOT / p).exists()] == []


def readme_paragraphs() -> list[str]:
    """README paragraphs outside code blocks (tables and lists count as paragraphs)."""
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def test_the_figure_pattern_tells_figures_from_metric_names():
    assert FIGURE.search("PPL 23.59 ± 0.27, 1.118 bits per byte") and FIGURE.search("at 489 tok/s")
    assert not FIGURE.search("reports PPL with ±, bits per byte and tok/s")


def test_every_figure_the_readme_cites_comes_with_its_result_file():
    cited = [p for p in readme_paragraphs() if FIGURE.search(p)]
    assert cited, "the README cites no measured figure: the pattern no longer matches its prose"
    assert [p[:80] for p in cited if not RESULT_PATH.search(p)] == []
