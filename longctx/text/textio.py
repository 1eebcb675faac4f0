"""Strict, streaming text input: UTF-8 only, exact byte offsets, O(block_size) memory (docs/architecture.md "Data flow").

`open_source(path)` checks the input eagerly (missing, directory, unreadable, empty, binary, UTF-16/32)
so a command fails before doing any work; `Source.blocks()` then decodes it block by block with a strict
incremental UTF-8 decoder, reporting the absolute byte offset of the first invalid byte.
Text is kept exactly as in the file (no newline translation), so byte offsets are exact.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from ..errors import InputError, UsageError

SNIFF_BYTES = 8192  # how far we look for NUL bytes ("looks binary")
UTF8_BOM = codecs.BOM_UTF8
# Longest first: the UTF-32-LE BOM starts with the UTF-16-LE one.
_FOREIGN_BOMS: tuple[tuple[bytes, str, str], ...] = (
    (codecs.BOM_UTF32_LE, "UTF-32", "little-endian"),
    (codecs.BOM_UTF32_BE, "UTF-32", "big-endian"),
    (codecs.BOM_UTF16_LE, "UTF-16", "little-endian"),
    (codecs.BOM_UTF16_BE, "UTF-16", "big-endian"),
)
STDIN_NAME = "<stdin>"


@dataclass(frozen=True)
class TextBlock:
    """Decoded text and the absolute byte span [byte_start, byte_end) it came from."""

    text: str
    byte_start: int
    byte_end: int


class Source:
    """An opened, already sniffed input. Iterate it once with `blocks()`."""

    def __init__(self, name: str, stream: BinaryIO, *, size: int | None, is_stdin: bool, block_size: int):
        self.name = name
        self.size = size
        self._identity = _file_identity(stream) if size is not None else None
        self.is_stdin = is_stdin
        self.block_size = block_size
        self.bytes_read = 0
        self._stream = stream
        self._hash = hashlib.sha256()
        self._head = b""  # sniffed bytes not yet handed to blocks()
        self._started = False

    # -- reading -----------------------------------------------------------------------------------
    def _read_stream(self, n: int) -> bytes:
        """Read up to n bytes, fewer only at end of input; hash and count them."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = self._stream.read(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        data = b"".join(parts)
        self._hash.update(data)
        self.bytes_read += len(data)
        return data

    def _read(self, n: int) -> bytes:
        """Read n bytes, serving the sniffed head first."""
        head, self._head = self._head[:n], self._head[n:]
        if len(head) == n:
            return head
        return head + self._read_stream(n - len(head))

    def _sniff(self) -> None:
        """Read the first bytes and reject empty, binary and UTF-16/32 input."""
        self._head = self._read_stream(SNIFF_BYTES)
        head = self._head
        if not head:
            raise InputError(f"input is empty: {self.name} (0 bytes)")
        if head == UTF8_BOM:
            raise InputError(f"input is empty: {self.name} (only a UTF-8 byte-order mark)")
        for bom, encoding, order in _FOREIGN_BOMS:
            if head.startswith(bom):
                raise InputError(
                    f"{self.name} is {encoding} text ({order} byte-order mark); longctx reads UTF-8 only. "
                    f"Convert it first, e.g. iconv -f {encoding} -t UTF-8 {self._shell_name()} > converted.txt",
                    hint=f"iconv -f {encoding} -t UTF-8 {self._shell_name()} > converted.txt",
                )
        nul = head.find(b"\x00")
        if nul >= 0:
            raise InputError(
                f"{self.name} looks binary (NUL byte at byte {nul}); longctx reads UTF-8 text only",
                hint="if it is UTF-16 or UTF-32 text without a byte-order mark, convert it with iconv -t UTF-8",
            )

    def _shell_name(self) -> str:
        return "-" if self.is_stdin else self.name

    def blocks(self) -> Iterator[TextBlock]:
        """Yield the decoded text block by block (block_size bytes read at a time).

        A UTF-8 BOM is skipped; its 3 bytes still count, so the first block then starts at byte 3.
        Raises InputError with the absolute byte offset of the first byte that is not valid UTF-8.
        """
        if self._started:
            raise UsageError(f"{self.name} was already read; open it again to re-read it")
        self._started = True
        decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        offset = 0  # absolute offset of the next byte to read
        text_end = 0  # absolute offset just after the last decoded character
        try:
            while True:
                # The first read takes at least 3 bytes so that a BOM is never split.
                data = self._read(self.block_size if offset else max(self.block_size, len(UTF8_BOM)))
                final = not data
                if offset == 0 and data.startswith(UTF8_BOM):
                    data, offset, text_end = data[len(UTF8_BOM) :], len(UTF8_BOM), len(UTF8_BOM)
                if final:
                    self._check_unchanged()
                text = self._decode(decoder, data, offset, final)
                offset += len(data)
                undecoded = len(decoder.getstate()[0])  # bytes of a character split across reads
                if text:
                    yield TextBlock(text, text_end, offset - undecoded)
                text_end = offset - undecoded
                if final:
                    return
        finally:
            self.close()

    def _check_unchanged(self) -> None:
        """A regular file must end as it began: same size and mtime, and exactly `size` bytes read.

        A file that grows or is truncated while being read would give a result that describes no single
        version of it (and a byte count that does not match its hash), so it is refused.
        """
        if self._identity is None:
            return
        now = _file_identity(self._stream)
        if now != self._identity or self.bytes_read != self.size:
            raise InputError(
                f"{self.name} changed while it was being read (size {self.size} -> {now[0]} bytes, "
                f"{self.bytes_read} read); the result would describe no single version of it",
                hint="score a copy that nothing writes to (cp FILE snapshot.txt), or wait until the writer is done",
            )

    def _decode(self, decoder: codecs.IncrementalDecoder, data: bytes, offset: int, final: bool) -> str:
        """Decode one read; on error report the absolute offset of the first bad byte."""
        pending = decoder.getstate()[0]
        try:
            return decoder.decode(data, final=final)
        except UnicodeDecodeError as err:
            bad_at = offset - len(pending) + err.start
            bad_byte = (pending + data)[err.start]
            why = "truncated character at end of input" if final else err.reason
            raise InputError(
                f"{self.name} is not valid UTF-8 at byte {bad_at} (0x{bad_byte:02x}: {why})",
                hint="longctx reads UTF-8 text only; convert the file with iconv -t UTF-8",
            ) from None

    # -- bookkeeping -------------------------------------------------------------------------------
    def sha256_hex(self) -> str:
        """sha256 (hex) of all bytes read from the input so far (the whole input once blocks() is done)."""
        return self._hash.copy().hexdigest()

    def close(self) -> None:
        """Close the underlying file (never stdin)."""
        if not self.is_stdin:
            self._stream.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: str, *, block_size: int = 1 << 20) -> Source:
    """Open `path` ("-" = stdin) for strict UTF-8 streaming; raise InputError for unusable input.

    Checks happen now (not on first read): missing file, directory, no read permission, empty input,
    binary input (a NUL byte in the first 8 KiB), UTF-16/UTF-32 byte-order marks.
    """
    if block_size < 1:
        raise UsageError(f"block size must be at least 1 byte, got {block_size}")
    source = _open_stdin(block_size) if path == "-" else _open_file(path, block_size)
    try:
        source._sniff()
    except BaseException:
        source.close()
        raise
    return source


def check_input(path: str) -> None:
    """The checks of `open_source` (missing, directory, permission, empty, binary, UTF-16/32), done before a
    model loads so that a bad path is refused in a fraction of a second. Standard input and pipes are left
    to the reading itself: sniffing them would consume what the run must read."""
    if os.path.isdir(path):
        raise InputError(f"input is a directory, not a file: {path}")
    if path == "-" or (os.path.exists(path) and not os.path.isfile(path)):
        return  # stdin, a FIFO or another special file
    open_source(path).close()


def _open_stdin(block_size: int) -> Source:
    stdin = sys.stdin
    if stdin is None or not hasattr(stdin, "buffer"):
        raise InputError("cannot read stdin: it is closed or not a byte stream")
    if _isatty(stdin.buffer):
        # Reading would wait for typing; almost always a forgotten pipe.
        raise InputError("no input on stdin (it is a terminal); pipe text in or give a file path")
    return Source(STDIN_NAME, stdin.buffer, size=None, is_stdin=True, block_size=block_size)


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return False


def _file_identity(stream: BinaryIO) -> tuple[int, int]:
    """(size, mtime in ns) of an open regular file: what tells us it changed under us."""
    st = os.fstat(stream.fileno())
    return st.st_size, st.st_mtime_ns


def _open_file(path: str, block_size: int) -> Source:
    if os.path.isdir(path):
        raise InputError(f"input is a directory, not a file: {path}")
    try:
        stream = open(path, "rb")  # the Source owns and closes it
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied") from None
    except OSError as err:
        raise InputError(f"cannot open {path}: {err.strerror or err}") from None
    mode = os.fstat(stream.fileno()).st_mode
    size = os.fstat(stream.fileno()).st_size if stat.S_ISREG(mode) else None  # FIFOs etc.: unknown
    return Source(path, stream, size=size, is_stdin=False, block_size=block_size)
