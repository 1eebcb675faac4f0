"""Trained parameters of a method (an adapter): saved, found, verified and attached.

An adapter uses the snapshot store's layout and guarantees (safetensors + JSON manifest, atomic versioned
writes, sha256 verified on load, never pickle) under `LONGCTX_HOME/adapters`; adapters shipped with
longctx live in the package (`longctx/adapter_files`, the repository's `adapters/`). Tensors are
`params.*` (the method's own parameters), `lora.*` (peft LoRA weights) and `backbone.*` (full fine-tuning).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..methods.base import Method
from ..methods.recurrent import TrainableMethod
from ..model.backbone import Backbone
from ..model.identity import MODEL_KEYS, differences, is_legacy
from ..model.lora import LoraSpec, activate, load_lora, lora_tensors
from .migration import legacy_refusal
from .paths import longctx_home
from .snapshot import Snapshot, SnapshotError, SnapshotStore, read_snapshot_dir

KIND = "longctx-adapter"
BASE_KEYS = ("model", "source", *MODEL_KEYS)  # not the dtype: adapters are fp32, and fit any load dtype


def user_store() -> SnapshotStore:
    return SnapshotStore(longctx_home() / "adapters", what="adapter")


def packaged_store() -> SnapshotStore:
    return SnapshotStore(Path(str(importlib.resources.files("longctx.adapter_files"))), what="adapter")


def available() -> dict[str, str]:
    """Adapter name -> where it lives ("user" shadows "packaged")."""
    return {**{n: "packaged" for n in packaged_store().names()}, **{n: "user" for n in user_store().names()}}


def find_adapter(spec: str, *, tensors: bool = True) -> Snapshot:
    """An adapter by directory (a version directory or a store entry) or by name (user, then packaged);
    verified either way, its tensors read only when `tensors`."""
    p = Path(spec)
    if p.is_dir():
        if (p / "LATEST").is_file():
            return SnapshotStore(p.parent, what="adapter").load(p.name, tensors=tensors)
        return read_snapshot_dir(p, name=p.name, tensors=tensors)
    for store in (user_store(), packaged_store()):
        if spec in store.names():
            return store.load(spec, tensors=tensors)
    raise UsageError(f"no adapter named '{spec}' (available: {', '.join(sorted(available())) or 'none'}); "
                     "train one with `longctx train CORPUS --method M --out NAME`")


def save_adapter(out: str, method: TrainableMethod, backbone: Backbone, tune: str, lora: LoraSpec | None,
                 training: dict[str, Any]) -> Path:
    """Write `method`'s trained parameters as adapter `out` (a name, or a path with a '/')."""
    tensors = {f"params.{k}": v.detach().float() for k, v in method.params.state_dict().items()}
    if lora is not None:
        for role, name in method.loras.items():
            tensors.update({f"{lora_prefix(role)}{k}": v.float() for k, v in lora_tensors(backbone, name).items()})
    if tune == "full":
        tensors.update({f"backbone.{k}": v.detach() for k, v in backbone.model.state_dict().items()
                        if "lora_" not in k})
    manifest = {"kind": KIND, "method": {"name": method.name, "options": method.options.to_dict()}, "tune": tune,
                "lora": lora_manifest(method, lora) if lora is not None else None,
                "base": base_identity(backbone), "versions": backbone.fingerprint["versions"], "training": training}
    store, name = _destination(out)
    return store.save(name, tensors, manifest)


def base_identity(backbone: Backbone) -> dict[str, Any]:
    """The model an adapter is trained on, as its manifest records it (`MODEL_KEYS` are compared)."""
    return {k: backbone.fingerprint[k] for k in BASE_KEYS}


def lora_prefix(role: str) -> str:
    """Tensor-name prefix of a LoRA role: plain `lora.` for the one adapter of most methods."""
    return "lora." if role == "main" else f"lora.{role}."


def role_spec(spec: LoraSpec, method: Method, role: str) -> LoraSpec:
    """The LoRA spec of one role: the run's rank and alpha, the role's own targets where it fixes them."""
    targets = method.lora_roles.get(role)
    return spec if targets is None else LoraSpec(spec.r, spec.alpha, spec.dropout, tuple(targets))


def lora_manifest(method: TrainableMethod, spec: LoraSpec) -> dict[str, Any]:
    """The manifest's `lora` entry; a method with several adapters also records each role's targets."""
    out = spec.to_dict()
    if set(method.lora_roles) != {"main"}:
        out["roles"] = {r: list(role_spec(spec, method, r).targets) for r in method.lora_roles}
    return out


def _destination(out: str) -> tuple[SnapshotStore, str]:
    if "/" in out:
        p = Path(out)
        return SnapshotStore(p.parent, what="adapter"), p.name
    return user_store(), out


def check_adapter(snap: Snapshot, method: Method, backbone: Backbone, *, start: bool = False) -> None:
    """Refuse an adapter for another kind of file, method, parameter shape or model, naming what differs.
    With `start` (training on from it), an adapter of a method this one extends (`mplus` from `memoryllm`,
    M+'s first training stage) fits too: its parameters are a subset of this method's."""
    man = snap.manifest
    if man.get("kind") != KIND:
        raise SnapshotError(f"{snap.path} is not a longctx adapter (kind {man.get('kind')!r})")
    method = trainable_method(method)
    diffs = []
    trained_for = man["method"]["name"]
    if trained_for != method.name and not (start and trained_for in method.starts_from):
        hint = f" (it can start training of {method.name}: --init-adapter)" if trained_for in method.starts_from else ""
        diffs.append(f"method: adapter is for {trained_for!r}, this run is {method.name!r}{hint}")
    opts, now = man["method"]["options"], method.options.to_dict()
    shaping = [k for k in method.param_options if k in opts or trained_for == method.name]  # a base method's own
    diffs += [f"option {k}: adapter was trained with {opts.get(k)!r}, this run has {now[k]!r}"
              for k in shaping if opts.get(k) != now[k]]
    if is_legacy(man["base"]):
        raise legacy_refusal("adapter", snap.name, "adapters")
    diffs += differences(man["base"], backbone.fingerprint, MODEL_KEYS, "adapter was trained on", "this model has")
    if diffs:
        raise SnapshotError(f"adapter '{snap.name}' does not fit this run:\n  " + "\n  ".join(diffs))


def trainable_method(method: Method) -> TrainableMethod:
    """`method` as a TrainableMethod; a method without trainable parameters is a usage error."""
    if not isinstance(method, TrainableMethod):
        raise UsageError(f"method '{method.name}' has no trainable parameters; an adapter cannot be attached")
    return method


def attach_adapter(method: Method, spec: str, backbone: Backbone, *, start: bool = False) -> dict[str, Any]:
    """Load adapter `spec` into `method` (and its LoRA into the backbone); `method.adapter` records which,
    and is returned. `start`: the adapter starts a training run, so one of a method this one extends fits
    (check_adapter)."""
    snap = find_adapter(spec)
    check_adapter(snap, method, backbone, start=start)
    return load_adapter_tensors(trainable_method(method), snap, backbone)


def load_adapter_tensors(method: TrainableMethod, snap: Snapshot, backbone: Backbone) -> dict[str, Any]:
    """Load a (checked) adapter's parameters into `method` and its LoRA into the backbone; raises when a
    tensor does not fit. `method.adapter` records which adapter it was (also returned)."""
    params = {k[7:]: v for k, v in snap.tensors.items() if k.startswith("params.")}
    partial = snap.manifest["method"]["name"] != method.name  # a base method's: this one's own parameters stay
    try:
        result = method.params.load_state_dict({k: v.to(backbone.device) for k, v in params.items()}, strict=not partial)
    except RuntimeError as e:
        raise SnapshotError(f"adapter '{snap.name}' does not fit method {method.name}: {e}") from None
    if partial and result.unexpected_keys:
        raise SnapshotError(f"adapter '{snap.name}' has parameters {method.name} lacks: {result.unexpected_keys[:3]}")
    for role in method.lora_roles:
        prefix = lora_prefix(role)
        lora = {k[len(prefix):]: v.to(backbone.device, backbone.dtype) for k, v in snap.tensors.items()
                if k.startswith(prefix)}
        if not lora:
            continue
        name = f"{method.name}-{snap.name}-{role}".replace(".", "_")
        if name not in backbone.lora_names:
            spec = role_spec(LoraSpec.from_dict(snap.manifest["lora"]), method, role)
            load_lora(backbone, name, spec, lora)
            backbone.lora_names.add(name)
        method.loras[role] = name
    full = {k[9:]: v for k, v in snap.tensors.items() if k.startswith("backbone.")}
    if full:
        backbone.model.load_state_dict({k: v.to(backbone.dtype) for k, v in full.items()}, strict=False)
    activate(backbone, None, force=True)
    sha = snap.manifest["files"]["state.safetensors"]["sha256"]
    method.adapter = {"name": snap.name, "sha256": sha, "path": str(snap.path), "tune": snap.manifest["tune"],
                      "training": snap.manifest.get("training", {})}
    return method.adapter


def require_trained(method: Method, allow_untrained: bool) -> None:
    """A trainable method without an adapter refuses to run unless the user accepts an untrained one."""
    if getattr(method, "trainable", False) and getattr(method, "adapter", None) is None and not allow_untrained:
        raise UsageError(f"method '{method.name}' has trainable memory parameters and no adapter: its memory is "
                         "noise until trained. Pass --adapter NAME (see `longctx adapters`), train one with "
                         "`longctx train`, or pass --allow-untrained to run it untrained anyway")


def untrained(methods: list[Method]) -> list[str]:
    """Names of the methods in a run that are trainable but untrained (for the warning on every output)."""
    return [m.name for m in methods if getattr(m, "trainable", False) and getattr(m, "adapter", None) is None]

