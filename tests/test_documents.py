"""Documents, not only text files: PDF, HTML and compressed text read as their extracted text, with pages."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest
from pdf_maker import make_pdf
from typer.testing import CliRunner

from longctx.cli import app
from longctx.errors import InputError
from longctx.storage.checkpoint import document_identity
from longctx.storage.hashing import file_sha256
from longctx.text import documents
from longctx.text.documents import extract, location, page_label, sniff_format
from longctx.text.textio import open_source

runner = CliRunner()
PAGES = [f"Page {i} of the report. " + " ".join(f"word{i}x{j}" for j in range(60)) for i in range(1, 5)]
PAGES[2] = "The secret code is 4417. It is kept on page three.\n" + PAGES[2]
HTML = ("<!DOCTYPE html><html><head><title>A Report</title><style>p {color: red}</style>"
        "<script>var hidden = 1;</script></head><body><h1>Findings</h1><p>The harvest was  early\n this year."
        "</p><div>Rain &amp; sun<br>in turn.</div><noscript>enable js</noscript></body></html>")


def read_all(path: str) -> str:
    with open_source(path) as src:
        return "".join(b.text for b in src.blocks())


@pytest.fixture
def pdf(tmp_path) -> str:
    p = tmp_path / "report.pdf"
    p.write_bytes(make_pdf(PAGES))
    return str(p)


def test_format_is_detected_by_content_not_extension(tmp_path, pdf):
    text = tmp_path / "a.txt"
    text.write_text("plain words\n")
    disguised = tmp_path / "report.txt"
    disguised.write_bytes(Path(pdf).read_bytes())
    page = tmp_path / "page.dat"
    page.write_text(HTML)
    packed = {fmt: tmp_path / f"t.{fmt}" for fmt in ("gzip", "bz2", "xz")}
    packed["gzip"].write_bytes(gzip.compress(b"x"))
    packed["bz2"].write_bytes(bz2.compress(b"x"))
    packed["xz"].write_bytes(lzma.compress(b"x"))
    assert sniff_format(str(text)) is None and sniff_format("-") is None
    assert sniff_format(str(disguised)) == "pdf" and sniff_format(str(page)) == "html"
    assert {fmt: sniff_format(str(p)) for fmt, p in packed.items()} == {f: f for f in packed}


def test_pdf_text_and_page_map(pdf):
    doc = extract(pdf)
    text = Path(doc.text_path).read_bytes()
    assert read_all(pdf) == text.decode()
    assert len(doc.pages) == 4 and doc.pages[0] == 0
    for i, start in enumerate(doc.pages):  # each page's text starts where the map says
        assert text[start:].decode().startswith(PAGES[i].split("\n")[0][:20])
    at = text.index(b"4417")
    assert location(pdf, at, at + 4) == "p. 3"
    assert location(pdf, doc.pages[1] - 5, doc.pages[2] + 1) == "pp. 1-3"
    assert page_label((), 0, 5) == ""
    assert doc.identity["format"] == "pdf" and doc.identity["sha256"] == file_sha256(pdf)
    assert doc.identity["extractor"].startswith("pypdf ")


def test_html_visible_text_only(tmp_path):
    page = tmp_path / "page.html"
    page.write_text(HTML)
    assert read_all(str(page)) == "A Report\n\nFindings\n\nThe harvest was early this year.\n\nRain & sun\n\nin turn.\n"


@pytest.mark.parametrize("fmt,pack", [("gzip", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)])
def test_compressed_text_reads_as_the_original(tmp_path, fmt, pack):
    original = "Ünïcode text, line one.\nLine two.\n" * 500
    p = tmp_path / f"book.txt.{fmt}"
    p.write_bytes(pack(original.encode()))
    assert read_all(str(p)) == original


def test_longctx_text_prints_what_the_model_reads(pdf, tmp_path):
    r = runner.invoke(app, ["text", pdf])
    assert r.exit_code == 0, r.output
    assert r.stdout == Path(extract(pdf).text_path).read_text()
    marked = runner.invoke(app, ["text", pdf, "--pages"]).stdout
    assert [line for line in marked.splitlines() if line.startswith("[p. ")] == ["[p. 1]", "[p. 2]", "[p. 3]", "[p. 4]"]
    assert marked.split("[p. 3]\n")[1].startswith("The secret code is 4417")
    plain = tmp_path / "plain.txt"
    plain.write_text("as it is\r\n")
    assert runner.invoke(app, ["text", str(plain), "--pages"]).stdout_bytes == b"as it is\r\n"  # bytes as they are


def bad_documents(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    import pypdf

    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage")
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(_write(tmp_path / "plain.pdf", make_pdf(["secret"]))))
    writer.encrypt("pw", algorithm="RC4-128")
    encrypted = tmp_path / "locked.pdf"
    with open(encrypted, "wb") as f:
        writer.write(f)
    blank = _write(tmp_path / "scan.pdf", make_pdf([""]))
    gz = _write(tmp_path / "cut.txt.gz", gzip.compress(b"some text " * 1000)[:-30])
    xz = _write(tmp_path / "bad.xz", b"\xfd7zXZ\x00" + b"\x00" * 40)
    empty_html = _write(tmp_path / "app.html", b"<!doctype html><html><body><script>render()</script></body></html>")
    not_utf8 = _write(tmp_path / "latin.gz", gzip.compress("caf\u00e9".encode("latin-1")))
    return {"broken": (broken, "not a readable PDF"), "encrypted": (encrypted, "encrypted PDF"),
            "blank": (blank, "has no text to read"), "gz": (gz, "damaged gzip"), "xz": (xz, "damaged xz"),
            "html": (empty_html, "has no text to read"), "utf8": (not_utf8, "not valid UTF-8 at byte 3")}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_documents_exit_2_with_one_line_and_store_nothing(tmp_path, isolated_home, model_dir):
    for name, (path, message) in bad_documents(tmp_path).items():
        with pytest.raises(InputError, match=message):
            extract(str(path))
        for args in (["text", str(path)], ["ppl", str(path), "--model", model_dir, "--save-memory", "m"],
                     ["ask", str(path), "what?", "--model", model_dir]):
            r = runner.invoke(app, args)
            assert r.exit_code == 2, (name, args, r.output)
            assert message in r.stderr and "Traceback" not in r.output and r.stdout == "", (name, r.stderr)
    assert not list((isolated_home / "documents").glob("*"))  # no text, no page map, no partial file
    assert not (isolated_home / "snapshots").exists() or not any((isolated_home / "snapshots").iterdir())


def test_plain_text_identity_is_unchanged(tmp_path):
    p = tmp_path / "book.txt"
    p.write_bytes(b"plain text, as before\n" * 20)
    doc = document_identity(str(p), 100)
    assert "source" not in doc
    assert doc["size"] == p.stat().st_size and doc["sha256_prefix"] == file_sha256(p, limit=100)


def test_ppl_on_compressed_text_equals_the_text(tmp_path, model_dir):
    text = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 40).encode()
    plain, packed = tmp_path / "a.txt", tmp_path / "a.txt.gz"
    plain.write_bytes(text)
    packed.write_bytes(gzip.compress(text))
    base = ["--model", model_dir, "--segment", "64", "-m", "xl", "--json", "--no-progress"]
    a = json.loads(runner.invoke(app, ["ppl", str(plain), *base]).stdout)["runs"][0]
    b = json.loads(runner.invoke(app, ["ppl", str(packed), *base]).stdout)["runs"][0]
    assert a["token_sha256"] == b["token_sha256"] and a["tokens"] == b["tokens"] > 500
    assert a["ppl"] == b["ppl"] and a["bits_per_byte"] == b["bits_per_byte"]


def test_pdf_resume_checks_source_and_extractor(pdf, model_dir, monkeypatch):
    base = ["--model", model_dir, "--segment", "32", "-m", "xl", "--no-progress"]
    r = runner.invoke(app, ["ppl", pdf, *base, "--max-tokens", "64", "--save-memory", "rep"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["ppl", pdf, *base, "--max-tokens", "128", "--resume", "rep"])
    assert r.exit_code == 0, r.output
    with monkeypatch.context() as m:
        m.setattr(documents, "EXTRACTION_VERSION", 99)  # as if another extractor version were installed
        r = runner.invoke(app, ["ppl", pdf, *base, "--max-tokens", "192", "--resume", "rep"])
    assert r.exit_code == 2 and "extracts it with" in r.stderr and "longctx v99" in r.stderr, r.output
    Path(pdf).write_bytes(make_pdf([*PAGES, "one more page"]))
    r = runner.invoke(app, ["ppl", pdf, *base, "--max-tokens", "192", "--resume", "rep"])
    assert r.exit_code == 2 and "the document changed" in r.stderr, r.output


def test_memory_dump_and_citations_name_pdf_pages(pdf, model_dir):
    r = runner.invoke(app, ["ppl", pdf, "--model", model_dir, "--segment", "32", "-m", "xl", "--no-progress",
                            "--save-memory", "rep"])
    assert r.exit_code == 0, r.output
    dump = runner.invoke(app, ["memory", "dump", "rep", "--json"])
    assert dump.exit_code == 0, dump.output
    groups = json.loads(dump.stdout)["groups"]
    text = Path(extract(pdf).text_path).read_bytes()
    for g in groups:
        if g["tokens"][0] < g["tokens"][1]:
            assert g["page"] == location(pdf, g["byte_start"], g["byte_last_token"] + 1) and g["page"].startswith("p")
            assert g["excerpt"].split()[0] in text[g["byte_start"]:].decode(errors="replace")
    r = runner.invoke(app, ["ask", pdf, "What is the secret code?", "--model", model_dir, "--segment", "32",
                            "-o", "window=32", "-o", "memory=256", "--max-new-tokens", "4", "--cite", "--no-progress"])
    assert r.exit_code == 0, r.output
    cited = [line for line in r.stdout.splitlines() if line.startswith("[retrieved")]
    assert cited and all(", bytes " in line and "] p" in line for line in cited), r.stdout
    for line in cited:  # the page named is the page of the span's first byte
        span = line.split("bytes ")[1].split(":")[0].split()[0]
        lo, hi = map(int, span.split("-"))
        assert line.split("] ")[1].startswith(location(pdf, lo, hi) + ", bytes")


def test_many_documents_mix_pdf_html_and_compressed(pdf, tmp_path, model_dir):
    page = tmp_path / "page.html"
    page.write_text(HTML.replace("</body>", "<p>" + "More words on the page. " * 30 + "</p></body>"))
    packed = tmp_path / "t.txt.bz2"
    packed.write_bytes(bz2.compress(b"Compressed words, read as text. " * 40))
    r = runner.invoke(app, ["ppl", pdf, str(page), str(packed), "--model", model_dir, "--segment", "32",
                            "-m", "window", "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    files = json.loads(r.stdout)["files"]
    texts = [Path(extract(p).text_path) for p in (pdf, str(page), str(packed))]
    assert [f["size"] for f in files] == [t.stat().st_size for t in texts]  # sizes of the text read
    assert [f["sha256"] for f in files] == [file_sha256(t) for t in texts]


def test_documents_on_stdin_are_refused_and_piped_html_stays_text(pdf):
    r = runner.invoke(app, ["text", "-"], input=Path(pdf).read_bytes())
    assert r.exit_code == 2 and "<stdin> holds a pdf document" in r.stderr, r.output
    r = runner.invoke(app, ["text", "-"], input=gzip.compress(b"words"))
    assert r.exit_code == 2 and "holds a gzip document" in r.stderr, r.output
    r = runner.invoke(app, ["text", "-"], input=HTML.encode())
    assert r.exit_code == 0 and r.stdout == HTML, r.output


def test_xhtml_with_an_xml_declaration_is_html(tmp_path):
    page = tmp_path / "page.xhtml"
    page.write_text('<?xml version="1.0" encoding="utf-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml"><body>'
                    "<p>Hello there.</p></body></html>")
    assert sniff_format(str(page)) == "html" and read_all(str(page)) == "Hello there.\n"


def test_a_source_is_hashed_once_while_unchanged(tmp_path, monkeypatch, isolated_home):
    """A run asks for a document's text, identity and pages many times: the source is hashed once, and again
    only when its stat signature changes; a file modified moments ago is hashed every time (racy mtime)."""
    calls: list[str] = []

    def counting(path, limit=None):
        calls.append(path)
        return file_sha256(path, limit=limit)

    monkeypatch.setattr(documents, "file_sha256", counting)
    src = tmp_path / "doc.txt.gz"
    src.write_bytes(gzip.compress(b"first text\n"))
    extract(str(src)), extract(str(src))
    assert len(calls) == 2  # just written: not trusted to stay unchanged within its mtime tick

    monkeypatch.setattr(documents, "_RACY_NS", -(10**18))  # as if written long before it was hashed
    documents._HASHED.clear()
    calls.clear()
    first = extract(str(src))
    assert extract(str(src)).identity == first.identity and len(calls) == 1
    src.write_bytes(gzip.compress(b"the second, longer text\n"))
    second = extract(str(src))
    assert len(calls) == 2 and second.identity["sha256"] != first.identity["sha256"]
