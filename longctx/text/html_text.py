"""The visible text of an HTML page, with the standard library's tolerant `html.parser`.

Why the standard library: the reading text must be deterministic and its extractor named by version in a
document's identity; `html.parser` is versioned with Python itself, needs no compiled dependency, and
handles broken markup the way browsers' tokenizers do for text. What it does not do (and trafilatura
does) is guess which part of a page is the article: longctx reads the whole visible text, menus included,
which is what a user who passes a page expects to be read.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

# contents never shown as text
_HIDDEN = {"script", "style", "noscript", "template", "svg", "head", "iframe", "object"}
# elements that start a new paragraph of text
_BLOCKS = {"address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption", "figure",
           "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre",
           "section", "table", "td", "th", "title", "tr", "ul", "body"}
_SPACE = re.compile(r"\s+")


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._run: list[str] = []
        self._hidden = 0  # depth inside hidden elements
        self._pre = 0
        self._title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._title = True  # the title is inside <head> but is the page's first line of text
        if tag in _HIDDEN:
            self._hidden += 1
        if tag in _BLOCKS:
            self._flush()
        self._pre += tag == "pre"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN and self._hidden:
            self._hidden -= 1
        if tag == "title":
            self._title = False
        if tag in _BLOCKS:
            self._flush()
        if tag == "pre" and self._pre:
            self._pre -= 1

    def handle_data(self, data: str) -> None:
        if self._hidden and not self._title:
            return
        self._run.append(data if self._pre else _SPACE.sub(" ", data))

    def _flush(self) -> None:
        text = "".join(self._run)
        self._run = []
        text = text.strip("\n") if self._pre else text.strip()
        if text.strip():
            self.paragraphs.append(text)

    def close(self) -> None:
        super().close()
        self._flush()


def html_to_text(html: str) -> str:
    """Visible text of `html`: one paragraph per block element, blank lines between, spaces collapsed."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    return "\n\n".join(parser.paragraphs) + ("\n" if parser.paragraphs else "")
