"""longctx.text.tokens: chunked tokenization equals whole-text tokenization; exact byte and word accounting."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_tokenizers import byte_bpe_tokenizer, sample_text, sentencepiece_tokenizer

from longctx.errors import UsageError
from longctx.text.textio import TextBlock, open_source
from longctx.text.tokens import TokenChunk, concat_chunks, iter_tokens, special_prefix, tokenize_text

TOKENIZERS = {"bpe": byte_bpe_tokenizer, "spm": sentencepiece_tokenizer}
BLOCK_SIZES = [1, 2, 3, 5, 17, 64, 1000]


@pytest.fixture(params=sorted(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


@pytest.fixture(autouse=True)
def _no_resync_warnings():
    # A fallback re-synchronisation would mean ids may differ from the whole text: fail loudly.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def blocks_at(text: str, cuts: list[int], origin: int = 0) -> list[TextBlock]:
    """Split `text` at the given character positions into contiguous blocks with byte offsets."""
    out, pos, byte = [], 0, origin
    for cut in sorted({c for c in cuts if 0 < c < len(text)}) + [len(text)]:
        piece = text[pos:cut]
        size = len(piece.encode())
        out.append(TextBlock(piece, byte, byte + size))
        pos, byte = cut, byte + size
    return out


def blocks_every(text: str, n: int) -> list[TextBlock]:
    return blocks_at(text, list(range(n, len(text), n)))


def check_chunks(tok, text: str, chunks: list[TokenChunk], origin: int = 0) -> None:
    """Ids equal the whole-text encoding; bytes and words add up; chunks are contiguous."""
    whole = concat_chunks(chunks)
    assert whole.ids.tolist() == tok(text)["input_ids"]
    assert whole.ids.dtype == np.int64 and whole.byte_starts.dtype == np.int64
    per_token = whole.token_bytes()
    assert (per_token >= 0).all()
    assert int(per_token.sum()) == len(text.encode())
    assert whole.words == len(text.split())
    if chunks:
        assert chunks[0].byte_start == origin and chunks[-1].byte_end == origin + len(text.encode())
    for left, right in zip(chunks, chunks[1:]):
        assert left.byte_end == right.byte_start


def token_texts_match(tok, text: str, chunk: TokenChunk) -> None:
    """Where tokens start on character boundaries, their bytes decode to the source text they cover."""
    data = text.encode()
    ids, starts = chunk.ids.tolist(), np.append(chunk.byte_starts, chunk.byte_end)
    special = set(tok.all_special_ids)
    i = 0
    while i < len(ids):
        if ids[i] in special:
            i += 1
            continue
        j = i + 1  # group tokens that share a start (pieces of one multi-byte character)
        while j < len(ids) and starts[j] == starts[i]:
            j += 1
        decoded = tok.decode(ids[i:j], clean_up_tokenization_spaces=False)
        source = data[starts[i] : starts[j]].decode()
        # SentencePiece drops the dummy-prefix space when decoding the first token.
        assert decoded == source or decoded.lstrip(" ") == source.lstrip(" "), (decoded, source)
        i = j


# -- fixed splits -------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", BLOCK_SIZES)
def test_chunked_equals_whole_sample(tok, block):
    text = sample_text()
    check_chunks(tok, text, list(iter_tokens(tok, blocks_every(text, block))))


@pytest.mark.parametrize("block", BLOCK_SIZES)
@pytest.mark.parametrize("margin", [64, 8])
def test_chunked_equals_whole_every_step(tok, block, margin):
    # min_chars=1 re-tokenizes after every block: the alignment runs at every split point.
    text = sample_text(2500, seed=block)
    chunks = list(iter_tokens(tok, blocks_every(text, block), margin=margin, min_chars=1))
    assert len(chunks) > 1
    check_chunks(tok, text, chunks)


@pytest.mark.parametrize(
    "text",
    [
        " " * 700 + "word " + "\t" * 300 + "x",
        "漢字" * 400 + " a",
        "1234567890" * 100,
        "abcdefghij" * 150,
        "😀" * 300,
        "\r\n" * 300 + "\r" * 50 + "\n" * 50,
        "a<|im_end|>b <s> </s>" * 40,
        "cafe\u0301 " * 200,
    ],
    ids=["space-runs", "cjk", "digits", "long-word", "emoji", "newlines", "special-lookalikes", "combining"],
)
def test_chunked_equals_whole_awkward(tok, text):
    for block in (1, 7, 100):
        check_chunks(tok, text, list(iter_tokens(tok, blocks_every(text, block), min_chars=1, margin=16)))


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(
        alphabet=st.one_of(
            st.sampled_from(list(" \t\r\n.,'-0123456789aeiouthsAE\u00a0\u3000éß漢字😀\u0301\u200d▁<>|")),
            st.characters(exclude_categories=("Cs",)),
        ),
        max_size=300,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=30),
    min_chars=st.integers(min_value=1, max_value=64),
    margin=st.sampled_from([8, 64]),
    which=st.sampled_from(sorted(TOKENIZERS)),
)
def test_chunked_equals_whole_hypothesis(text, cuts, min_chars, margin, which):
    tok = TOKENIZERS[which]()
    chunks = list(iter_tokens(tok, blocks_at(text, cuts), margin=margin, min_chars=min_chars))
    check_chunks(tok, text, chunks)


# -- accounting ---------------------------------------------------------------------------------------
def test_token_bytes_cover_their_text(tok):
    text = sample_text(3000)
    token_texts_match(tok, text, concat_chunks(iter_tokens(tok, blocks_every(text, 13), min_chars=1)))


def test_words_counted_once_across_chunks(tok):
    text = "alpha beta\tgamma\r\ndelta  epsilon " * 200
    chunks = list(iter_tokens(tok, blocks_every(text, 3), min_chars=1, margin=8))
    assert len(chunks) > 5
    assert sum(c.words for c in chunks) == len(text.split()) == 1000


def test_bos_exactly_once_sentencepiece():
    tok = sentencepiece_tokenizer()
    assert special_prefix(tok) == [tok.bos_token_id]
    text = sample_text(3000)
    chunks = list(iter_tokens(tok, blocks_every(text, 5), min_chars=1))
    ids = concat_chunks(chunks).ids
    assert ids[0] == tok.bos_token_id and int((ids == tok.bos_token_id).sum()) == 1
    assert chunks[0].byte_starts[0] == chunks[0].byte_starts[1] == 0  # BOS has zero bytes
    assert tok.eos_token_id not in ids.tolist()


def test_no_bos_for_byte_bpe_by_default():
    tok = byte_bpe_tokenizer()
    assert special_prefix(tok) == []
    ids = tokenize_text(tok, "hello world").ids.tolist()
    assert ids == tok("hello world")["input_ids"] and tok.bos_token_id not in ids


def test_add_bos_override():
    spm, bpe = sentencepiece_tokenizer(), byte_bpe_tokenizer()
    assert tokenize_text(spm, "hello", add_bos=False).ids.tolist() == spm("hello", add_special_tokens=False)[
        "input_ids"
    ]
    forced = tokenize_text(bpe, "hello", add_bos=True)
    assert forced.ids.tolist() == [bpe.bos_token_id] + bpe("hello")["input_ids"]
    assert int(forced.token_bytes().sum()) == 5


def test_empty_and_whitespace_text(tok):
    check_chunks(tok, "", list(iter_tokens(tok, [])))
    check_chunks(tok, " \r\n\t ", list(iter_tokens(tok, blocks_every(" \r\n\t ", 1), min_chars=1)))


def test_tokenize_text(tok):
    text = sample_text(2000)
    chunk = tokenize_text(tok, text)
    check_chunks(tok, text, [chunk])


def test_with_textio_and_utf8_bom(tok, tmp_path):
    text = sample_text(4000)
    path = tmp_path / "doc.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    source = open_source(str(path), block_size=7)
    chunks = list(iter_tokens(tok, source.blocks(), min_chars=100))
    check_chunks(tok, text, chunks, origin=3)  # the BOM's 3 bytes are counted, not tokenized
    assert chunks[-1].byte_end == source.size


# -- streaming and errors -----------------------------------------------------------------------------
def test_streams_lazily(tok):
    consumed = 0

    def blocks():
        nonlocal consumed
        for i, block in enumerate(blocks_every(sample_text(50_000), 1000)):
            consumed = i + 1
            yield block

    it = iter_tokens(tok, blocks(), min_chars=2000)
    first = next(it)
    assert len(first) > 0 and consumed <= 3  # committed long before the input ends
    rest = list(it)
    assert len(rest) > 10


def test_non_contiguous_blocks_rejected(tok):
    with pytest.raises(ValueError, match="contiguous"):
        list(iter_tokens(tok, [TextBlock("ab", 0, 2), TextBlock("cd", 5, 7)]))


def test_bad_arguments(tok):
    with pytest.raises(UsageError):
        list(iter_tokens(tok, blocks_every("abc", 1), margin=0))
    with pytest.raises(UsageError, match="fast"):
        list(iter_tokens(object(), blocks_every("abc", 1)))
