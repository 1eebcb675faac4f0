"""Property-based tests (hypothesis, derandomized in conftest): the text reader, the reader feeding the chunked
tokenizer, the FIFO memory policy and the NLL sums, over inputs nobody would think to write by hand.

The tokenizer's own split-invariance property (text blocks cut anywhere) is in tests/test_tokens.py.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tiny_tokenizers import byte_bpe_tokenizer, sentencepiece_tokenizer

from longctx.errors import InputError
from longctx.methods.kvstate import KVState
from longctx.metrics import NllSums
from longctx.text.textio import SNIFF_BYTES, open_source
from longctx.text.tokens import concat_chunks, iter_tokens

TOKENIZERS = {"bpe": byte_bpe_tokenizer(), "spm": sentencepiece_tokenizer()}
# Any Unicode scalar value (no lone surrogates: they cannot be UTF-8), weighted towards tricky ones.
UNICODE = st.one_of(st.sampled_from(list(" \t\r\n\u00a0\u3000.é漢😀\u0301\u200d▁<>|\x00")),
                    st.characters(exclude_categories=("Cs",)))
FILES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "doc.txt"
    p.write_bytes(data)
    return str(p)


def _read_all(path: str, block_size: int) -> tuple[str, list]:
    with open_source(path, block_size=block_size) as src:
        blocks = list(src.blocks())
    return "".join(b.text for b in blocks), blocks


# -- the text reader -----------------------------------------------------------------------------------
@FILES
@given(text=st.text(alphabet=UNICODE, min_size=1, max_size=200), block_size=st.integers(1, 40))
def test_reader_returns_the_text_with_contiguous_exact_byte_spans(tmp_path, text, block_size):
    data = text.encode()
    assume(b"\x00" not in data[:SNIFF_BYTES])  # a NUL up front means binary: refused, tested elsewhere
    got, blocks = _read_all(_write(tmp_path, data), block_size)
    assert got == text
    assert blocks[0].byte_start == 0 and blocks[-1].byte_end == len(data)
    for b in blocks:
        assert b.text.encode() == data[b.byte_start : b.byte_end]
    for left, right in zip(blocks, blocks[1:]):
        assert left.byte_end == right.byte_start


@FILES
@given(data=st.binary(min_size=1, max_size=120), block_size=st.integers(1, 16))
def test_reader_accepts_exactly_utf8_and_names_the_first_bad_byte(tmp_path, data, block_size):
    """Any bytes: either the strict whole-file decode, or InputError at the byte a whole decode fails on."""
    assume(b"\x00" not in data and not data.startswith((b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf")))
    path = _write(tmp_path, data)
    try:
        expected = data.decode("utf-8")
    except UnicodeDecodeError as e:
        with pytest.raises(InputError, match=f"not valid UTF-8 at byte {e.start} "):
            _read_all(path, block_size)
    else:
        assert _read_all(path, block_size)[0] == expected


# -- reader + chunked tokenizer ------------------------------------------------------------------------
@settings(FILES, max_examples=100)
@given(text=st.text(alphabet=UNICODE, min_size=1, max_size=250), block_size=st.integers(1, 64),
       min_chars=st.integers(1, 64), which=st.sampled_from(sorted(TOKENIZERS)))
def test_streamed_file_tokenizes_like_the_whole_text(tmp_path, text, block_size, min_chars, which):
    """Whatever the read size and re-tokenization step: same ids as one encode, bytes add up to the file."""
    data = text.encode()
    assume(b"\x00" not in data[:SNIFF_BYTES])
    tok = TOKENIZERS[which]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a lost re-synchronisation would be a bug
        with open_source(_write(tmp_path, data), block_size=block_size) as src:
            whole = concat_chunks(iter_tokens(tok, src.blocks(), min_chars=min_chars, margin=8))
    assert whole.ids.tolist() == tok(text)["input_ids"]
    assert int(whole.token_bytes().sum()) == len(data) and whole.byte_end == len(data)
    assert whole.words == len(text.split())


# -- memory policy: FIFO -------------------------------------------------------------------------------
def _entries(start: int, n: int) -> tuple[torch.Tensor, ...]:
    """n entries for tokens start..start+n-1; every tensor encodes its token so misalignment shows."""
    idx = torch.arange(start, start + n, dtype=torch.long)
    keys = idx.to(torch.float32).view(1, 1, n, 1).expand(2, 1, n, 3).clone()
    return keys, -keys, idx, idx + 1000, idx * 3


@settings(max_examples=80, deadline=None)
@given(writes=st.lists(st.integers(0, 30), min_size=1, max_size=12), sinks=st.integers(0, 8),
       capacity=st.integers(0, 40))
def test_fifo_keeps_sinks_and_exactly_the_newest_in_order(writes, sinks, capacity):
    state, seen = KVState.empty(2, 1, 3, dtype=torch.float32, device=torch.device("cpu")), 0
    for n in writes:
        state = state.append(*_entries(seen, n)).fifo(sinks, capacity)
        seen += n
        others = [i for i in range(seen) if i >= sinks]
        expected = [i for i in range(min(sinks, seen))] + others[max(len(others) - capacity, 0):]
        assert state.token_index.tolist() == expected
        assert state.keys[0, 0, :, 0].tolist() == expected and state.values[1, 0, :, 2].tolist() == [-i for i in expected]
        assert state.token_ids.tolist() == [i + 1000 for i in expected]
        assert state.byte_start.tolist() == [i * 3 for i in expected]


# -- NLL sums: any split of the scored tokens gives the same totals ------------------------------------
@settings(max_examples=60, deadline=None)
@given(nll=st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=700),
       cuts=st.lists(st.integers(1, 699), max_size=10))
def test_nll_sums_do_not_depend_on_segmentation(nll, cuts):
    n = len(nll)
    values, positions = torch.tensor(nll, dtype=torch.float64), torch.arange(1, n + 1)
    one, split = NllSums(), NllSums()
    one.add(positions, values, n)
    bounds = [0, *sorted({c for c in cuts if c < n}), n]
    for a, b in zip(bounds, bounds[1:]):
        split.add(positions[a:b], values[a:b], b - a)
    assert split.block_tokens == one.block_tokens and split.tokens == n and split.bytes == n
    assert np.allclose(split.block_nll, one.block_nll, rtol=1e-12, atol=1e-9)
    assert math.isclose(split.nll, math.fsum(nll), rel_tol=1e-12, abs_tol=1e-9)
