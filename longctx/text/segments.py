"""Cutting a token stream into segments, with the next-token targets and the bytes each target covers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .tokens import TokenChunk


@dataclass
class Segment:
    """One forward's worth of tokens. `targets[j]` is the token after `ids[j]` (-1 at the end of the stream)."""

    start: int  # document index of ids[0]
    ids: torch.Tensor  # [q] int64
    byte_start: torch.Tensor  # [q] int64, byte offset of each token in the source
    targets: torch.Tensor  # [q] int64
    target_bytes: torch.Tensor  # [q] int64, source bytes of each target token (0 where there is none)
    next_byte: int = -1  # byte offset where the token after this segment starts (the stream's end if none)
    prompt: bool = False  # part of a prompt the model answers next (a question), not text read into memory
    # The token that follows a --max-tokens cut (on the last segment only): not scored in this run, but its
    # prediction is kept so that a longer run can continue from here exactly (see stream.run_stream).
    after_cut: int | None = None

    def __len__(self) -> int:
        return int(self.ids.numel())

    @property
    def token_index(self) -> torch.Tensor:
        """Document indices of the segment's tokens."""
        return torch.arange(self.start, self.start + len(self), dtype=torch.long)


class _Buffer:
    """Token ids and byte offsets pulled from chunks, consumed from the front."""

    def __init__(self, chunks: Iterable[TokenChunk], max_tokens: int | None):
        self._chunks = iter(chunks)
        self._ids = np.zeros(0, dtype=np.int64)
        self._bytes = np.zeros(0, dtype=np.int64)
        self.taken = 0  # tokens pulled from the stream so far
        self.end_byte: int | None = None  # byte where the (possibly truncated) stream ends, once known
        self.max_tokens = max_tokens
        self.words = 0
        self.complete = False  # True when the whole input was consumed (no --max-tokens cut)
        self.after_cut: int | None = None  # id of the first token past a --max-tokens cut, when there is one
        self._last_end = 0

    def fill(self, need: int) -> None:
        while len(self._ids) < need and self.end_byte is None:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.end_byte = self._last_end
                self.complete = True
                return
            self._take(chunk)

    def _take(self, chunk: TokenChunk) -> None:
        ids, starts = chunk.ids, chunk.byte_starts
        self._last_end = chunk.byte_end
        self.words += chunk.words
        if self.max_tokens is not None and self.taken + len(ids) >= self.max_tokens:
            n = self.max_tokens - self.taken
            self.end_byte = int(starts[n]) if n < len(ids) else chunk.byte_end
            following = ids[n:] if n < len(ids) else _first_ids(self._chunks)
            self.complete = len(following) == 0
            self.after_cut = int(following[0]) if len(following) else None
            ids, starts = ids[:n], starts[:n]
        self.taken += len(ids)
        self._ids = np.concatenate((self._ids, ids))
        self._bytes = np.concatenate((self._bytes, starts))

    def pop(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Remove n tokens; also return the targets and target byte counts (looking ahead up to 2)."""
        ids, starts = self._ids[:n], self._bytes[:n]
        nxt = self._ids[1 : n + 1]
        k = len(nxt)
        # token i ends where token i+1 starts (the last one at end_byte, known by then)
        ends = np.append(self._bytes[1:], self.end_byte if self.end_byte is not None else -1)
        tbytes = ends[1 : k + 1] - self._bytes[1 : k + 1]
        targets = np.concatenate((nxt, np.full(n - k, -1, dtype=np.int64)))
        tbytes = np.concatenate((tbytes, np.zeros(n - k, dtype=np.int64)))
        self._ids, self._bytes = self._ids[n:], self._bytes[n:]
        return ids, starts, targets, tbytes

    def __len__(self) -> int:
        return len(self._ids)

    def next_start(self) -> int:
        """Byte offset of the next unread token (the stream's end when none is left)."""
        return int(self._bytes[0]) if len(self._bytes) else int(self.end_byte if self.end_byte is not None else -1)


def _first_ids(chunks: Iterator[TokenChunk]) -> np.ndarray:
    """The ids of the next chunk that has any (empty when the stream ends)."""
    for chunk in chunks:
        if len(chunk.ids):
            return chunk.ids
    return np.zeros(0, dtype=np.int64)


def iter_segments(chunks: Iterable[TokenChunk], segment: int, *, max_tokens: int | None = None,
                  stats: dict | None = None) -> Iterator[Segment]:
    """Yield segments of `segment` tokens (the last may be shorter). `stats` receives words/bytes totals."""
    if segment < 1:
        raise ValueError("segment must be >= 1")
    buf = _Buffer(chunks, max_tokens)
    start = 0
    while True:
        buf.fill(segment + 2)
        if len(buf) == 0:
            break
        ids, starts, targets, tbytes = buf.pop(min(segment, len(buf)))
        next_byte = buf.next_start()
        last = len(buf) == 0 and buf.end_byte is not None
        yield Segment(start, torch.from_numpy(ids.copy()), torch.from_numpy(starts.copy()),
                      torch.from_numpy(targets.astype(np.int64)), torch.from_numpy(tbytes.astype(np.int64)),
                      next_byte, after_cut=buf.after_cut if last else None)
        start += len(ids)
    if stats is not None:
        stats.update(tokens=buf.taken, end_byte=buf.end_byte, words=buf.words if buf.complete else None)
