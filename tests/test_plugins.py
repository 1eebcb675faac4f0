"""Third-party methods: the `longctx.methods` entry point, a collision-safe registry, and the example plugin
in examples/upper-xl (loaded here as an installed package would be, and held to the causality test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_causality import document, max_leak

import longctx
from longctx.errors import LongctxWarning, UsageError
from longctx.methods import METHODS, get_method, register
from longctx.methods.registry import load_plugins
from longctx.methods.xl import XL

EXAMPLE = Path(__file__).parents[1] / "examples" / "upper-xl"


def fake_install(tmp_path: Path, monkeypatch, entry: str) -> None:
    """Put the example module and a dist-info declaring `entry` on sys.path, as `pip install` would."""
    info = tmp_path / "site" / "longctx_upper_xl-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: longctx-upper-xl\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[longctx.methods]\n{entry}\n")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    fake_install(tmp_path, monkeypatch, "upper-xl = longctx_upper_xl:UpperXL")
    yield load_plugins()
    METHODS.pop("upper-xl", None)  # the registry is process-wide: leave it as the other tests expect


def test_an_installed_plugin_is_found_and_runs(plugin, tiny_backbone, tmp_path):
    assert plugin == ["upper-xl"] and get_method("upper-xl").__module__ == "longctx_upper_xl"
    book = tmp_path / "book.txt"
    book.write_text(" ".join(f"word{i % 23} then text." for i in range(200)), encoding="utf-8")
    report = longctx.perplexity(str(book), ["xl", "upper-xl"], backbone=tiny_backbone, segment=32,
                                options={"xl": {"memory": 64, "sinks": 4}, "upper-xl": {"memory": 64, "sinks": 4}})
    xl, upper = (r.result.sums.nll for r in report.runs)
    assert upper != xl  # the lower layer reads no memory
    every = longctx.perplexity(str(book), ["upper-xl"], backbone=tiny_backbone, segment=32,
                               options={"upper-xl": {"memory": 64, "sinks": 4, "layers": "all"}})
    assert every.runs[0].result.sums.nll == pytest.approx(xl, rel=1e-6)  # read at every layer, it is xl


def test_the_example_plugin_is_causal(plugin, tiny_backbone):
    cls = get_method("upper-xl")
    method = cls(cls.Options.from_mapping({"memory": 8, "sinks": 1}), tiny_backbone)
    method.check_segment(16)
    with torch.no_grad():
        assert max_leak(tiny_backbone, method, document()) == 0.0


def test_a_second_method_under_a_taken_name_is_refused():
    class Impostor(XL):
        pass

    with pytest.raises(UsageError, match="method name 'xl' is taken by longctx.methods.xl.XL"):
        register(Impostor)
    assert METHODS["xl"] is XL


def test_a_broken_plugin_is_skipped_with_a_warning(tmp_path, monkeypatch):
    fake_install(tmp_path, monkeypatch, "broken = longctx_upper_xl:NoSuchClass")
    with pytest.warns(LongctxWarning, match="method plugin 'broken'"):
        assert load_plugins() == []


def test_the_method_catalog_matches_the_classes():
    """`longctx methods` lists from catalog.json without importing torch; it must say what the classes say."""
    from longctx.methods import catalog

    assert catalog.main([]) == 0, "run: python -m longctx.methods.catalog --write"
    builtins = [e for e in catalog.entries() if not e.plugin]
    assert {e.name for e in builtins} == set(catalog.BUILTINS) == {n for n, c in METHODS.items() if c.__module__.startswith("longctx.")}
    for e in builtins:
        cls = get_method(e.name)
        assert e.summary == cls.summary
        assert e.options == tuple((n, d) for n, _, d, _ in cls.Options.describe_fields())


def test_the_catalog_lists_an_installed_plugin_without_loading_it(tmp_path, monkeypatch):
    import sys

    from longctx.methods.catalog import entries

    fake_install(tmp_path, monkeypatch, "upper-xl = longctx_upper_xl:UpperXL")
    monkeypatch.delitem(sys.modules, "longctx_upper_xl", raising=False)  # an earlier test may have loaded it
    listed = {e.name: e for e in entries()}
    assert listed["upper-xl"].plugin and listed["upper-xl"].target == "longctx_upper_xl:UpperXL"
    assert listed["upper-xl"].options is None and "longctx_upper_xl" not in sys.modules
