"""Recall training data (tasks/facts.py): deterministic fact -> distractor -> question samples scoring only
the answer, their variety (answer types, several facts, two hops), LM mixing, and no template, phrase or
entity shared with the evaluation's (bench/needle.py, bench/splits.py); then the trainer learning a planted
recall at 4 segments with rmt and with memoryllm on tiny random models."""

from __future__ import annotations

import functools
import random
import re
from collections import Counter

import pytest
import torch
from conftest import tiny_config
from tiny_tokenizers import byte_bpe_tokenizer, sample_text
from transformers import LlamaForCausalLM

from longctx.bench import needle
from longctx.bench.splits import SETS
from longctx.errors import UsageError
from longctx.methods import get_method
from longctx.model.backbone import Backbone, ModelInfo
from longctx.tasks.facts import (
    ANSWER_TYPES,
    HOP,
    NAME_HEADS,
    NAME_MIDS,
    NAME_TAILS,
    PLACE_HEADS,
    PLACE_TAILS,
    RELATIONS,
    TEMPLATES,
    TRAIN_COLOURS,
    FactRecall,
    Mixed,
    answer_scores,
    make_fact_set,
)
from longctx.tasks.recall import RecallTask, recall_accuracy
from longctx.tasks.samples import TokenCorpus
from longctx.tasks.trainconfig import TrainConfig, parse_curriculum
from longctx.tasks.trainer import Trainer
from longctx.text.prompts import qa_frame

EVAL_LISTS = {"SURNAMES": needle.SURNAMES, "TITLES": needle.TITLES, "PLACES": needle.PLACES, "THINGS": needle.THINGS,
              "COLOURS": needle.COLOURS, "SPICES": needle.SPICES, "DAYS": needle.DAYS, "HORSES": needle.HORSES,
              "INSTRUMENTS": needle.INSTRUMENTS}
TRAIN_LISTS = {"TRAIN_COLOURS": TRAIN_COLOURS, "RELATIONS": RELATIONS, "NAME_HEADS": NAME_HEADS,
               "NAME_MIDS": NAME_MIDS, "NAME_TAILS": NAME_TAILS, "PLACE_HEADS": PLACE_HEADS, "PLACE_TAILS": PLACE_TAILS}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def source(frame_chat: bool = False) -> FactRecall:
    tok = byte_bpe_tokenizer()
    filler = torch.tensor(tok(sample_text(6000), add_special_tokens=False)["input_ids"])
    return FactRecall(tok, filler, qa_frame(tok, chat=frame_chat))


def eval_facts(trials: int = 300) -> list[needle.Fact]:
    """Every kind of evaluation fact, many times over (the seeds both sets use and more)."""
    out = []
    for seed in [*range(trials), *range(1000, 1000 + trials)]:
        facts, absent = needle.make_facts(random.Random(seed), 4)
        out += [*facts, absent]
    return out


def literal_chunks(template: str) -> list[str]:
    """The fixed words of a template between its slots, e.g. 'bought the parlour clock for'."""
    return [c.strip(" .?") for c in re.split(r"\{[a-z]+\}", template) if len(c.strip(" .?").split()) >= 3]


def test_samples_are_deterministic_and_score_only_the_answer():
    src = source()
    a, b = src.draw(4, 256, gen(5)), src.draw(4, 256, gen(5))
    assert all(torch.equal(x.ids, y.ids) and torch.equal(x.targets, y.targets) for x, y in zip(a, b))
    assert not torch.equal(torch.cat([s.ids for s in a]), torch.cat([s.ids for s in src.draw(4, 256, gen(6))]))
    ids, first, facts = src.sample(4, 256, gen(5))
    assert len(ids) == 4 * 256 + 1 and [len(s) for s in a] == [256] * 4
    answer = src.tokenizer(" " + facts.answer, add_special_tokens=False)["input_ids"]
    assert ids[first:].tolist() == answer
    scored = torch.cat([s.targets for s in a])
    assert scored[scored >= 0].tolist() == answer  # nothing but the answer's tokens
    text = src.tokenizer.decode(ids.tolist())
    assert text.index(facts.sentences[0]) < text.index(facts.question)  # fact first, question last
    assert all(s in text for s in facts.sentences)


def test_samples_follow_the_chat_frame_the_evaluation_asks_through():
    src = source(frame_chat=True)
    ids, first, facts = src.sample(2, 256, gen(1))
    text = src.tokenizer.decode(ids.tolist())
    assert text.startswith(src.frame.head) and text.endswith(src.frame.tail(facts.question) + facts.answer)


def test_variety_answer_types_several_facts_and_two_hops():
    sets = [make_fact_set(gen(s), 1 + s % 4, two_hop=0.25) for s in range(400)]
    assert Counter(f.answer_type for f in sets).keys() == set(ANSWER_TYPES)
    assert Counter(f.hops for f in sets)[2] > 50
    assert {len(f.sentences) for f in sets} >= {1, 2, 3, 4, 5}
    for f in sets:
        if f.hops == 2:  # the question names the asked person only through the relation
            assert any(f"the {r} of " in f.question for r in RELATIONS), f.question
        assert f.answer in " ".join(f.sentences)


def test_no_training_template_phrase_or_entity_is_an_evaluation_one():
    evals = eval_facts()
    eval_text = {f.sentence for f in evals} | {f.question for f in evals}
    wordings = [w for s in SETS.values() for w in (s.wording.info, s.wording.question, s.wording.prime)]
    for t in TEMPLATES:
        for chunk in literal_chunks(t.statement) + literal_chunks(t.question):
            assert not any(chunk in e for e in eval_text), (chunk, "is an evaluation phrase")
            assert not any(chunk.lower() in w.lower() for w in wordings)
    for chunk in literal_chunks(HOP):
        assert not any(chunk in e for e in eval_text)
    eval_words = {w.lower() for words in EVAL_LISTS.values() for entry in words for w in entry.split()}
    for name, words in TRAIN_LISTS.items():
        assert not eval_words & {w.lower() for w in words}, f"{name} shares an entity with the evaluation"
    generated = [make_fact_set(gen(s), 4, two_hop=0.5) for s in range(2000)]
    train_words = {w.lower().strip(".?,'") for f in generated for w in (" ".join(f.sentences) + " " + f.question).split()}
    entity_words = eval_words - {"mrs.", "lady"}  # titles are ordinary words; none appears anyway
    assert not entity_words & train_words, entity_words & train_words
    assert not {f.sentence for f in evals} & {s for f in generated for s in f.sentences}


def test_the_distractor_is_a_window_of_the_filler_it_was_given():
    """Training passes the training files as filler (docs/training.md trains on neither evaluation novel); the
    text after the facts is a window of that filler, nothing else."""
    src = source()
    ids, first, facts = src.sample(3, 256, gen(2))
    fill = src.filler.tolist()
    prefix = len(src.tokenizer(src.frame.head, add_special_tokens=True)["input_ids"]) + len(
        src.tokenizer(" ".join(facts.sentences) + "\n\n", add_special_tokens=False)["input_ids"])
    window = ids[prefix : prefix + 50].tolist()
    assert any(fill[i : i + 50] == window for i in range(len(fill) - 50))


def test_mixed_samples_keep_the_lm_share():
    src = source()
    corpus = TokenCorpus([src.filler], [{"path": "x"}])
    mix = Mixed(src, corpus, 0.25)
    draws = [mix.draw(2, 256, gen(s)) for s in range(200)]
    lm = sum(int((torch.cat([x.targets for x in d]) >= 0).sum()) > 100 for d in draws)
    assert 30 <= lm <= 70  # 50 expected; every LM sample scores all its targets, a fact sample its answer only


def test_recall_curves_split_the_steps_as_the_trainer_drew_them():
    """benchmarks/recall_curves.py says which steps were LM samples from (seed, step, lane) alone; it must agree
    with what the trainer's source really drew (an LM sample scores every target, a fact sample its answer)."""
    import importlib.util
    from pathlib import Path

    from longctx.tasks.trainer import sample_generator

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recall_curves.py"
    spec = importlib.util.spec_from_file_location("recall_curves", path)
    assert spec is not None and spec.loader is not None
    curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curves)
    src = source()
    mix = Mixed(src, TokenCorpus([src.filler], [{"path": "x"}]), 0.25)
    config = {"seed": 7, "lm_share": 0.25, "accumulate": 1}
    drawn = [mix.draw(2, 256, sample_generator(7, step, 0)) for step in range(60)]
    real = ["lm" if int((torch.cat([x.targets for x in d]) >= 0).sum()) > 100 else "facts" for d in drawn]
    assert curves.sample_kinds("facts", config, 60) == real and 5 <= real.count("lm") <= 25
    history = [{"step": s + 1, "segments": 1 if s < 20 else 2, "loss": 3.0 if k == "lm" else 0.5}
               for s, k in enumerate(real)]
    rows = curves.curves({"task": "facts", "config": config, "history": history}, window=25)
    assert [(r["segments"], r["steps"]) for r in rows] == [(1, [1, 20]), (2, [21, 45]), (2, [46, 60])]
    assert all(r["answer_loss"] == 0.5 and r["lm_loss"] in (3.0, None) for r in rows)
    assert sum(r["lm_samples"] for r in rows) == real.count("lm")


def test_curriculum_reaches_sixteen_segments():
    cfg = TrainConfig(curriculum=parse_curriculum("1:2,2:2,4:2,8:2,16:2"))
    assert [cfg.segments_at(s) for s in range(10)] == [1, 1, 2, 2, 4, 4, 8, 8, 16, 16] and cfg.steps == 10


def test_answer_scores_are_those_of_fixed_samples():
    torch.manual_seed(0)
    backbone = Backbone(LlamaForCausalLM(tiny_config()).eval(), byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))
    m = get_method("window")(get_method("window").Options.from_mapping({}), backbone)
    src = source()
    a = answer_scores(backbone, m, src, segments=2, segment=256, samples=3)
    assert a == answer_scores(backbone, m, src, segments=2, segment=256, samples=3)
    assert a["answer_accuracy"] == 0 and 4 < a["answer_nll"] < 9  # random weights: near ln(400) = 6.0
    # no memory: the question's segment reads the same whatever came before it
    controlled = answer_scores(backbone, m, src, segments=2, segment=256, samples=3, controls=("swapped", "reset"))
    assert {k: v for k, v in controlled.items() if k in a} == a
    assert all(controlled[f"{k}_{c}"] == a[k] for k in ("answer_accuracy", "answer_nll") for c in ("swapped", "reset"))


def test_answer_scores_ablate_the_memory_the_question_reads():
    """`xl` carries the previous segment's keys: what the question's segment reads differs with its own
    memory, another sample's and the initial (empty) one; with one segment there is nothing to ablate."""
    torch.manual_seed(0)
    backbone = Backbone(LlamaForCausalLM(tiny_config()).eval(), byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))
    m = get_method("xl")(get_method("xl").Options.from_mapping({"memory": 256}), backbone)
    src = source()
    nll = ("answer_nll", "answer_nll_swapped", "answer_nll_reset")
    two = answer_scores(backbone, m, src, segments=2, segment=256, samples=3, controls=("swapped", "reset"))
    assert len({two[k] for k in nll}) == 3, two
    assert two["answer_nll"] == answer_scores(backbone, m, src, segments=2, segment=256, samples=3)["answer_nll"]
    one = answer_scores(backbone, m, src, segments=1, segment=512, samples=3, controls=("swapped", "reset"))
    assert len({one[k] for k in nll}) == 1, one
    with pytest.raises(UsageError, match="at least 2 samples"):
        answer_scores(backbone, m, src, segments=2, segment=256, samples=1, controls=("swapped",))


# ---- the machinery learns: a planted key recalled 4 segments later -------------------------------------------
TASK = RecallTask(fact=[290], question=[291], keys=list(range(300, 308)))


LEARN = TrainConfig(segment=8, curriculum=((1, 100), (2, 200), (4, 500)), loss="answer", tune="full", lr=3e-3,
                    backbone_lr=3e-3, warmup=20)


@functools.cache
def trained_accuracy(method: str, options: tuple[tuple[str, int], ...] = ()) -> float:
    """Recall accuracy 4 segments back after the curriculum 1 -> 2 -> 4 (cached: `window` is every test's baseline)."""
    torch.manual_seed(0)
    backbone = Backbone(LlamaForCausalLM(tiny_config()).eval(), byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))
    cls = get_method(method)
    m = cls(cls.Options.from_mapping(dict(options)), backbone)
    Trainer(backbone, m, TASK, LEARN).run()
    return recall_accuracy(backbone, m, TASK, segments=4, segment=8, samples=100)["accuracy"]


@pytest.mark.parametrize("name, options", [("rmt", {"tokens": 4}),
                                           ("memoryllm", {"pool": 16, "update": 4, "min_context": 4})])
def test_memory_learns_a_planted_recall_four_segments_back(name, options):
    """Key at the start of segment 1, question at the end of segment 4 (8-token segments), curriculum
    1 -> 2 -> 4, loss on the answer: recall far above chance (1/8); the no-memory model cannot."""
    accuracy = {name: trained_accuracy(name, tuple(options.items())), "window": trained_accuracy("window")}
    assert accuracy[name] >= 0.6, accuracy
    assert accuracy["window"] <= 0.3, accuracy


@pytest.mark.parametrize("bptt, reaches", [(None, True), (3, True), (2, False)])
def test_the_answer_trains_the_injection_only_when_bptt_reaches_the_fact(bptt, reaches):
    """memoryllm's injection-then-question objective: the fact's segment (0) writes the slots the last
    segment (3) reads; the answer's loss reaches that write through the pool when BPTT covers segments 1-3."""
    from longctx.tasks.trainer import unroll

    torch.manual_seed(0)
    backbone = Backbone(LlamaForCausalLM(tiny_config()).eval(), byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))
    cls = get_method("memoryllm")
    m = cls(cls.Options.from_mapping({"pool": 16, "update": 4, "min_context": 4}), backbone)
    entering = {}

    def keep(i, state):
        if state.pool.requires_grad:
            state.pool.retain_grad()
        entering[i] = state.pool

    loss, scored = unroll(backbone, m, TASK.draw(4, 8, gen(0)), bptt=bptt, loss="answer", on_enter=keep)
    loss.backward()
    assert scored == 1
    written = entering[1]  # the pool as the fact's segment left it: its 4 slots
    assert written.shape[1] == 4
    got = written.grad is not None and bool(written.grad.abs().sum() > 0)
    assert got == reaches


def test_cli_trains_facts_mixed_with_lm_records_answers_and_stops_at_a_step(model_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from longctx.cli import app

    book, val = tmp_path / "train.txt", tmp_path / "val.txt"
    book.write_text(sample_text(6000), encoding="utf-8")
    val.write_text(sample_text(6000, seed=3), encoding="utf-8")
    args = ["train", str(book), "--method", "rmt", "--out", "facts", "--model", model_dir, "--segment", "256",
            "--curriculum", "1:2,2:2", "--task", "facts", "--loss", "answer", "--lm-share", "0.5", "--validation",
            str(val), "--val-tokens", "64", "--val-recall", "2", "--validate-every", "1", "--json", "--no-progress",
            "-o", "tokens=2", "--dtype", "fp32", "--tune", "memory"]
    r = CliRunner().invoke(app, [*args, "--stop-at", "3"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["steps"] == 3 and out["curriculum_steps"] == 4 and out["task"] == "facts"
    assert out["task_data"]["lm_share"] == 0.5 and out["task_data"]["templates"] == len(TEMPLATES)
    assert [v["recall_segments"] for v in out["validation_ppl"]] == [1, 1, 1, 2]
    assert all(0 <= v["answer_accuracy"] <= 1 and v["answer_nll"] > 0 for v in out["validation_ppl"])
    # from 2 segments on, the control: the same questions read with another sample's memory
    assert [("answer_nll_swapped" in v) for v in out["validation_ppl"]] == [False, False, False, True]
    from longctx.cli.training import _validation_text

    assert "another sample's memory" in _validation_text(out["validation_ppl"][-1])
    assert "another sample's memory" not in _validation_text(out["validation_ppl"][0])
    going_on = CliRunner().invoke(app, args)
    assert going_on.exit_code == 0, going_on.output
    assert json.loads(going_on.stdout)["steps"] == 4 and json.loads(going_on.stdout)["resumed_from_checkpoint"]
    refused = CliRunner().invoke(app, [*args, "--task", "lm", "--loss", "all"])
    assert refused.exit_code == 2 and "--lm-share and --val-recall go with --task facts" in refused.stderr
