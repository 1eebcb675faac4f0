"""Documents, not only text files: PDF, HTML and gzip/bz2/xz-compressed text, detected by content.

A document's *text* (what the model reads) is extracted once, deterministically, into
`LONGCTX_HOME/documents/<source sha256>-<extractor>.txt` (UTF-8), with a page map beside it for PDFs.
Every byte offset longctx reports for a document (tokens, snapshots, citations, `memory dump`) is an
offset into that text, so excerpts read it back and a PDF offset maps to its page. Plain text files are
not copied: their text path is the file itself, and everything about them is as before.

The cache is keyed by the source's sha256 *and* the extractor's name and version, so a changed source or
another extractor gives another text (and `source_identity` tells a resume which one it was made from).
Nothing is written for input that fails: extraction goes to a temporary file renamed into place only
once the text is complete and valid.
"""

from __future__ import annotations

import bisect
import bz2
import codecs
import gzip
import io
import json
import lzma
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from ..errors import InputError
from ..storage.hashing import file_sha256
from .html_text import html_to_text

EXTRACTION_VERSION = 1  # bump when longctx's own assembly of the text (page joins, HTML blocks) changes
PAGE_JOIN = "\n\n"  # between two PDF pages' texts
BLOCK = 1 << 20

# magic bytes -> format; HTML has no magic number, so it is recognised by its first tag (below)
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "pdf"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
)
_HTML_START = re.compile(rb"^(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*(?:<!doctype\s+html|<html[\s>])",
                         re.I | re.S)
_COMPRESSED: dict[str, Callable[[str], io.BufferedIOBase]] = {
    "gzip": lambda p: gzip.open(p, "rb"),
    "bz2": lambda p: bz2.open(p, "rb"),
    "xz": lambda p: lzma.open(p, "rb"),
}
_BROKEN = (EOFError, OSError, lzma.LZMAError, ValueError)  # what a damaged compressed stream raises


@dataclass(frozen=True)
class Extracted:
    """A document's extracted text on disk, its page starts (PDF only) and what it was made from."""

    source: str  # the document's path as given
    format: str  # pdf, html, gzip, bz2, xz
    text_path: str
    pages: tuple[int, ...]  # byte offset in the text where each page starts (empty: no pages)
    identity: dict[str, Any]  # {"format", "sha256", "size", "extractor"}: what a resume must find again


def sniff_format(path: str) -> str | None:
    """The document format of the file at `path` by its first bytes, or None for (plain) text."""
    if path == "-" or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            return format_of(f.read(1024))
    except OSError:
        return None  # the text reader reports it with its own message


def format_of(head: bytes) -> str | None:
    """The document format that a file starting with `head` has, or None for (plain) text."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return "html" if _HTML_START.match(head) else None


def extractor_name(fmt: str) -> str:
    """The extractor and its version, e.g. 'pypdf 7.1.0 (longctx v1)': part of a document's identity."""
    if fmt == "pdf":
        import pypdf

        lib = f"pypdf {pypdf.__version__}"
    elif fmt == "html":
        lib = f"html.parser (python {sys.version_info[0]}.{sys.version_info[1]})"
    else:
        lib = f"{fmt} (python {sys.version_info[0]}.{sys.version_info[1]})"
    return f"{lib} (longctx v{EXTRACTION_VERSION})"


def text_path(path: str) -> str:
    """The file whose bytes the model reads: the extracted text of a document, else `path` itself."""
    return extract(path).text_path if sniff_format(path) else path


def source_identity(path: str) -> dict[str, Any] | None:
    """{"format", "sha256", "size", "extractor"} of a document, None for plain text or stdin."""
    return extract(path).identity if sniff_format(path) else None


def page_starts(path: str) -> tuple[int, ...]:
    """Byte offsets (in the text) where each page starts; empty unless `path` is a PDF."""
    return extract(path).pages if sniff_format(path) == "pdf" else ()


def location(path: str | None, start: int, end: int) -> str:
    """'p. 12' or 'pp. 12-13' for a text span [start, end) of a PDF; '' for everything else."""
    if not path:
        return ""
    try:
        pages = page_starts(path)
    except (InputError, OSError):  # the source is gone or changed: no page to name
        return ""
    return page_label(pages, start, end)


def page_label(pages: tuple[int, ...] | list[int], start: int, end: int) -> str:
    """The page label of a span given page starts ('' without pages)."""
    if not pages:
        return ""
    first = bisect.bisect_right(pages, start)
    last = bisect.bisect_right(pages, max(start, end - 1))
    return f"p. {first}" if first == last else f"pp. {first}-{last}"


def extract(path: str) -> Extracted:
    """Extract (or find in the cache) the text of the document at `path`; InputError if it has none."""
    fmt = sniff_format(path)
    if fmt is None:
        raise InputError(f"{path} is not a PDF, HTML or compressed document")
    sha, size = _source_sha256(path)
    extractor = extractor_name(fmt)
    identity = {"format": fmt, "sha256": sha, "size": size, "extractor": extractor}
    stem = f"{sha}-{re.sub(r'[^A-Za-z0-9.]+', '-', extractor).strip('-')}"
    text, pages_file = _cache_dir() / f"{stem}.txt", _cache_dir() / f"{stem}.pages.json"
    if not text.is_file() or (fmt == "pdf" and not pages_file.is_file()):
        _write(path, fmt, text, pages_file)
    pages = tuple(json.loads(pages_file.read_text())["pages"]) if fmt == "pdf" else ()
    return Extracted(path, fmt, str(text), pages, identity)


# path -> (stat signature, sha256, size): one run asks for a document's text, identity and pages many times
_HASHED: dict[str, tuple[tuple[int, ...], str, int]] = {}
_RACY_NS = 2_000_000_000  # a file modified this close to its hashing may change again within one mtime tick


def _source_sha256(path: str) -> tuple[str, int]:
    """sha256 and size of the source file, hashed once per process while its stat signature is unchanged.

    The signature (device, inode, size, mtime, ctime) is trusted only for files last modified well before they
    were hashed: a write within the same timestamp tick could otherwise leave the signature unchanged."""
    st = os.stat(path)
    signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    key = os.path.realpath(path)
    known = _HASHED.get(key)
    if known is not None and known[0] == signature:
        return known[1], known[2]
    hashed_at = time.time_ns()
    sha = file_sha256(path)
    if hashed_at - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        _HASHED[key] = (signature, sha, st.st_size)
    return sha, st.st_size


def _cache_dir() -> Path:
    from ..storage.paths import longctx_home

    d = longctx_home() / "documents"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write(path: str, fmt: str, text: Path, pages_file: Path) -> None:
    """Extract into temporary files in the cache directory, then rename them into place (text last)."""
    fd, tmp = tempfile.mkstemp(dir=text.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            pages = _extract_pdf(path, out) if fmt == "pdf" else None
            if fmt == "html":
                out.write(_extract_html(path).encode("utf-8"))
            elif fmt in _COMPRESSED:
                _decompress(path, fmt, out)
        _check_text(path, fmt, tmp)
        if pages is not None:  # the page map first, also by rename: a reader finds both files whole or none
            with open(tmp + ".pages", "w") as f:
                json.dump({"pages": pages}, f)
            os.replace(tmp + ".pages", pages_file)
        os.replace(tmp, text)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_text(path: str, fmt: str, tmp: str) -> None:
    """The text must be non-empty UTF-8 with words in it (decompressed input is checked strictly)."""
    from .textio import open_text_file

    what = "decompressed text" if fmt in _COMPRESSED else "extracted text"
    words = False
    if os.path.getsize(tmp):
        with open_text_file(tmp, name=f"{path} ({what})") as src:
            for block in src.blocks():  # read to the end: every byte must be valid UTF-8
                words = words or not block.text.isspace()
    if not words:
        hint = {"pdf": "a scanned PDF holds images of pages; run OCR on it first (e.g. ocrmypdf)",
                "html": "a page built by JavaScript holds no text until a browser runs it; save the rendered page"}
        raise InputError(f"{path} has no text to read ({fmt}: its {what} is empty or only whitespace)",
                         hint=hint.get(fmt))


def _extract_pdf(path: str, out: BinaryIO) -> list[int]:
    """Write each page's text, pages separated by a blank line; return each page's starting byte offset."""
    import pypdf

    try:
        reader = pypdf.PdfReader(path, strict=False)
        if reader.is_encrypted:
            raise InputError(f"{path} is an encrypted PDF; longctx does not decrypt documents",
                             hint="save an unencrypted copy first, e.g. qpdf --decrypt in.pdf out.pdf")
        starts, offset = [], 0
        for i, page in enumerate(reader.pages):
            # NUL never belongs in reading text, and the text reader would take it for binary data
            chunk = ((PAGE_JOIN if i else "") + (page.extract_text() or "").rstrip().replace("\x00", "")).encode()
            starts.append(offset + (len(PAGE_JOIN) if i else 0))
            out.write(chunk)
            offset += len(chunk)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged PDF makes the parser fail in many ways; all mean the same
        raise InputError(f"{path} is not a readable PDF ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if not starts:
        raise InputError(f"{path} is a PDF without pages")
    return starts


def _extract_html(path: str) -> str:
    """The visible text of an HTML file (UTF-8, or the charset its <meta> declares)."""
    raw = Path(path).read_bytes()
    declared = re.search(rb"<meta[^>]*charset=[\"']?([A-Za-z0-9_-]+)", raw[:4096], re.I)
    encoding = declared.group(1).decode("ascii") if declared else "utf-8"
    try:
        codecs.lookup(encoding)
        html = raw.decode(encoding)
    except LookupError:
        raise InputError(f"{path} declares an unknown character set '{encoding}'") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not valid {encoding} at byte {e.start} (HTML)") from None
    return html_to_text(html.removeprefix("\ufeff"))


def _decompress(path: str, fmt: str, out: BinaryIO) -> None:
    """Stream the decompressed bytes to `out` block by block (memory stays O(block))."""
    try:
        with _COMPRESSED[fmt](path) as f:
            while block := f.read(BLOCK):
                out.write(block)
    except _BROKEN as e:
        raise InputError(f"{path} is a damaged {fmt} file ({type(e).__name__}: {e})".replace("\n", " ")) from None
