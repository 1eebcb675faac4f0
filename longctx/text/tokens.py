"""Chunked, boundary-safe tokenization with exact token↔byte accounting (docs/architecture.md "Data flow").

`iter_tokens` turns a stream of `TextBlock`s into `TokenChunk`s whose concatenated ids equal the ids of
one whole-text encoding (`tokenizer(text)["input_ids"]`, without any EOS), wherever the blocks split.

How: text not yet committed is kept as `pending`. Each step re-tokenizes
`left context + pending`, where the left context is the text of the last few committed tokens. The
result is accepted only if a token boundary falls exactly where the context ends and the context's tail
reproduces the committed ids (a BPE merge or a SentencePiece dummy prefix at the artificial start
disturbs only the first tokens of the context); otherwise the context is widened. All new tokens except
the last `margin` are committed, because more text on the right may still change those; at the end of
input everything is committed. Memory is O(block + margin), never O(document).

Offsets come from a private copy of the Rust tokenizer without its post-processor, so they are never
trimmed (GPT-2 style `trim_offsets`) and carry no special tokens; special tokens that a whole-text
encoding puts at the start (a BOS) are detected once and prepended once, with zero bytes.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..errors import UsageError
from .textio import TextBlock

_WORD = re.compile(r"\S+")  # same whitespace notion as str.split()
_FIRST_CONTEXT = 8  # tokens of left context tried first; doubled until alignment succeeds
_HISTORY_TOKENS = 512  # committed tokens kept for left context (bounded memory)
DEFAULT_MIN_CHARS = 4096  # re-tokenize only once this much text is pending (fewer, larger encodes)
_STEP_CHARS = 1 << 16  # feed big blocks in slices: one encode's Python-side offsets cost ~250 B per char


@dataclass
class TokenChunk:
    """Committed tokens with their absolute byte offsets in the source.

    `byte_starts[i]` is where token i's text starts; a token's bytes run to the next token's start (the
    last one's to `byte_end`), so the per-token byte counts of all chunks sum to the input's byte length.
    Special tokens (BOS) have zero bytes. `words` counts whitespace-separated words whose first
    character lies in this chunk's text span.
    """

    ids: np.ndarray
    byte_starts: np.ndarray
    byte_end: int
    words: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def byte_start(self) -> int:
        """Byte offset where this chunk's text starts (its first token's start, else its end)."""
        return int(self.byte_starts[0]) if len(self) else self.byte_end

    def token_bytes(self) -> np.ndarray:
        """Bytes of source text per token (int64); sums to byte_end - byte_start."""
        return np.diff(np.append(self.byte_starts, self.byte_end))


def concat_chunks(chunks: Iterable[TokenChunk]) -> TokenChunk:
    """Join consecutive chunks into one (for small inputs and tests)."""
    chunks = list(chunks)
    if not chunks:
        return TokenChunk(np.zeros(0, np.int64), np.zeros(0, np.int64), 0, 0)
    return TokenChunk(
        ids=np.concatenate([c.ids for c in chunks]).astype(np.int64, copy=False),
        byte_starts=np.concatenate([c.byte_starts for c in chunks]).astype(np.int64, copy=False),
        byte_end=chunks[-1].byte_end,
        words=sum(c.words for c in chunks),
    )


def count_words(text: str, *, after_space: bool = True) -> int:
    """Number of `str.split()` words starting in `text`; `after_space`: the char before it was whitespace."""
    n = len(_WORD.findall(text))
    if n and not after_space and not text[0].isspace():
        n -= 1  # the first run continues a word started earlier
    return n


# -- the tokenizer side ------------------------------------------------------------------------------
_BACKENDS: weakref.WeakKeyDictionary[Any, tuple[int, Tokenizer]] = weakref.WeakKeyDictionary()


def _rust_tokenizer(tokenizer: Any) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise UsageError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; longctx needs a tokenizers-backed "
            "(fast) Hugging Face tokenizer"
        )
    return backend


def _content_backend(tokenizer: Any) -> Tokenizer:
    """A copy of the Rust tokenizer with no post-processor, truncation or padding (cached per tokenizer)."""
    rust = _rust_tokenizer(tokenizer)
    key = rust.get_vocab_size(with_added_tokens=True)
    try:
        cached = _BACKENDS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    copy = Tokenizer.from_str(rust.to_str())
    copy.post_processor = None
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = rust.encode_special_tokens
    try:
        _BACKENDS[tokenizer] = (key, copy)
    except TypeError:
        pass
    return copy


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids a whole-text encoding puts before the text (e.g. [BOS]); [] if none."""
    if isinstance(tokenizer, Tokenizer):
        with_sp = tokenizer.encode("a", add_special_tokens=True).ids
        without = tokenizer.encode("a", add_special_tokens=False).ids
    else:
        with_sp = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for p in range(len(with_sp) - len(without) + 1):
        if with_sp[p : p + len(without)] == without:
            return with_sp[:p]
    return []


def _bos_ids(tokenizer: Any, add_bos: bool | None) -> list[int]:
    if add_bos is False:
        return []
    prefix = special_prefix(tokenizer)
    if prefix or add_bos is None:
        return prefix
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise UsageError("add_bos=True but the tokenizer has no BOS token")
    return [int(bos)]


# -- the chunker -------------------------------------------------------------------------------------
def _context_widths(n: int) -> Iterator[int]:
    """Left-context sizes to try: 8, 16, 32, ... and finally everything kept."""
    k = min(_FIRST_CONTEXT, n)
    while k < n:
        yield k
        k *= 2
    yield n


def _alignment(enc: Encoding, ctx_ids: list[int], ctx_len: int, *, exact: bool) -> int | None:
    """Index of the first token after the context, if the re-tokenization lines up with committed tokens."""
    if ctx_len == 0:
        return 0
    offsets = enc.offsets
    j = 0
    while j < len(offsets) and offsets[j][0] < ctx_len:
        if offsets[j][1] > ctx_len:
            return None  # a token straddles the context end
        j += 1
    if any(start < ctx_len for start, _ in offsets[j:]):
        return None
    got = enc.ids[:j]
    if exact:
        return j if got == ctx_ids else None
    # The artificial start may change the first few context tokens; the tail must agree.
    need = max(1, (3 * len(ctx_ids)) // 4)
    return j if len(got) >= need and got[-need:] == ctx_ids[-need:] else None


def _char_to_byte(text: str) -> np.ndarray:
    """UTF-8 byte offset of each character of `text`, plus the total length at the end."""
    raw = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    starts = np.flatnonzero((raw & 0xC0) != 0x80)
    return np.append(starts, raw.shape[0]).astype(np.int64)


class _Chunker:
    """State of one streaming tokenization: committed history, pending text, byte position."""

    def __init__(self, backend: Tokenizer, margin: int, byte_origin: int):
        self.backend = backend
        self.margin = margin
        self.history: deque[tuple[int, str]] = deque()  # (id, text) of recently committed tokens
        self.history_from_start = True  # history still begins at the start of the document
        self.pending = ""
        self.pending_byte = byte_origin  # absolute byte offset of pending[0]
        self.after_space = True

    def step(self, *, final: bool) -> TokenChunk | None:
        """Re-tokenize and commit what is safe (everything if final); None if nothing was committed."""
        enc, text, ctx_len, j = self._encode_aligned()  # text = left context + pending
        offsets, ids = enc.offsets, enc.ids
        starts = [ctx_len]  # clamped so that token texts partition the buffer
        for start, _ in offsets[j + 1 :]:
            starts.append(max(start, starts[-1]))
        starts = starts[: len(ids) - j]
        cut = len(ids) if final else self._safe_cut(offsets, starts, j)
        if cut <= j and not final:
            return None
        end_char = len(text) if final else starts[cut - j]
        return self._commit(text, ids[j:cut], starts[: cut - j], ctx_len, end_char)

    def _encode_aligned(self) -> tuple[Encoding, str, int, int]:
        """Encode left context + pending, widening the context until it lines up; returns (enc, text, ctx_len, j)."""
        hist = list(self.history)
        for k in _context_widths(len(hist)):
            ctx_ids = [i for i, _ in hist[len(hist) - k :]]
            ctx = "".join(t for _, t in hist[len(hist) - k :])
            text = ctx + self.pending
            enc = self.backend.encode(text, add_special_tokens=False)
            exact = self.history_from_start and k == len(hist)
            j = _alignment(enc, ctx_ids, len(ctx), exact=exact)
            if j is not None:
                return enc, text, len(ctx), j
        warnings.warn(
            f"tokenization could not be re-synchronised near byte {self.pending_byte}; token ids there may "
            "differ slightly from a whole-text encoding (try a larger margin)",
            RuntimeWarning,
            stacklevel=4,
        )
        return self.backend.encode(self.pending, add_special_tokens=False), self.pending, 0, 0

    def _safe_cut(self, offsets: list[tuple[int, int]], starts: list[int], j: int) -> int:
        """Last cut keeping `margin` tokens uncommitted, moved left to a clean character boundary."""
        cut = j + len(starts) - self.margin
        ends: np.ndarray | list[int] = np.maximum.accumulate([offsets[i][1] for i in range(j, j + len(starts))]) if starts else []
        # Clean: no earlier token reaches past the cut (several byte-level tokens can share one char).
        while cut > j and ends[cut - j - 1] > starts[cut - j]:
            cut -= 1
        return cut

    def _commit(self, text: str, ids: list[int], starts: list[int], ctx_len: int, end_char: int) -> TokenChunk:
        """Commit tokens covering text[ctx_len:end_char]; update history, pending text and byte position."""
        committed = text[ctx_len:end_char]
        to_byte = _char_to_byte(committed)
        byte_starts = self.pending_byte + to_byte[np.asarray(starts, dtype=np.int64) - ctx_len]
        byte_end = self.pending_byte + int(to_byte[-1])
        bounds = [*starts, end_char]
        for i, tok in enumerate(ids):
            self.history.append((tok, text[bounds[i] : bounds[i + 1]]))
        while len(self.history) > _HISTORY_TOKENS:
            self.history.popleft()
            self.history_from_start = False
        words = count_words(committed, after_space=self.after_space)
        if committed:
            self.after_space = committed[-1].isspace()
        self.pending = text[end_char:]
        self.pending_byte = byte_end
        return TokenChunk(np.asarray(ids, dtype=np.int64), byte_starts.astype(np.int64), byte_end, words)


def iter_tokens(
    tokenizer: Any,
    blocks: Iterable[TextBlock],
    *,
    add_bos: bool | None = None,
    margin: int = 64,
    min_chars: int = DEFAULT_MIN_CHARS,
) -> Iterator[TokenChunk]:
    """Tokenize a stream of text blocks; the chunks' ids concatenate to one whole-text encoding.

    `tokenizer`: a Hugging Face fast tokenizer (or a raw `tokenizers.Tokenizer`). `add_bos`: None = add
    whatever the tokenizer adds at the start of a whole-text encoding, True = add a BOS, False = none.
    Never adds EOS. `margin`: trailing tokens held back until more text arrives. `min_chars`: pending
    characters gathered before re-tokenizing (larger = fewer encodes). Big blocks are fed in 64 Ki-char
    slices, so memory stays O(block + min_chars + margin) with a small constant.
    Byte offsets are absolute (taken from the first block's byte_start; a skipped UTF-8 BOM therefore
    makes the first token start at byte 3). Blocks must be contiguous.
    """
    if margin < 1:
        raise UsageError(f"margin must be at least 1 token, got {margin}")
    backend = _content_backend(tokenizer)
    prefix = _bos_ids(tokenizer, add_bos)
    chunker: _Chunker | None = None
    expected_byte = None
    for block in blocks:
        if chunker is None:
            chunker = _Chunker(backend, margin, block.byte_start)
        elif block.byte_start != expected_byte:
            raise ValueError(f"text blocks are not contiguous: expected byte {expected_byte}, got {block.byte_start}")
        expected_byte = block.byte_end
        for at in range(0, len(block.text), _STEP_CHARS):
            chunker.pending += block.text[at : at + _STEP_CHARS]
            if len(chunker.pending) >= min_chars:
                chunk = chunker.step(final=False)
                if chunk is not None and len(chunk):
                    yield _with_prefix(chunk, prefix)
                    prefix = []
    if chunker is None:
        chunker = _Chunker(backend, margin, 0)
    chunk = chunker.step(final=True)
    assert chunk is not None  # a final step always commits (an empty chunk at worst)
    if len(chunk) or prefix or chunk.words:
        yield _with_prefix(chunk, prefix)


def _with_prefix(chunk: TokenChunk, prefix: list[int]) -> TokenChunk:
    """Prepend special ids (zero bytes: they start where the chunk starts)."""
    if not prefix:
        return chunk
    start = chunk.byte_start
    chunk.ids = np.concatenate([np.asarray(prefix, dtype=np.int64), chunk.ids])
    chunk.byte_starts = np.concatenate([np.full(len(prefix), start, dtype=np.int64), chunk.byte_starts])
    return chunk


def tokenize_text(tokenizer: Any, text: str, *, add_bos: bool | None = None) -> TokenChunk:
    """Tokenize a small in-memory text in one go; byte offsets count from 0.

    `add_bos` as in `iter_tokens` (pass False for text that continues a document, e.g. a question).
    """
    block = TextBlock(text, 0, len(text.encode("utf-8", "surrogatepass")))
    return concat_chunks(iter_tokens(tokenizer, [block], add_bos=add_bos, min_chars=len(text) + 1))
