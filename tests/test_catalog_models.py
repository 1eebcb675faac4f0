"""The larger catalog models, when installed (`longctx models install NAME`); marked `model_large`.

Each is skipped where its converted cache is not installed in the user's LONGCTX_HOME: CI installs only the
default model, so these never download anything and never count as skipped `model` tests.
"""

from __future__ import annotations

import os

import platformdirs
import pytest

from longctx.model import catalog

# the user's home, read before the autouse fixture points LONGCTX_HOME at a fresh directory per test
REAL_HOME = os.environ.get("LONGCTX_HOME") or platformdirs.user_data_dir("longctx")
LARGE = [e.name for e in catalog.ENTRIES if e.name != catalog.DEFAULT_NAME]
STORY = ("The town museum stands on the main square. Its halls hold maps, coins and a ship's bell. "
         "The museum's old clock is wound every Sunday by a man named Tobias Wren. The café next door serves soup at noon.")


@pytest.fixture
def installed_backbone(request, monkeypatch):
    """The named catalog model from the user's home (its installed dtype), or a skip naming the install command."""
    from longctx.model.models import load_backbone

    name = request.param
    monkeypatch.setenv("LONGCTX_HOME", REAL_HOME)
    if not catalog.is_installed(catalog.CATALOG[name]):
        pytest.skip(f"{name} is not installed (longctx models install {name})")
    return load_backbone(name, dtype="auto", threads=1)


@pytest.mark.model_large
@pytest.mark.parametrize("installed_backbone", LARGE, indirect=True)
def test_a_catalog_model_reads_and_answers(installed_backbone, tmp_path, monkeypatch):
    """ppl streams a text through it (xl memory across segments), ask answers over the memory."""
    import longctx
    from longctx.tasks.qa import ask

    monkeypatch.setenv("LONGCTX_HOME", str(tmp_path / "home"))  # nothing the runs write lands in the user's home
    e = catalog.CATALOG[installed_backbone.fingerprint["model"]]
    assert installed_backbone.config.model_type == e.family
    path = tmp_path / "story.txt"
    path.write_text(STORY * 6, encoding="utf-8")
    report = longctx.perplexity(str(path), ["window", "xl"], backbone=installed_backbone, segment=64)
    ppl = {r.method: r.to_dict()["ppl"] for r in report.runs}
    assert ppl["xl"] < ppl["window"]  # the repeated story is predictable only with memory
    answer = ask(str(path), ["Who winds the museum's old clock?"], method="xl", backbone=installed_backbone,
                 max_new_tokens=16).answers[0].text
    assert answer.strip()
    if e.name == "qwen2.5-coder-1.5b":  # the only one that answered reliably in the hand probes
        assert "Tobias Wren" in answer, answer
