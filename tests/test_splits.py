"""Tuning set vs report set of the retrieval benchmarks: seeds, key wording, filler, what the JSON records."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from test_passkey import filler_file  # noqa: F401  (fixture)
from test_retrieval import build
from typer.testing import CliRunner

from longctx.bench.needle import NeedleConfig, needle_bench
from longctx.bench.passkey import Filler, PasskeyConfig, make_trial, passkey, prompt_frame
from longctx.bench.splits import LANDMARK, REPORTED, SETS, eval_set
from longctx.cli import app
from longctx.errors import UsageError


def test_the_tuning_set_keeps_the_landmark_prompts_byte_for_byte(tiny_backbone):
    # every published tuning-set figure was measured with these exact strings; a change would silently
    # make them irreproducible
    assert LANDMARK.info_line(12345) == "\nThe pass key is 12345. Remember it. 12345 is the pass key.\n"
    head, tail = prompt_frame(tiny_backbone.tokenizer, chat=False)
    assert head.startswith("There is an important info hidden") and tail == "\nWhat is the pass key? The pass key is"
    assert PasskeyConfig(lengths=[300]).seed == 0 and NeedleConfig(lengths=[600]).seed == 0


def test_the_report_set_words_the_key_differently_and_asks_differently(tiny_backbone):
    assert REPORTED.info_line(7) != LANDMARK.info_line(7) and REPORTED.info_line(7).count("7") == 2
    assert prompt_frame(tiny_backbone.tokenizer, chat=False, wording=REPORTED)[1] == (
        "\nWhich number was the pass key? The pass key was")


@pytest.mark.parametrize("config", [PasskeyConfig, NeedleConfig])
def test_seeds_belong_to_one_set(config):
    lengths = [600]
    assert config(lengths=lengths, eval_set="report").seed == 1000
    assert config(lengths=lengths, eval_set="report", seed=4321).seed == 4321
    assert config(lengths=lengths, seed=999).seed == 999
    for bad in ({"eval_set": "report", "seed": 5}, {"seed": 1000}, {"eval_set": "test"}):
        with pytest.raises(UsageError):
            config(lengths=lengths, **bad)


def test_the_report_set_refuses_the_tuning_novel(tmp_path):
    tuning_novel = tmp_path / SETS["tuning"].novel
    tuning_novel.write_text("text", encoding="utf-8")
    SETS["tuning"].check_filler(str(tuning_novel))  # the tuning set reads it
    with pytest.raises(UsageError, match="another novel"):
        eval_set("report").check_filler(str(tuning_novel))


def test_report_prompts_carry_the_report_wording(tiny_backbone, filler_file):  # noqa: F811
    tok = tiny_backbone.tokenizer
    filler = Filler.from_file(filler_file, tok)
    frame = prompt_frame(tok, False, REPORTED)
    trial = make_trial(tok, filler, 600, 0.5, random.Random(1000), frame, REPORTED)
    line = tok.decode(trial.ids[trial.needle[0]:trial.needle[1]].tolist())
    assert "Here is the pass key" in line and line.count(str(trial.key)) == 2
    assert "Which number was the pass key" in tok.decode(trial.ids[-trial.question:].tolist())


def test_the_two_sets_give_different_prompts_and_the_report_records_its_set(tiny_backbone, filler_file):  # noqa: F811
    method = [build(tiny_backbone, "window")]
    runs = {name: passkey(tiny_backbone, method, filler_file, PasskeyConfig(
        lengths=[300], depths=(0.5,), trials=3, segment=64, max_new_tokens=2, eval_set=name)) for name in SETS}
    keys = {name: [r.key for r in report.results] for name, report in runs.items()}
    assert keys["tuning"] != keys["report"]  # other seeds: other keys and haystacks
    out = runs["report"].to_dict()
    assert out["config"]["eval_set"] == "report" and out["config"]["seed"] == 1000
    assert out["set"]["wording"] == "report" and out["set"]["info"] == REPORTED.info and out["set"]["seeds"][0] == 1000


def test_cli_passkey_set_is_selectable_and_recorded(model_dir, filler_file, tmp_path):  # noqa: F811
    book = tmp_path / "another_novel.txt"
    shutil.copy(filler_file, book)
    common = ["bench", "passkey", str(book), "--model", model_dir, "-m", "window", "--lengths", "300", "--trials", "1",
              "--segment", "64", "--dtype", "fp32", "--max-new-tokens", "2"]
    res = CliRunner().invoke(app, [*common, "--set", "report", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["set"]["name"] == "report" and out["config"]["seed"] == 1000
    assert out["environment"]["command"]  # the run record names its command (CliRunner leaves sys.argv as it is)
    res = CliRunner().invoke(app, [*common, "--set", "report", "--seed", "3"])
    assert res.exit_code == 2 and "not in the report set" in res.output


def test_needle_report_set_draws_other_facts_and_records_the_set(tiny_backbone, synthetic_book):
    def facts(name: str) -> tuple[dict, list[str]]:
        out = needle_bench(synthetic_book, ["xl"], NeedleConfig(lengths=[600], trials=1, needles=1, max_new_tokens=2,
                                                                eval_set=name),
                           backbone=tiny_backbone, options={"xl": {"memory": 64}})
        return out, [item["question"] for item in out["items"]]

    report, report_questions = facts("report")
    _, tuning_questions = facts("tuning")
    assert report["set"] == {"name": "report", "seeds": [1000, 2**31 - 1], "novel": SETS["report"].novel}
    assert report["config"]["seed"] == 1000 and report_questions != tuning_questions
