"""`longctx text FILE`: print exactly the text the model reads (a PDF's, an HTML page's or a compressed
file's extracted text; a text file as it is), optionally with page marks."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import app
from .exits import _errors_to_exit


@app.command()
@_errors_to_exit
def text(
    file: Annotated[str, typer.Argument(help="A text file, PDF, HTML page or gzip/bz2/xz-compressed text ('-' reads standard input).")],
    pages: Annotated[bool, typer.Option("--pages", help="Mark where each PDF page starts with a line '[p. N]' (the marks are not part of the text read).")] = False,
) -> None:
    """Print the text the model reads from FILE: what `ppl`, `ask` and `generate` see, whose byte offsets
    citations and `memory dump` report.

    The format is detected by content (not by extension); the text of a document is extracted once and kept
    in LONGCTX_HOME/documents.
    """
    from ..text.documents import page_starts
    from ..text.textio import open_source

    out = sys.stdout.buffer  # bytes: the text exactly (no newline translation, UTF-8 whatever the locale)
    marks = list(enumerate(page_starts(file), 1)) if pages and file != "-" else []
    with open_source(file) as src:
        for block in src.blocks():
            out.write(_marked(block.text, block.byte_start, marks).encode("utf-8"))
    out.write("".join(f"\n[p. {n}]\n" for n, _ in marks).encode())  # pages with no text at the very end
    out.flush()


def _marked(text: str, start: int, marks: list[tuple[int, int]]) -> str:
    """`text` (starting at byte `start`) with '[p. N]' lines inserted where pages start; `marks` holds
    (page, byte offset) pairs not yet written and is consumed."""
    if not marks:
        return text
    data, parts, pos = text.encode("utf-8"), [], 0
    while marks and marks[0][1] < start + len(data):
        page, at = marks.pop(0)
        at -= start
        parts.append(data[pos:at].decode("utf-8"))
        parts.append(("\n" if at and not data[:at].endswith(b"\n") else "") + f"[p. {page}]\n")
        pos = at
    return "".join(parts) + data[pos:].decode("utf-8")
