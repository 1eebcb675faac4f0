"""Adapters and snapshots recorded with the old fingerprint, converted to the semantic one after proof.

Before `longctx.model.identity`, a model was recorded as hashes of its whole config (`config_sha256`, and
`arch_sha256` without dtype and path), which include `transformers_version`: every transformers upgrade
made every adapter and saved memory look like another model's. A migration proves that the old hash is
the loaded model's config with nothing but that version field different (trying the version recorded at
training first, then every release number), that the tokenizer hashes the same under the old formula, and
that the tensors load into the method; only then does it write a new version with the new identity (the
state file copied byte for byte, so references to its sha256 still hold; the old version is kept).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..model.backbone import Backbone
from ..model.identity import is_legacy
from ..version import __version__
from .snapshot import STATE_FILE, Snapshot, SnapshotError, SnapshotStore, own_manifest

OLD_ARCH_IGNORED = ("dtype", "torch_dtype", "_name_or_path")


def _short_sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def legacy_refusal(what: str, name: str, command: str) -> SnapshotError:
    """The error for a record with the old fingerprint, naming the command that converts it."""
    return SnapshotError(f"{what} '{name}' records its model with the old fingerprint (a hash of the whole config, "
                         "transformers' version included), which no longer identifies it",
                         hint=f"verify and convert it once with `longctx {command} migrate {name}`")


def _release_numbers() -> Iterator[str]:
    """Every plausible transformers version string (4.30-4.59, 5.0-5.59, patch 0-9)."""
    for major, minors in ((5, range(60)), (4, range(30, 60))):
        for minor in minors:
            for patch in range(10):
                yield f"{major}.{minor}.{patch}"


def legacy_hash_version(config: Any, old: str, *, arch_only: bool, recorded: str | None = None) -> str | None:
    """The transformers version under which the loaded model's config hashes to `old` by the old formula
    (`arch_sha256` when `arch_only`, else `config_sha256`); None when no version makes it match, i.e. the
    config differs in more than its version."""
    raw = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    if arch_only:
        raw = {k: v for k, v in raw.items() if k not in OLD_ARCH_IGNORED}
    for version in ([recorded] if recorded else []) + [raw.get("transformers_version")] + list(_release_numbers()):
        if version and _short_sha({**raw, "transformers_version": version}) == old:
            return version
    return None


def legacy_tokenizer_sha256(tokenizer: Any) -> str:
    """The old tokenizer hash: the serialised fast tokenizer (or the vocabulary's repr)."""
    text = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer.get_vocab())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def verify_legacy(old: dict[str, Any], backbone: Backbone, *, what: str, recorded: str | None = None) -> dict[str, Any]:
    """Prove that an old-style identity names the loaded model; return what was checked (for the manifest).
    Raises naming each check that failed."""
    arch_only = "arch_sha256" in old
    key = "arch_sha256" if arch_only else "config_sha256"
    version = legacy_hash_version(backbone.config, old[key], arch_only=arch_only, recorded=recorded)
    failed = []
    if version is None:
        failed.append(f"{key}: the loaded model's config does not hash to {old[key]} under any transformers "
                      "version, so it differs in more than the version field")
    if old.get("tokenizer_sha256") != legacy_tokenizer_sha256(backbone.tokenizer):
        failed.append("tokenizer_sha256: the loaded tokenizer is another one")
    if old.get("vocab_size") != len(backbone.tokenizer):
        failed.append(f"vocab_size: {what} has {old.get('vocab_size')}, the model has {len(backbone.tokenizer)}")
    if "dtype" in old and old["dtype"] != backbone.fingerprint["dtype"]:
        failed.append(f"dtype: {what} has {old['dtype']}, this run loads {backbone.fingerprint['dtype']} "
                      f"(pass --dtype {old['dtype']})")
    if failed:
        raise SnapshotError(f"cannot verify that this {what} belongs to the loaded model:\n  " + "\n  ".join(failed),
                            hint="load the model it was made with (--model, --dtype); nothing was changed")
    return {"from": old, "config_matched_with_transformers_version": version, "tokenizer": "same (old formula)",
            "by": f"longctx {__version__}"}


def _rewrite(snap: Snapshot, manifest: dict[str, Any], what: str) -> Path:
    """A new version of `snap` with `manifest` and the very same state file."""
    store = SnapshotStore(snap.path.parent.parent, what=what)
    return store.save(snap.name, {}, own_manifest(manifest), state_file=snap.path / STATE_FILE)


def migrate_adapter(spec: str, backbone: Backbone) -> dict[str, Any]:
    """Verify an old-fingerprint adapter against the loaded model and its method, then record the new
    identity. An adapter already in the new form is left alone."""
    from ..methods import get_method
    from .adapters import base_identity, find_adapter, load_adapter_tensors, trainable_method

    snap = find_adapter(spec)
    man = snap.manifest
    if not is_legacy(man["base"]):
        return {"name": snap.name, "migrated": False, "path": str(snap.path)}
    recorded = (man.get("training") or {}).get("environment", {}).get("transformers")
    proof = verify_legacy(man["base"], backbone, what="adapter", recorded=recorded)
    cls = get_method(man["method"]["name"])
    method = cls(cls.Options.from_mapping(man["method"]["options"], where="adapter option"), backbone)
    load_adapter_tensors(trainable_method(method), snap, backbone)  # raises if a tensor does not fit
    proof["tensors"] = "loaded into the method and the model"
    new = {**man, "base": {**base_identity(backbone), "migrated": proof}}
    return {"name": snap.name, "migrated": True, "path": str(_rewrite(snap, new, "adapter")), "proof": proof}


def migrate_snapshot(name: str, backbone: Backbone, store: SnapshotStore | None = None) -> dict[str, Any]:
    """Verify an old-fingerprint memory snapshot against the loaded model, rebuild its method and restore
    its state from the tensors, then record the new identity."""
    from .checkpoint import method_from_snapshot, restore

    store = store or SnapshotStore()
    snap = store.load(name)
    old = snap.manifest.get("fingerprint", {})
    if not is_legacy(old):
        return {"name": snap.name, "migrated": False, "path": str(snap.path)}
    proof = verify_legacy(old, backbone, what="snapshot")
    spec = method_from_snapshot(snap, backbone)
    restore(snap, spec)  # raises if the state does not fit the method
    proof["tensors"] = "state restored into the method"
    fingerprint = {**backbone.fingerprint, "migrated": proof}
    new = {**snap.manifest, "fingerprint": fingerprint}
    return {"name": snap.name, "migrated": True, "path": str(_rewrite(snap, new, "snapshot")), "proof": proof}
