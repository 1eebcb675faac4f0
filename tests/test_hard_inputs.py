"""The hard-input catalogue (docs/hard-inputs.md): every bad or awkward input gets a documented exit code,
a message that says what to do, and loses or overwrites nothing.

Entries already covered elsewhere are named in the catalogue and not repeated here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizers import byte_bpe_tokenizer, sample_text, sentencepiece_tokenizer
from typer.testing import CliRunner

import longctx
from longctx.cli import app
from longctx.errors import InputError, ModelError
from longctx.interrupts import stop_after
from longctx.model.backbone import Backbone, ModelInfo
from longctx.storage.checkpoint import Interrupted
from longctx.storage.snapshot import SnapshotError, SnapshotStore
from longctx.text import textio
from longctx.text.textio import open_source
from longctx.text.tokens import concat_chunks, iter_tokens

runner = CliRunner()


def ppl(*args: str, input: str | bytes | None = None):
    return runner.invoke(app, ["ppl", *args], input=input)


def snapshots(home: Path) -> list[str]:
    """Snapshot names in the isolated LONGCTX_HOME (nothing may appear after a refused input)."""
    root = home / "snapshots"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def assert_refused(r, code: int, needle: str, home: Path) -> None:
    """Exit code, message on stderr, no traceback, no result on stdout, no snapshot written."""
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert snapshots(home) == []


@pytest.fixture
def book(tmp_path) -> str:
    p = tmp_path / "book.txt"
    p.write_text(sample_text(3000), encoding="utf-8")
    return str(p)


# -- the document's bytes ------------------------------------------------------------------------------
BAD_DOCUMENTS = {
    "empty": (b"", "input is empty"),
    "utf8-bom-only": (b"\xef\xbb\xbf", "only a UTF-8 byte-order mark"),
    "whitespace-only": (b"  \n\t \r\n   \n", "contains only whitespace (11 bytes)"),
    "one-token": (b"a", "has 1 token(s); at least 2 are needed"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary (NUL byte at byte 8)"),
    "nul-early": (b"some text\x00more text", "NUL byte at byte 9"),
    "utf8-invalid-start": (b"\xffhello world", "not valid UTF-8 at byte 0 (0xff: invalid start byte)"),
    "utf8-invalid-middle": (b"hello " * 10 + b"\xc3\x28 world", "not valid UTF-8 at byte 60 (0xc3: invalid continuation byte)"),
    "utf8-invalid-end": ("hello world ".encode() + "€".encode()[:2], "at byte 12 (0xe2: truncated character at end of input)"),
    "utf16-bom": ("hello world".encode("utf-16"), "is UTF-16 text (little-endian byte-order mark)"),
    "utf32-bom": ("hello world".encode("utf-32"), "is UTF-32 text (little-endian byte-order mark)"),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCUMENTS))
def test_bad_document_exit_2(model_dir, tmp_path, isolated_home, case):
    content, needle = BAD_DOCUMENTS[case]
    p = tmp_path / "doc.txt"
    p.write_bytes(content)
    r = ppl(str(p), "--model", model_dir)
    assert_refused(r, 2, needle, isolated_home)
    assert p.read_bytes() == content


def test_utf16_hint_gives_the_iconv_command(model_dir, tmp_path, isolated_home):
    p = tmp_path / "u16.txt"
    p.write_bytes("hello".encode("utf-16"))
    r = ppl(str(p), "--model", model_dir)
    assert_refused(r, 2, f"iconv -f UTF-16 -t UTF-8 {p} > converted.txt", isolated_home)


# -- the path ------------------------------------------------------------------------------------------
def test_unusable_paths_exit_2(model_dir, tmp_path, isolated_home):
    assert_refused(ppl(str(tmp_path / "nope.txt"), "--model", model_dir), 2, "input file not found", isolated_home)
    assert_refused(ppl(str(tmp_path), "--model", model_dir), 2, "input is a directory, not a file", isolated_home)


def test_permission_denied_exit_2(model_dir, book, isolated_home, monkeypatch):
    # The tests run as root here, which reads mode-000 files; test_textio has the real chmod test (skipped as root).
    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(textio, "open", deny, raising=False)
    assert_refused(ppl(book, "--model", model_dir), 2, f"cannot read {book}: permission denied", isolated_home)


def test_stdin_is_a_terminal_exit_2(model_dir, isolated_home, monkeypatch):
    monkeypatch.setattr(textio, "_isatty", lambda stream: True)
    assert_refused(ppl("-", "--model", model_dir), 2, "no input on stdin (it is a terminal)", isolated_home)


@pytest.mark.parametrize("change", ["grow", "truncate", "rewrite"])
def test_file_changed_while_read_is_refused(tiny_backbone, tmp_path, change):
    doc = tmp_path / "live.txt"
    original = sample_text(12_000).encode()  # > min_chars: scoring starts before the reader reaches the end
    doc.write_bytes(original)

    def writer(ev):  # another process writes while longctx is half-way through
        if ev.index == 0:
            if change == "grow":
                with open(doc, "ab") as f:
                    f.write(b" and more text arrives")
            elif change == "truncate":
                os.truncate(doc, 100)
            else:  # same size, new content: only the mtime tells
                doc.write_bytes(original.upper())
                os.utime(doc, ns=(0, 10**9))

    with pytest.raises(InputError, match="changed while it was being read") as err:
        longctx.perplexity(str(doc), ["window"], backbone=tiny_backbone, segment=256, on_segment=writer)
    assert err.value.exit_code == 2 and "score a copy" in err.value.hint


def test_huge_single_line_streams_in_constant_memory(tmp_path):
    """512 KiB in one line (the 200 MB case behaves the same: memory is bounded by the 64 Ki-char slices)."""
    unit = sample_text(20_000).replace("\n", " ")
    data = (unit * (2**19 // len(unit) + 1))[: 2**19].encode()
    p = tmp_path / "line.txt"
    p.write_bytes(data)
    tok = byte_bpe_tokenizer()
    tracemalloc.start()
    try:
        with open_source(str(p), block_size=1 << 16) as src:
            chunks = list(iter_tokens(tok, src.blocks()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole = concat_chunks(chunks)
    assert int(whole.token_bytes().sum()) == len(data) and whole.byte_end == len(data)
    assert len(chunks) > 10  # committed piecewise, not at the end
    token_arrays = 2 * 8 * len(whole)  # the test itself keeps every chunk (ids + offsets)
    assert peak - token_arrays < 24 * 2**20, peak


def _feed_fifo(path: Path, data: bytes) -> threading.Thread:
    def write():
        with open(path, "wb") as f:  # blocks until longctx opens the pipe
            f.write(data)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("methods", [["-m", "window"], ["--compare", "window,xl"]])
def test_fifo_is_read_once(model_dir, tmp_path, isolated_home, methods):
    """A named pipe (or `<(cmd)`) can be read once: one method streams it; --compare spools it first."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    data = sample_text(2000).encode()
    writer = _feed_fifo(fifo, data)
    r = ppl(str(fifo), "--model", model_dir, "--segment", "64", "--json", *methods)
    writer.join(timeout=10)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["source"]["sha256_prefix"] == hashlib.sha256(data).hexdigest()
    assert len({run["token_sha256"] for run in out["runs"]}) == 1


def test_crlf_and_mixed_newlines_are_kept_byte_exact(tiny_backbone, tmp_path):
    text = "first line\r\nsecond\rthird\nfourth\r\n\r\n" * 40 + "end"
    doc = tmp_path / "crlf.txt"
    doc.write_bytes(text.encode())  # no newline translation anywhere
    report = longctx.perplexity(str(doc), ["window"], backbone=tiny_backbone, segment=32)
    ids = tiny_backbone.tokenizer(text)["input_ids"]
    run = report.runs[0].to_dict()
    assert report.source["end_byte"] == report.source["bytes_hashed"] == len(text.encode())
    assert run["tokens"] == len(ids) - 1
    first = tiny_backbone.tokenizer.decode(ids[:1])
    assert run["bytes"] == len(text.encode()) - len(first.encode())


def test_document_shorter_than_one_segment(model_dir, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("A short note, far below one segment.", encoding="utf-8")
    r = ppl(str(p), "--model", model_dir, "--segment", "512", "--json")
    assert r.exit_code == 0, r.stderr
    run = json.loads(r.stdout)["runs"][0]
    assert run["segments"] == 1 and 2 <= run["tokens"] + 1 < 512


# -- methods, presets, adapters ------------------------------------------------------------------------
BAD_PRESETS = {
    "unknown-key": ("format: 1\nmethod: xl\nsegment: 64\nwindow_size: 3\n", "has unknown key(s) window_size"),
    "unknown-option": ("format: 1\nmethod: xl\noptions: {memroy: 64}\n", "option key(s) memroy"),
    "option-wrong-type": ("format: 1\nmethod: xl\noptions: {memory: lots}\n", "option key 'memory' must be int"),
    "segment-wrong-type": ("format: 1\nmethod: xl\nsegment: [64]\n", "'segment' must be a positive integer"),
    "unknown-method": ("format: 1\nmethod: lstm\n", "unknown method 'lstm'"),
    "not-yaml": ("format: 1\nmethod: [xl\n", "is not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_PRESETS))
def test_bad_preset_exit_2(model_dir, book, tmp_path, isolated_home, case):
    text, needle = BAD_PRESETS[case]
    p = tmp_path / "mine.yaml"
    p.write_text(text)
    assert_refused(ppl(book, "--model", model_dir, "-m", str(p)), 2, needle, isolated_home)
    assert p.read_text() == text


def test_override_reaches_a_preset_given_as_a_path(model_dir, book, tmp_path):
    """-o used to be dropped silently when -m named a .yaml file (it was keyed by the path, looked up by name)."""
    p = tmp_path / "mine.yaml"
    p.write_text("format: 1\nmethod: xl\nsegment: 32\noptions: {memory: 40}\n")
    for opt in ("memory=24", "mine.memory=24"):
        r = ppl(book, "--model", model_dir, "-m", f"{tmp_path}/./mine.yaml", "-o", opt, "--max-tokens", "60", "--json")
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["runs"][0]["protocol"].startswith("xl(memory=24,")


def test_adapter_for_another_model_is_refused(model_dir, book, tmp_path):
    """An rmt adapter trained on a narrower model: exit 2 naming the architecture hash, nothing run."""
    from conftest import tiny_model
    from tiny_tokenizers import byte_bpe_tokenizer

    from longctx.methods import get_method
    from longctx.model.backbone import Backbone, ModelInfo
    from longctx.storage.adapters import save_adapter

    other = Backbone(tiny_model(hidden_size=32, intermediate_size=64), byte_bpe_tokenizer(), ModelInfo("tiny-llama", "test"))
    cls = get_method("rmt")
    save_adapter(str(tmp_path / "ad" / "narrow"), cls(cls.Options(), other), other, "memory", None, {"steps": 0})
    r = ppl(book, "--model", model_dir, "-m", "rmt", "--adapter", str(tmp_path / "ad" / "narrow"), "--max-tokens", "60")
    assert r.exit_code == 2 and "does not fit this run" in r.stderr and "hidden_size: adapter was trained on 32" in r.stderr
    assert r.stdout == ""


# -- snapshots -----------------------------------------------------------------------------------------
def _saved(tiny_backbone, book) -> Path:
    with pytest.raises(Interrupted):
        longctx.perplexity(book, ["xl"], backbone=tiny_backbone, segment=16, save_memory="s", stop=stop_after(2))
    return SnapshotStore().version_dir("s")


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _bump_format(vdir: Path) -> None:
    man = json.loads((vdir / "manifest.json").read_text())
    man["format_version"] = 2
    (vdir / "manifest.json").write_text(json.dumps(man))


def _flip_state_byte(vdir: Path) -> None:
    raw = bytearray((vdir / "state.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (vdir / "state.safetensors").write_bytes(bytes(raw))


@pytest.mark.parametrize("damage,needle", [(_bump_format, "has snapshot format 2; this longctx reads format 1"),
                                           (_flip_state_byte, "is corrupted or was modified")],
                         ids=["format-version", "corrupted"])
def test_unusable_snapshot_via_cli_exit_2(tiny_backbone, model_dir, book, damage, needle):
    vdir = _saved(tiny_backbone, book)
    damage(vdir)
    before = _files(vdir)
    r = ppl(book, "--model", model_dir, "--resume", "s")
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert _files(vdir) == before  # left as it was, for inspection


def test_snapshot_from_another_tokenizer_refused(tiny_backbone, book):
    vdir = _saved(tiny_backbone, book)
    before = _files(vdir)
    other = Backbone(tiny_model(), sentencepiece_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))
    with pytest.raises(SnapshotError, match="tokenizer: snapshot has other tokenizer"):
        longctx.perplexity(book, backbone=other, resume="s")
    assert _files(vdir) == before


# -- resources: memory, disk ---------------------------------------------------------------------------
def test_out_of_memory_suggests_a_smaller_segment(model_dir, book, isolated_home, monkeypatch):
    def oom(self, *args, **kwargs):  # what CUDA raises; torch.OutOfMemoryError is a RuntimeError
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Backbone, "forward", oom)
    r = ppl(book, "--model", model_dir, "--segment", "64")
    assert_refused(r, 1, "out of memory; try a smaller segment (--segment 32) or memory size", isolated_home)


def test_disk_full_writing_the_model_cache(tmp_path):
    from longctx.model import models

    model = tiny_model()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    model.save_pretrained = no_space
    cache = tmp_path / "models" / "smollm2-cache"
    with pytest.raises(ModelError, match="could not write the model cache .*: the disk is full; nothing was cached"):
        models._write_cache(model, byte_bpe_tokenizer(), {}, cache)
    assert list((tmp_path / "models").iterdir()) == []  # no half-written cache, no temporary directory


# -- Ctrl-C at each phase ------------------------------------------------------------------------------
def test_ctrl_c_while_loading_the_model(book, isolated_home, monkeypatch):
    import longctx.run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "load_backbone", interrupted)
    assert_refused(ppl(book), 130, "interrupted", isolated_home)


def test_ctrl_c_while_scoring_saves_and_prints_resume(model_dir, book, isolated_home, monkeypatch):
    from longctx.interrupts import GracefulInterrupt

    monkeypatch.setattr(GracefulInterrupt, "__call__", lambda self: True)  # as if Ctrl-C came in segment 1
    r = ppl(book, "--model", model_dir, "--segment", "32")
    assert r.exit_code == 130 and "Resume with:" in r.stderr and r.stdout == ""
    name = r.stderr.split("--resume ")[1].split()[0]
    assert snapshots(isolated_home) == [name]
    assert SnapshotStore().load(name).manifest["progress"]["tokens_consumed"] == 32


def test_second_ctrl_c_aborts_without_saving(model_dir, book, isolated_home, monkeypatch):
    import longctx.tasks.perplexity as ppl_module

    def aborted(*args, **kwargs):  # GracefulInterrupt raises KeyboardInterrupt on the second SIGINT
        raise KeyboardInterrupt

    monkeypatch.setattr(ppl_module, "run_stream", aborted)
    assert_refused(ppl(book, "--model", model_dir), 130, "interrupted", isolated_home)


def test_ctrl_c_while_writing_a_snapshot_keeps_the_previous_version(monkeypatch):

    store = SnapshotStore()
    store.save("c", {"x": torch.ones(3)}, {"n": 1})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)  # the store imports it when writing
    with pytest.raises(KeyboardInterrupt):
        store.save("c", {"x": torch.zeros(3)}, {"n": 2})
    monkeypatch.undo()
    assert store.load("c").manifest["n"] == 1
    assert not list((store.root / "c").glob(".tmp-*"))  # the half-written version is gone
