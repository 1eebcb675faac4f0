"""`--cite` ranks spans by relevance to *this* answer: structural tokens (headings, attention sinks) left out,
a question-independent baseline subtracted. A controlled attention pattern (the picks a retrieval layer
reports through `ForwardOutputs.retrieved`) on a document with planted facts. (The real default model on a needle
document: tests/test_default_model.py.)"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from longctx.tasks.citations import (
    Evidence,
    RetrievalTally,
    common_reads,
    heading_bytes,
    rank_spans,
    relevance,
    retrieved_citations,
    structural_mask,
)

HEAD = 6  # prompt-head tokens before the document (they sit at byte 0)
FACT_A = "The silver key is kept under the blue stone by the old mill."
FACT_B = "Captain Harwell sailed for Lisbon on the ninth of March with forty men."


def planted_document() -> str:
    """Filler paragraphs under chapter headings, with two facts planted in different chapters."""
    filler = "She walked along the lane and thought of nothing in particular for a while. " * 6
    return (f"CHAPTER I\n\n{filler}\n\n{filler}{FACT_A} {filler}\n\nCHAPTER II\n\n{filler}\n\n"
            f"{filler}{FACT_B} {filler}\n\n# Notes\n\n{filler}\n")


def word_tokens(text: str) -> torch.Tensor:
    """Byte start of every token: the prompt head at byte 0, then one token per word of the (ASCII) text."""
    return torch.tensor([0] * HEAD + [m.start() for m in re.finditer(r"\S+", text)], dtype=torch.long)


def tokens_of(byte_start: torch.Tensor, text: str, needle: str) -> list[int]:
    """Absolute indices of the tokens that start inside `needle`'s first occurrence."""
    lo = text.index(needle)
    hi = lo + len(needle)
    return [i for i in range(HEAD, len(byte_start)) if lo <= int(byte_start[i]) < hi]


def forward(picks: list[int]) -> SimpleNamespace:
    """A plan stand-in for one forward: one retrieval layer, one head, the predicting row picking `picks`."""
    return SimpleNamespace(out=SimpleNamespace(retrieved={0: torch.tensor(picks).view(1, 1, -1)}), token_rows=None)


def answer_tally(byte_start: torch.Tensor, steps: list[list[int]]) -> RetrievalTally:
    tally = RetrievalTally(HEAD, len(byte_start))
    for picks in steps:
        tally.add(forward(picks))
    return tally


def overlaps(c, text: str, needle: str) -> bool:
    lo = text.index(needle)
    return c.byte_start < lo + len(needle) and c.byte_end > lo


def test_headings_and_sinks_are_structural_tokens():
    text = planted_document()
    data = text.encode()
    lines = [data[a:b].decode() for a, b in heading_bytes(data)]
    assert lines == ["CHAPTER I", "CHAPTER II", "# Notes"]  # prose lines and the facts are not headings
    assert heading_bytes(b"Chapter 12 In consequence of an agreement\n\nXIV.\nIt was a fine day, and he said so.\n") \
        == [(0, 41), (43, 47)]
    prose = b"Part of the letter was lost,\nand Book-keeping was\nnot his Chapter of life.\nI said so.\n"
    assert heading_bytes(prose) == []  # hard-wrapped prose lines that start like headings are prose
    starts = word_tokens(text)
    mask = structural_mask(starts, HEAD, len(starts), heading_bytes(data), sinks=HEAD + 3)
    marked = [i + HEAD for i in torch.nonzero(mask).flatten().tolist()]
    heading_words = [tokens_of(starts, text, h) for h in ("CHAPTER I\n", "CHAPTER II", "# Notes")]
    assert marked == sorted({HEAD, HEAD + 1, HEAD + 2} | {t for ws in heading_words for t in ws})
    assert not mask[[t - HEAD for t in tokens_of(starts, text, FACT_A)]].any()


def test_two_questions_about_different_facts_cite_the_spans_that_hold_them():
    """Both answers' heads rest mostly on the first tokens and the chapter headings, as the default model's do;
    each also reads its own fact. Raw picks cite the resting places first for both; relevance cites the facts."""
    text = planted_document()
    starts = word_tokens(text)
    sinks = list(range(HEAD, HEAD + 4))
    headings = [t for h in ("CHAPTER I\n", "CHAPTER II") for t in tokens_of(starts, text, h)]
    chapter_start = tokens_of(starts, text, "She walked along")[:6]  # attended by every question, not a heading
    resting = sinks * 3 + headings * 4 + chapter_start * 2
    fact_a, fact_b = tokens_of(starts, text, FACT_A), tokens_of(starts, text, FACT_B)
    baseline = answer_tally(starts, [resting + chapter_start])
    structural = structural_mask(starts, HEAD, len(starts), heading_bytes(text.encode()), sinks=HEAD)
    cited = {}
    for name, fact in (("a", fact_a), ("b", fact_b)):
        tally = answer_tally(starts, [resting + fact[::2], resting + fact[1::2], resting + fact])
        first_raw = tally.spans(limit=1)[0]
        assert not set(range(first_raw[0], first_raw[1])) & set(fact)  # the old ranking cites where heads rest
        cites = retrieved_citations(Evidence(tally, starts, len(text.encode()), baseline, structural), None,
                                    rule="probe")
        assert cites and cites[0].kind == "retrieved"
        assert [c.weight for c in cites] == sorted((c.weight for c in cites), reverse=True)
        assert 0 < sum(c.weight for c in cites) <= 1 + 1e-6 and cites[0].weight > 0.5
        assert 0 < cites[0].reads < cites[0].weight  # most picks were elsewhere; relevance is this fact's
        cited[name] = cites[0]
    assert overlaps(cited["a"], text, FACT_A) and not overlaps(cited["a"], text, FACT_B)
    assert overlaps(cited["b"], text, FACT_B) and not overlaps(cited["b"], text, FACT_A)
    assert cited["a"].tokens != cited["b"].tokens


def test_relevance_is_the_answer_share_minus_the_baseline_share():
    counts = torch.tensor([6, 2, 2, 0, 10])
    base = torch.tensor([1, 0, 0, 0, 1])
    structural = torch.tensor([False, False, False, False, True])
    w = relevance(counts, base, structural)  # answer shares .6 .2 .2 0; baseline shares 1 0 0 0
    assert w.tolist() == pytest.approx([0.0, 0.2, 0.2, 0.0, 0.0])
    assert relevance(counts, None, None).tolist() == pytest.approx((counts / counts.sum()).tolist())
    assert rank_spans(relevance(counts, counts, None)) == []  # what every question reads cites nothing
    assert rank_spans(w) == [(1, 3, pytest.approx(1.0))]



def test_printed_citations_show_relevance_and_reads_or_a_chunks_similarity():
    from longctx.cli.reading import _weight
    from longctx.tasks.citations import Citation

    assert _weight(Citation("retrieved", (3, 9), 10, 40, 0.7134, "x", 0.0912)) == " relevance 71% (9% of reads)"
    assert _weight(Citation("retrieved", (0, 128), 0, 500, 0.4321, "x")) == " similarity 0.43"  # a RAG chunk
    assert _weight(Citation("held", (0, 5), 0, 20, None)) == ""


def test_a_lone_fact_that_the_probe_also_reads_is_cited_first():
    """One question about a document's one salient fact: the probe ("What is this text about?") reads that
    fact too, so subtracting the probe cites an early span instead; the default rule cites the fact."""
    text = planted_document()
    starts = word_tokens(text)
    headings = [t for h in ("CHAPTER I\n", "CHAPTER II") for t in tokens_of(starts, text, h)]
    early = tokens_of(starts, text, "She walked along the lane and")
    fact = tokens_of(starts, text, FACT_A)
    tally = answer_tally(starts, [headings + early + fact] * 3)
    baseline = answer_tally(starts, [headings + fact + fact])
    structural = structural_mask(starts, HEAD, len(starts), heading_bytes(text.encode()), sinks=HEAD)
    e = Evidence(tally, starts, len(text.encode()), baseline, structural)
    old = retrieved_citations(e, None, rule="probe")
    assert old and not overlaps(old[0], text, FACT_A)  # the failure the default rule must not repeat
    first = retrieved_citations(e, None, others=[e])[0]
    assert overlaps(first, text, FACT_A) and first.weight > 0.5


def test_what_every_question_of_a_call_reads_is_no_answers_own():
    """Three questions: all read the same early span, each reads its own fact. The cross-question rule drops
    the common span; one question alone has nothing in common to drop."""
    text = planted_document() + "The lamp was lit at six and put out at ten. " * 3
    starts = word_tokens(text)
    common = tokens_of(starts, text, "She walked along the lane and thought of")
    own = [tokens_of(starts, text, f) for f in (FACT_A, FACT_B, "The lamp was lit at six")]
    ev = [Evidence(answer_tally(starts, [common * 2 + mine]), starts, len(text.encode())) for mine in own]
    assert common_reads(ev[:1]) is None
    for e, fact in zip(ev, (FACT_A, FACT_B, "The lamp was lit at six"), strict=True):
        assert not overlaps(retrieved_citations(e, None, rule="structure")[0], text, fact)  # raw: the common span
        cites = retrieved_citations(e, None, rule="shared", others=ev)
        assert len(cites) == 1 and overlaps(cites[0], text, fact)
    alone = retrieved_citations(ev[0], None, rule="shared", others=ev[:1])
    assert alone[0].tokens == retrieved_citations(ev[0], None, rule="structure")[0].tokens


def test_two_questions_about_one_fact_both_cite_it():
    """Both questions read the same fact and the same early span; the probe reads only the early span. What
    every question reads is dropped only where the probe reads it too, so the shared fact stays cited."""
    text = planted_document()
    starts = word_tokens(text)
    early = tokens_of(starts, text, "She walked along the lane and thought of")
    fact = tokens_of(starts, text, FACT_A)
    probe = answer_tally(starts, [early * 3])
    ev = [Evidence(answer_tally(starts, [early * 3 + fact[: 8 + k]]), starts, len(text.encode()), probe)
          for k in (0, 3)]
    for e in ev:
        first = retrieved_citations(e, None, others=ev)[0]
        assert overlaps(first, text, FACT_A) and first.weight == pytest.approx(1.0)
