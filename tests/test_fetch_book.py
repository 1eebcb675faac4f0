"""Offline tests for scripts/fetch_book.py: R serialization reader, ar/.deb parsing, CLI."""
import gzip
import importlib.util
import io
import os
import shutil
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fetch_book", ROOT / "scripts" / "fetch_book.py")
fb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fb)

# ------------------------------------------------------------ tiny R XDR serializer
HAS_ATTR, HAS_TAG, UTF8, LATIN1 = 1 << 9, 1 << 10, 1 << 3, 1 << 2


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def header(version: int) -> bytes:
    out = b"X\n" + i32(version, 0x040201, 0x020300)
    return out + (i32(5) + b"UTF-8" if version == 3 else b"")


def charsxp(s: str | None, levels: int = UTF8, encoding: str = "utf-8") -> bytes:
    if s is None:
        return i32(9, -1)
    raw = s.encode(encoding)
    return i32(9 | (levels << 12), len(raw)) + raw


def strsxp(*items: str | None, attrs: bytes = b"") -> bytes:
    flags = 16 | (HAS_ATTR if attrs else 0)
    return i32(flags, len(items)) + b"".join(charsxp(s) for s in items) + attrs


def symbol(name: str) -> bytes:
    return i32(1) + charsxp(name, levels=1 << 6)  # ASCII-marked CHARSXP


def ref(index: int) -> bytes:
    return i32((index << 8) | 255)


def attributes(*cells: tuple[bytes, bytes]) -> bytes:
    """A pairlist of (serialized tag, serialized value) cells, NULL-terminated."""
    return b"".join(i32(2 | HAS_TAG) + tag + value for tag, value in cells) + i32(254)


def named_list(**values: bytes) -> bytes:
    body = i32(19 | HAS_ATTR, len(values)) + b"".join(values.values())
    return body + attributes((symbol("names"), strsxp(*values)))


# ------------------------------------------------------------ R reader
@pytest.mark.parametrize("version", [2, 3])
def test_strsxp(version: int) -> None:
    data = header(version) + strsxp("PRIDE AND PREJUDICE", "", None, "café")
    vec = fb.unserialize(data)
    assert vec == ["PRIDE AND PREJUDICE", "", None, "café"]
    assert vec.rtype == 16 and vec.attrs == {}


def test_latin1_and_bytes_charsxp() -> None:
    data = header(2) + i32(16, 2) + charsxp("café", LATIN1, "latin-1") + charsxp("ab", 1 << 1)
    assert fb.unserialize(data) == ["café", b"ab"]


@pytest.mark.parametrize("version", [2, 3])
def test_named_list_with_attributes_and_refs(version: int) -> None:
    inner = i32(19 | HAS_ATTR, 1) + i32(10, 3) + i32(1, 0, -(2**31))
    inner += attributes((symbol("names"), strsxp("flags")))  # first "names": ref table entry 1
    obj = (
        i32(19 | HAS_ATTR, 3)
        + i32(13, 2) + i32(7, -(2**31))
        + i32(14, 2) + struct.pack(">2d", 1.5, -2.0)
        + inner
        + attributes((ref(1), strsxp("ints", "reals", "sub")),  # "names" again, by reference
                     (symbol("comment"), strsxp("hi")))
    )
    lst = fb.unserialize(header(version) + obj)
    assert lst.rtype == 19 and lst.attrs["comment"] == ["hi"]
    d = fb.named(lst)
    assert d["ints"] == [7, None] and d["reals"] == [1.5, -2.0]
    assert fb.named(d["sub"]) == {"flags": [True, False, None]}


def test_nil_and_long_refindex() -> None:
    assert fb.unserialize(header(2) + i32(254)) is None
    # list(s, s) where the second symbol is a REFSXP with the index in the following int
    data = header(2) + i32(19, 2) + symbol("x") + i32(255, 1)
    assert fb.unserialize(data) == ["x", "x"]


@pytest.mark.parametrize("data, msg", [
    (b"A\n" + i32(2, 0, 0) + i32(254), "XDR"),
    (b"X\n" + i32(4, 0, 0) + i32(254), "version 4"),
    (header(3) + i32(3), "SEXP type 3"),          # CLOSXP
    (header(2) + i32(16, 5) + charsxp("a"), "truncated"),
    (header(2) + i32(2) + i32(254) + i32(16, 0), "pairlist ends"),
    (header(2) + ref(1), "reference 1"),
])
def test_unsupported_input_raises(data: bytes, msg: str) -> None:
    with pytest.raises(fb.RFormatError, match=msg):
        fb.unserialize(data)


# ------------------------------------------------------------ lazy-load DB, ar, .deb
def lazyload_db(objects: dict[str, bytes]) -> tuple[bytes, bytes]:
    """Build (rdx, rdb) the way R's makeLazyLoadDB does (compress=TRUE)."""
    rdb, offsets = b"", {}
    for name, payload in objects.items():
        raw = header(3) + payload
        block = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets[name] = i32(13, 2) + i32(len(rdb), len(block))
        rdb += block
    index = named_list(variables=named_list(**offsets), references=i32(19, 0), compressed=i32(10, 1) + i32(1))
    return gzip.compress(header(3) + index), rdb


def test_lazyload_roundtrip() -> None:
    rdx, rdb = lazyload_db({"emma": strsxp("EMMA", "x"), "persuasion": strsxp("P")})
    assert fb.read_lazyload(rdx, rdb, ["persuasion", "emma"]) == {"persuasion": ["P"], "emma": ["EMMA", "x"]}
    with pytest.raises(KeyError, match="nope"):
        fb.read_lazyload(rdx, rdb, ["nope"])


def ar_archive(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def test_parse_ar() -> None:
    members = {"debian-binary": b"2.0\n", "odd": b"abc", "data.tar.xz": b"\x00" * 10}
    assert fb.parse_ar(ar_archive(members)) == members
    with pytest.raises(ValueError):
        fb.parse_ar(b"not an archive")


def fake_deb(files: dict[str, bytes], compression: str = "xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo("./" + path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return ar_archive({"debian-binary": b"2.0\n", f"data.tar.{compression}": buf.getvalue()})


def write_fake_cache(out: Path, lines: list[str]) -> None:
    rdx, rdb = lazyload_db({"prideprejudice": strsxp(*lines), "emma": strsxp("EMMA")})
    cache = out / ".cache"
    cache.mkdir(parents=True)
    deb = fake_deb({fb.DATA_DIR + "Rdata.rdx": rdx, fb.DATA_DIR + "Rdata.rdb": rdb}, "gz")
    (cache / f"{fb.PACKAGE}_1.0.0-1_all.deb").write_bytes(deb)


def test_deb_files(tmp_path: Path) -> None:
    deb = tmp_path / "x.deb"
    deb.write_bytes(fake_deb({"usr/share/a.txt": b"hello"}))
    assert fb.deb_files(deb, ["usr/share/a.txt"]) == {"usr/share/a.txt": b"hello"}


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_deb_files_zstd_falls_back_to_dpkg_deb(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: z\nVersion: 1\nArchitecture: all\nMaintainer: x <x@example.org>\nDescription: z\n")
    (root / "usr" / "share").mkdir(parents=True)
    (root / "usr" / "share" / "a.txt").write_bytes(b"zstd")
    proc = subprocess.run(["dpkg-deb", "-Zzstd", "--build", str(root), str(tmp_path / "z.deb")], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("this dpkg-deb cannot build zstd packages")
    assert "data.tar.zst" in fb.parse_ar((tmp_path / "z.deb").read_bytes())
    assert fb.deb_files(tmp_path / "z.deb", ["usr/share/a.txt"]) == {"usr/share/a.txt": b"zstd"}


# ------------------------------------------------------------ CLI (offline, from a cached fake .deb)
def test_main_uses_cache_and_writes_atomically(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_fake_cache(tmp_path, ["PRIDE AND PREJUDICE", "", "It is a truth"])
    assert fb.main(["-o", str(tmp_path)]) == 0
    out = tmp_path / "austen_prideprejudice.txt"
    assert out.read_bytes() == b"PRIDE AND PREJUDICE\n\nIt is a truth"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", out.name]  # no temp files left
    mtime = out.stat().st_mtime_ns
    assert fb.main(["prideprejudice", "emma", "-o", str(tmp_path)]) == 0
    assert out.stat().st_mtime_ns == mtime and "(unchanged)" in capsys.readouterr().err
    assert (tmp_path / "austen_emma.txt").read_text() == "EMMA"


def test_apt_failure_updates_once_then_exits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "apt-get"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\necho "E: Unable to locate package $2" >&2\nexit 100\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    with pytest.raises(SystemExit, match="apt-get update"):
        fb.main(["-o", str(tmp_path / "books")])
    assert log.read_text().split("\n")[:3] == [f"download {fb.PACKAGE}", "update", f"download {fb.PACKAGE}"]


# ------------------------------------------------------------ the real package, if cached
def _real_deb() -> Path | None:
    if env := os.environ.get("LONGCTX_TEST_DEB"):
        return Path(env)
    found = sorted((ROOT / "books" / ".cache").glob(f"{fb.PACKAGE}_*.deb"))
    return found[-1] if found else None


@pytest.mark.skipif(_real_deb() is None, reason="no cached r-cran-janeaustenr .deb (set LONGCTX_TEST_DEB)")
def test_real_deb() -> None:
    files = fb.deb_files(_real_deb(), [fb.DATA_DIR + "Rdata.rdx", fb.DATA_DIR + "Rdata.rdb"])
    novels = fb.read_lazyload(files[fb.DATA_DIR + "Rdata.rdx"], files[fb.DATA_DIR + "Rdata.rdb"], fb.BOOKS)
    text = fb.book_text(novels["prideprejudice"])
    assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen")
    assert 600_000 < len(text.encode()) < 750_000
    assert all(len(novels[b]) > 5000 for b in fb.BOOKS)
