#!/usr/bin/env python3
"""Fetch a public-domain Jane Austen novel as plain UTF-8 text, using only apt and the stdlib.

The Debian package ``r-cran-janeaustenr`` ships the six novels as R character vectors
(one element per line) in an R lazy-load database (``data/Rdata.rdx`` + ``Rdata.rdb``).
This script downloads the .deb (``apt-get download``; no R needed), unpacks it in Python,
decodes R's XDR serialization and writes ``DIR/austen_<name>.txt``.

    python scripts/fetch_book.py [BOOK ...] [-o DIR] [--all] [--list]
"""
import argparse
import bz2
import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

PACKAGE = "r-cran-janeaustenr"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
NOT_FOUND = ("unable to locate package", "no installation candidate", "can't select candidate")
BOOKS = ["prideprejudice", "emma", "mansfieldpark", "sensesensibility", "persuasion", "northangerabbey"]

# ---------------------------------------------------------------- R serialization reader
NILVALUE_SXP, REFSXP, SYMSXP, LISTSXP, CHARSXP = 254, 255, 1, 2, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 10, 13, 14, 16, 19
HAS_ATTR, HAS_TAG, LATIN1_MASK, BYTES_MASK = 1 << 9, 1 << 10, 1 << 2, 1 << 1
NA_INTEGER = -(2**31)


class RFormatError(ValueError):
    """The data is not (supported) R serialization."""


class RVector(list):
    """An R atomic vector or list: a Python list plus ``rtype`` and an ``attrs`` dict."""

    def __init__(self, values: list, rtype: int, attrs: dict[str, Any] | None = None) -> None:
        super().__init__(values)
        self.rtype, self.attrs = rtype, attrs or {}


class RReader:
    """Decode one object in R's XDR serialization format ('X\\n', versions 2 and 3)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.refs, self.encoding = data, 0, [], "utf-8"

    def take(self, n: int) -> bytes:
        """Consume ``n`` raw bytes."""
        if self.pos + n > len(self.data):
            raise RFormatError(f"truncated R data: need {n} bytes at offset {self.pos}")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def i32(self) -> int:
        """Consume one big-endian signed 32-bit integer."""
        return struct.unpack(">i", self.take(4))[0]

    def read(self) -> Any:
        """Read the header and the top-level object."""
        if self.take(2) != b"X\n":
            raise RFormatError("not R XDR serialization (expected header 'X\\n')")
        version, _writer, _min_reader = self.i32(), self.i32(), self.i32()
        if version == 3:
            self.encoding = self.take(self.i32()).decode("ascii")
        elif version != 2:
            raise RFormatError(f"unsupported R serialization version {version}")
        return self.item()

    def item(self, flags: int | None = None) -> Any:
        """Read one SEXP (its flags word too, unless already read)."""
        flags = self.i32() if flags is None else flags
        sexptype = flags & 0xFF
        if sexptype == NILVALUE_SXP:
            return None
        if sexptype == REFSXP:
            index = (flags >> 8) or self.i32()  # 1-based; packed in the flags or in the next int
            if not 0 < index <= len(self.refs):
                raise RFormatError(f"reference {index} to an unknown object")
            return self.refs[index - 1]
        if sexptype == SYMSXP:
            self.refs.append(self.item())  # a symbol is returned as its name (str)
            return self.refs[-1]
        if sexptype == LISTSXP:
            return self.pairlist(flags)
        if sexptype == CHARSXP:
            return self.charsxp(flags)
        if sexptype in (LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP):
            values = self.vector(sexptype)
            return RVector(values, sexptype, dict(self.item()) if flags & HAS_ATTR else None)
        raise RFormatError(f"unsupported SEXP type {sexptype} before offset {self.pos}")

    def pairlist(self, flags: int) -> list[tuple[str | None, Any]]:
        """Read a pairlist (LISTSXP chain) as ``[(tag, value), ...]``."""
        cells: list[tuple[str | None, Any]] = []
        while True:
            if flags & HAS_ATTR:
                raise RFormatError("attributes on pairlist cells are not supported")
            tag = self.item() if flags & HAS_TAG else None
            cells.append((tag, self.item()))
            flags = self.i32()
            if flags & 0xFF == NILVALUE_SXP:
                return cells
            if flags & 0xFF != LISTSXP:
                raise RFormatError(f"pairlist ends in SEXP type {flags & 0xFF}, not NULL")

    def charsxp(self, flags: int) -> str | bytes | None:
        """Read a CHARSXP: ``None`` for NA, ``bytes`` if marked as bytes, else ``str``."""
        n = self.i32()
        if n == -1:
            return None
        raw, levels = self.take(n), flags >> 12
        if levels & BYTES_MASK:
            return raw
        return raw.decode("latin-1" if levels & LATIN1_MASK else self.encoding)

    def vector(self, sexptype: int) -> list:
        """Read the length and elements of a vector of the given type."""
        n = self.i32()
        if n == -1:  # long vector: two more ints hold the length
            n = (self.i32() << 32) | self.i32()
        if sexptype in (STRSXP, VECSXP):
            return [self.item() for _ in range(n)]
        if sexptype == REALSXP:
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        ints = struct.unpack(f">{n}i", self.take(4 * n))
        if sexptype == LGLSXP:
            return [None if v == NA_INTEGER else bool(v) for v in ints]
        return [None if v == NA_INTEGER else v for v in ints]


def unserialize(data: bytes) -> Any:
    """Decode R XDR-serialized bytes (as inside .rds/.rdb files, uncompressed) to Python."""
    return RReader(data).read()


def named(vec: RVector) -> dict[str, Any]:
    """Turn a named R vector/list into a dict keyed by its ``names`` attribute."""
    return dict(zip(vec.attrs["names"], vec))


# ---------------------------------------------------------------- R lazy-load database
def read_rdx(rdx: bytes) -> dict[str, Any]:
    """Decode a lazy-load index (.rdx): gzip'd, or 4-byte length + zlib."""
    raw = gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:])
    return named(unserialize(raw))


def read_rdb_entry(rdb: bytes, offset: int, length: int, compressed: Any) -> Any:
    """Decode one .rdb block: 4-byte big-endian uncompressed size, [type byte], compressed data."""
    block = rdb[offset:offset + length]
    if not compressed:
        return unserialize(block)
    size, body, kind = struct.unpack(">I", block[:4])[0], block[4:], b"Z"
    if compressed in (2, 3):  # bzip2/xz databases: a type byte ('Z', '2', 'X' or '0') leads
        kind, body = body[:1], body[1:]
    codecs = {b"Z": zlib.decompress, b"2": bz2.decompress, b"0": bytes}
    if kind not in codecs:
        raise RFormatError(f"unsupported .rdb block compression {kind!r}")
    raw = codecs[kind](body)
    if len(raw) != size:
        raise RFormatError(f".rdb block at {offset}: {len(raw)} bytes, header says {size}")
    return unserialize(raw)


def read_lazyload(rdx: bytes, rdb: bytes, names: list[str]) -> dict[str, Any]:
    """Return the requested variables of a lazy-load database."""
    index = read_rdx(rdx)
    variables = named(index["variables"])
    missing = sorted(set(names) - set(variables))
    if missing:
        raise KeyError(f"not in database: {missing}; available: {sorted(variables)}")
    compressed = index["compressed"][0]
    return {n: read_rdb_entry(rdb, *variables[n][:2], compressed) for n in names}


# ---------------------------------------------------------------- .deb handling
def parse_ar(data: bytes) -> dict[str, bytes]:
    """Parse a System V / GNU ``ar`` archive (the .deb container) into {name: bytes}."""
    if data[:8] != b"!<arch>\n":
        raise ValueError("not an ar archive")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        if header[58:60] != b"`\n":
            raise ValueError(f"bad ar member header at offset {pos}")
        name = header[:16].decode("ascii").rstrip().rstrip("/")
        size = int(header[48:58].decode("ascii"))
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    return members


def deb_files(deb: Path, wanted: list[str]) -> dict[str, bytes]:
    """Read files (paths relative to /) out of a .deb, falling back to ``dpkg-deb -x``."""
    members = parse_ar(deb.read_bytes())
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise ValueError(f"{deb}: no data.tar member")
    try:
        with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
            paths = {m.name.removeprefix("./"): m for m in tar.getmembers()}
            return {w: tar.extractfile(paths[w]).read() for w in wanted}
    except (tarfile.ReadError, tarfile.CompressionError):  # e.g. data.tar.zst before Python 3.14
        with tempfile.TemporaryDirectory() as tmp:
            try:
                subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
            except (OSError, subprocess.CalledProcessError) as e:
                sys.exit(f"error: Python cannot read {data_name} and `dpkg-deb -x` failed: {e}")
            return {w: Path(tmp, w).read_bytes() for w in wanted}


def apt_download(dest: Path) -> Path:
    """``apt-get download`` the package into ``dest``, running ``apt-get update`` once if needed."""
    dest.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(dir=dest) as tmp:  # same filesystem: os.replace is atomic
            try:
                proc = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
            except FileNotFoundError:
                proc = subprocess.CompletedProcess([], 127, "", "apt-get: command not found")
                break
            if proc.returncode == 0 and (debs := list(Path(tmp).glob(f"{PACKAGE}_*.deb"))):
                os.replace(debs[0], dest / debs[0].name)
                return dest / debs[0].name
        if attempt == 2 or not any(s in proc.stderr.lower() for s in NOT_FOUND):
            break
        print("apt-get: package not found; running `apt-get update` once", file=sys.stderr)
        subprocess.run(["apt-get", "update"], capture_output=True)
    sys.exit(f"error: `apt-get download {PACKAGE}` failed:\n{proc.stderr.strip()}\n"
             f"Needs Debian/Ubuntu apt with working sources (try `sudo apt-get update`), or copy "
             f"{PACKAGE}_*.deb (e.g. from packages.debian.org) into {dest}/")


def cached_deb(cache: Path) -> Path:
    """Return the cached .deb, downloading it on first use."""
    found = sorted(cache.glob(f"{PACKAGE}_*.deb"))
    return found[-1] if found else apt_download(cache)


# ---------------------------------------------------------------- output
def write_text(path: Path, text: str) -> bool:
    """Atomically write ``text`` as UTF-8; return False if the file already had it."""
    data = text.encode("utf-8")
    if path.exists() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def book_text(lines: RVector) -> str:
    """Join lines with '\\n' (NA -> ''); no final newline, as in the project's shared/data/ copies."""
    return "\n".join(line or "" for line in lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("books", nargs="*", metavar="BOOK", help=f"default: prideprejudice; one of {', '.join(BOOKS)}")
    ap.add_argument("-o", "--out", type=Path, default=Path("books"), help="output folder (default: books/)")
    ap.add_argument("--all", action="store_true", help="fetch all six novels")
    ap.add_argument("--list", action="store_true", help="list the available books and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(BOOKS))
        return 0
    names = BOOKS if args.all else (args.books or ["prideprejudice"])
    if unknown := [n for n in names if n not in BOOKS]:
        ap.error(f"unknown book(s) {unknown}; choose from {BOOKS}")
    args.out.mkdir(parents=True, exist_ok=True)
    deb = cached_deb(args.out / ".cache")
    files = deb_files(deb, [DATA_DIR + "Rdata.rdx", DATA_DIR + "Rdata.rdb"])
    novels = read_lazyload(files[DATA_DIR + "Rdata.rdx"], files[DATA_DIR + "Rdata.rdb"], names)
    for name in names:
        path = args.out / f"austen_{name}.txt"
        changed = write_text(path, book_text(novels[name]))
        print(f"{path}  {path.stat().st_size:,} bytes{'' if changed else ' (unchanged)'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
