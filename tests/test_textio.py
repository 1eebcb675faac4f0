"""longctx.text.textio: strict, streaming UTF-8 input with exact byte offsets."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import types

import pytest

from longctx.errors import InputError, UsageError
from longctx.text import textio
from longctx.text.textio import TextBlock, open_source

BLOCK_SIZES = [1, 2, 3, 7, 4096]
AWKWARD = "ab\r\ncd\n\ref\tg  h café e\u0301 漢字 😀👩\u200d💻 end\r\n"


def write(tmp_path, data: bytes, name: str = "in.txt") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def read_all(source) -> list[TextBlock]:
    return list(source.blocks())


def fake_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))


# -- open-time errors ---------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="not found") as err:
        open_source(path)
    assert path in err.value.message
    assert err.value.exit_code == 2


def test_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory") as err:
        open_source(str(tmp_path))
    assert str(tmp_path) in err.value.message


def test_permission_denied(tmp_path, monkeypatch):
    path = write(tmp_path, b"hello")

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Root ignores file modes, so simulate the failure at open().
    monkeypatch.setattr(textio, "open", deny, raising=False)
    with pytest.raises(InputError, match="permission denied") as err:
        open_source(path)
    assert path in err.value.message


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read mode-000 files")
def test_permission_denied_real(tmp_path):
    path = write(tmp_path, b"hello")
    os.chmod(path, 0)
    with pytest.raises(InputError, match="permission denied"):
        open_source(path)


def test_empty_file(tmp_path):
    path = write(tmp_path, b"")
    with pytest.raises(InputError, match="empty") as err:
        open_source(path)
    assert path in err.value.message


def test_empty_stdin(monkeypatch):
    fake_stdin(monkeypatch, b"")
    with pytest.raises(InputError, match="empty.*<stdin>"):
        open_source("-")


@pytest.mark.parametrize("nul_at", [0, 100, 8191])
def test_binary(tmp_path, nul_at):
    data = b"a" * nul_at + b"\x00" + b"b" * 50
    path = write(tmp_path, data)
    with pytest.raises(InputError, match="looks binary") as err:
        open_source(path)
    assert path in err.value.message
    assert f"byte {nul_at}" in err.value.message


def test_nul_after_sniff_window_is_text(tmp_path):
    data = b"a" * 8192 + b"\x00z"
    source = open_source(write(tmp_path, data), block_size=1000)
    assert "".join(b.text for b in read_all(source)) == data.decode()


@pytest.mark.parametrize(
    "text, encoding, family",
    [
        ("hello", "utf-16", "UTF-16"),
        ("hello", "utf-16-be-bom", "UTF-16"),
        ("hello", "utf-32", "UTF-32"),
        ("hello", "utf-32-be-bom", "UTF-32"),
    ],
)
def test_utf16_utf32_bom(tmp_path, text, encoding, family):
    boms = {"utf-16-be-bom": (b"\xfe\xff", "utf-16-be"), "utf-32-be-bom": (b"\x00\x00\xfe\xff", "utf-32-be")}
    if encoding in boms:
        bom, codec = boms[encoding]
        data = bom + text.encode(codec)
    else:
        data = text.encode(encoding)  # Python writes a little-endian BOM
    path = write(tmp_path, data)
    with pytest.raises(InputError) as err:
        open_source(path)
    message = err.value.message
    assert family in message and path in message
    assert f"iconv -f {family} -t UTF-8" in message


def test_bad_block_size(tmp_path):
    with pytest.raises(UsageError):
        open_source(write(tmp_path, b"x"), block_size=0)


# -- decoding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_blocks_identical_text_and_exact_offsets(tmp_path, block_size):
    data = AWKWARD.encode() * 5
    source = open_source(write(tmp_path, data), block_size=block_size)
    blocks = read_all(source)
    assert "".join(b.text for b in blocks) == data.decode()  # CRLF and lone CR kept as-is
    pos = 0
    for block in blocks:
        assert block.text
        assert block.byte_start == pos
        assert block.byte_end - block.byte_start == len(block.text.encode())
        pos = block.byte_end
    assert pos == len(data)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_utf8_bom_skipped_but_counted(tmp_path, block_size):
    data = b"\xef\xbb\xbf" + AWKWARD.encode()
    source = open_source(write(tmp_path, data), block_size=block_size)
    blocks = read_all(source)
    assert "".join(b.text for b in blocks) == AWKWARD
    assert blocks[0].byte_start == 3
    assert blocks[-1].byte_end == len(data)


def bad_utf8_cases() -> list[tuple[bytes, int, int]]:
    """(data, offset of the first bad byte, its value)."""
    good = AWKWARD.encode()
    return [
        (b"\xffabc", 0, 0xFF),  # start
        (good + b"\x80" + good, len(good), 0x80),  # middle: stray continuation byte
        (good + b"\xe2\x28\xa1" + good, len(good), 0xE2),  # middle: broken 3-byte sequence
        (good + b"\xc0\xaf", len(good), 0xC0),  # overlong encoding
        (good + b"\xff", len(good), 0xFF),  # last byte
        (good + "€".encode()[:2], len(good), 0xE2),  # truncated character at end of input
        (b"abcdef" + b"\xf0\x9f\x98" + b"x", 6, 0xF0),  # split across a 7-byte block boundary
    ]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("data, offset, byte", bad_utf8_cases())
def test_invalid_utf8_exact_offset(tmp_path, block_size, data, offset, byte):
    source = open_source(write(tmp_path, data), block_size=block_size)
    with pytest.raises(InputError) as err:
        read_all(source)
    assert f"not valid UTF-8 at byte {offset} (0x{byte:02x}" in err.value.message
    assert source.name in err.value.message


def test_invalid_utf8_large_offset(tmp_path):
    data = b"a" * 1234567 + b"\xff" + b"tail"
    source = open_source(write(tmp_path, data), block_size=1 << 16)
    with pytest.raises(InputError, match=r"not valid UTF-8 at byte 1234567 \(0xff"):
        read_all(source)


def test_invalid_utf8_after_bom(tmp_path):
    source = open_source(write(tmp_path, b"\xef\xbb\xbfab\xfe"), block_size=2)
    with pytest.raises(InputError, match=r"at byte 5 \(0xfe"):
        read_all(source)


# -- stdin, hashing, streaming ----------------------------------------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_stdin(monkeypatch, block_size):
    data = AWKWARD.encode() * 3
    fake_stdin(monkeypatch, data)
    source = open_source("-", block_size=block_size)
    assert source.name == "<stdin>" and source.is_stdin and source.size is None
    assert "".join(b.text for b in read_all(source)) == data.decode()
    assert source.sha256_hex() == hashlib.sha256(data).hexdigest()
    assert source.bytes_read == len(data)


def test_file_attributes_and_sha256(tmp_path):
    data = AWKWARD.encode() * 1000
    path = write(tmp_path, data)
    source = open_source(path, block_size=4096)
    assert source.name == path and not source.is_stdin and source.size == len(data)
    read_all(source)
    assert source.sha256_hex() == hashlib.sha256(data).hexdigest()
    assert source.bytes_read == len(data)


def test_sha256_of_prefix_while_streaming(tmp_path):
    data = b"x" * 50_000
    source = open_source(write(tmp_path, data), block_size=10_000)
    blocks = source.blocks()
    next(blocks)
    next(blocks)
    assert source.bytes_read < len(data)
    assert source.sha256_hex() == hashlib.sha256(data[: source.bytes_read]).hexdigest()


def test_blocks_only_once(tmp_path):
    source = open_source(write(tmp_path, b"abc"))
    read_all(source)
    with pytest.raises(UsageError):
        read_all(source)


class RecordingBytesIO(io.BytesIO):
    """Records each read size, to prove the input is streamed."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.sizes: list[int] = []

    def read(self, n: int | None = -1) -> bytes:
        self.sizes.append(-1 if n is None else n)
        return super().read(n)


def test_streaming_reads_are_bounded(monkeypatch):
    data = ("word " * 200_000).encode()  # 1 MB
    stream = RecordingBytesIO(data)
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=stream))
    source = open_source("-", block_size=4096)
    longest = max(len(b.text) for b in source.blocks())
    assert longest <= 4096
    assert all(0 < n <= textio.SNIFF_BYTES for n in stream.sizes)  # never read(-1), never the whole input
