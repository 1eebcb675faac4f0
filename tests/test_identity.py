"""Model identity: adapters and snapshots follow the model, not the library that loaded it; old records are
migrated only after proof."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizers import byte_bpe_tokenizer, sentencepiece_tokenizer

import longctx
from longctx.errors import LongctxWarning
from longctx.interrupts import stop_after
from longctx.methods import get_method
from longctx.model.backbone import Backbone, ModelInfo
from longctx.model.identity import architecture, tokenizer_sha256, weights_sha256
from longctx.run import build_method
from longctx.storage.adapters import save_adapter
from longctx.storage.checkpoint import Interrupted
from longctx.storage.migration import migrate_adapter, migrate_snapshot
from longctx.storage.snapshot import SnapshotError, SnapshotStore


def backbone(model=None, tokenizer=None, **config) -> Backbone:
    model = model or tiny_model()
    for key, value in config.items():
        setattr(model.config, key, value)
    return Backbone(model, tokenizer or byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))


def rmt_adapter(bb: Backbone, path: Path) -> str:
    """An rmt adapter with random non-zero parameters, saved under `path`."""
    cls = get_method("rmt")
    m = cls(cls.Options(tokens=2), bb)
    with torch.no_grad():
        for p in m.params.parameters():
            p.normal_()
    save_adapter(str(path), m, bb, "memory", None, {"steps": 0, "environment": {"transformers": "5.24.0"}})
    return str(path)


def saved_run(bb: Backbone, book: str, name: str = "s") -> None:
    with pytest.raises(Interrupted):
        longctx.perplexity(book, ["xl"], backbone=bb, segment=16, save_memory=name, stop=stop_after(2))


@pytest.fixture
def book(tmp_path) -> str:
    path = tmp_path / "book.txt"
    path.write_text(" ".join(f"word{i % 37} and then some more text." for i in range(300)), encoding="utf-8")
    return str(path)


# -- what is compared ----------------------------------------------------------------------------------------
def test_identity_ignores_bookkeeping_and_names_semantic_fields():
    a, b = backbone(), backbone(transformers_version="4.0.0", _name_or_path="/somewhere/else")
    assert a.run_identity == b.run_identity
    c = backbone(rms_norm_eps=1e-3)
    assert architecture(c.config)["rms_norm_eps"] == 1e-3 and a.run_identity != c.run_identity


def test_weights_hash_is_the_same_in_fp32_and_bf16_and_sees_one_changed_weight():
    model = tiny_model()
    fp32 = weights_sha256(model)
    assert weights_sha256(tiny_model().to(torch.bfloat16)) == fp32
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    assert weights_sha256(model) != fp32


def test_tokenizer_hash_follows_the_vocabulary_not_the_serialisation():
    assert tokenizer_sha256(byte_bpe_tokenizer()) == tokenizer_sha256(byte_bpe_tokenizer())
    assert tokenizer_sha256(byte_bpe_tokenizer()) != tokenizer_sha256(sentencepiece_tokenizer())


def test_adapters_and_snapshots_load_after_a_transformers_upgrade(tmp_path, book):
    old = backbone()
    path = rmt_adapter(old, tmp_path / "ad" / "rmt")
    saved_run(old, book)
    upgraded = backbone(transformers_version="9.9.9", _name_or_path="/moved/model")
    build_method("rmt", upgraded, {"tokens": 2}, adapter=path)  # fits: nothing semantic changed
    report = longctx.perplexity(book, backbone=upgraded, resume="s")
    assert report.runs[0].result.tokens > 32


def test_a_semantic_change_is_refused_naming_the_field(tmp_path, book):
    path = rmt_adapter(backbone(), tmp_path / "ad" / "rmt")
    saved_run(backbone(), book)
    other = backbone(rms_norm_eps=1e-3)
    with pytest.raises(SnapshotError, match=r"rms_norm_eps: adapter was trained on 1e-06, this model has 0.001"):
        build_method("rmt", other, {"tokens": 2}, adapter=path)
    with pytest.raises(SnapshotError, match=r"rms_norm_eps: snapshot has 1e-06, this run has 0.001") as exc:
        longctx.perplexity(book, backbone=other, resume="s")
    assert "sha256" not in str(exc.value).split("rms_norm_eps")[1].splitlines()[0]


def test_resume_under_other_library_versions_warns_and_continues(book):
    bb = backbone()
    saved_run(bb, book)
    vdir = SnapshotStore().version_dir("s")
    man = json.loads((vdir / "manifest.json").read_text())
    man["fingerprint"]["versions"]["transformers"] = "5.0.0"
    (vdir / "manifest.json").write_text(json.dumps(man))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        longctx.perplexity(book, backbone=bb, resume="s")
    messages = [str(w.message) for w in caught if issubclass(w.category, LongctxWarning)]
    assert any("transformers 5.0.0 -> " in m and "bit-identical only under identical versions" in m for m in messages)


# -- migration of records made with the old whole-config hash ------------------------------------------------
def _old_hash(bb: Backbone, *, version: str, arch_only: bool) -> str:
    """The retired formula: sha256 of the config dict (bookkeeping included), with the recorded version."""
    raw = {k: v for k, v in bb.config.to_dict().items() if k != "_name_or_path"}
    if arch_only:
        raw = {k: v for k, v in raw.items() if k not in ("dtype", "torch_dtype")}
    raw["transformers_version"] = version
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _old_tokenizer(bb: Backbone) -> str:
    return hashlib.sha256(bb.tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _rewrite_manifest(vdir: Path, edit) -> None:
    man = json.loads((vdir / "manifest.json").read_text())
    edit(man)
    (vdir / "manifest.json").write_text(json.dumps(man))


def _legacy_adapter(bb: Backbone, path: Path, *, version: str = "5.24.0") -> str:
    spec = rmt_adapter(bb, path)
    old = {"model": "tiny-llama", "arch_sha256": _old_hash(bb, version=version, arch_only=True),
           "tokenizer_sha256": _old_tokenizer(bb), "vocab_size": len(bb.tokenizer)}
    _rewrite_manifest(SnapshotStore(path.parent).version_dir(path.name), lambda m: m.__setitem__("base", old))
    return spec


def test_old_adapter_is_refused_with_the_migrate_command_then_migrated_after_proof(tmp_path):
    bb = backbone()
    spec = _legacy_adapter(bb, tmp_path / "ad" / "rmt")
    with pytest.raises(SnapshotError) as exc:
        build_method("rmt", bb, {"tokens": 2}, adapter=spec)
    assert "old fingerprint" in str(exc.value) and "longctx adapters migrate rmt" in exc.value.hint
    before = SnapshotStore(tmp_path / "ad").load("rmt")
    result = migrate_adapter(spec, bb)
    assert result["migrated"] and result["proof"]["config_matched_with_transformers_version"] == "5.24.0"
    after = SnapshotStore(tmp_path / "ad").load("rmt")
    assert after.path != before.path and before.path.is_dir()  # a new version; the old one is kept
    assert after.manifest["files"]["state.safetensors"] == before.manifest["files"]["state.safetensors"]  # same bytes
    method, _ = build_method("rmt", bb, {"tokens": 2}, adapter=spec)
    assert all(torch.equal(method.params.state_dict()[k], v) for k, v in
               {k[7:]: t for k, t in before.tensors.items() if k.startswith("params.")}.items())
    assert migrate_adapter(spec, bb)["migrated"] is False  # idempotent


def test_migration_refuses_an_adapter_of_another_architecture(tmp_path):
    spec = _legacy_adapter(backbone(rms_norm_eps=1e-3), tmp_path / "ad" / "rmt")
    with pytest.raises(SnapshotError, match="differs in more than the version field"):
        migrate_adapter(spec, backbone())
    assert SnapshotStore(tmp_path / "ad").version_dir("rmt").name == "v000001"  # nothing written


def test_old_snapshot_is_refused_then_migrated_and_resumes(book):
    bb = backbone()
    saved_run(bb, book)
    store = SnapshotStore()
    old = {"model": "tiny-llama", "source": "test", "config_sha256": _old_hash(bb, version="5.24.0", arch_only=False),
           "tokenizer_sha256": _old_tokenizer(bb), "vocab_size": len(bb.tokenizer), "dtype": "float32"}
    _rewrite_manifest(store.version_dir("s"), lambda m: m.__setitem__("fingerprint", old))
    with pytest.raises(SnapshotError) as exc:
        longctx.perplexity(book, backbone=bb, resume="s")
    assert "longctx memory migrate s" in exc.value.hint
    result = migrate_snapshot("s", bb)
    assert result["migrated"] and result["proof"]["from"] == old
    uninterrupted = longctx.perplexity(book, ["xl"], backbone=bb, segment=16).runs[0].result.sums.nll
    assert longctx.perplexity(book, backbone=bb, resume="s").runs[0].result.sums.nll == pytest.approx(uninterrupted, rel=1e-6)
