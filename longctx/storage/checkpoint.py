"""Saving a run's memory as a snapshot, and resuming a run from one, with every check in plain words."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LongctxError, LongctxWarning, UsageError
from ..invocation import command_line
from ..methods import get_method
from ..methods.base import Method
from ..methods.pagefile import snapshot_files
from ..metrics import NllSums
from ..model.backbone import Backbone
from ..model.identity import RUN_KEYS, differences, is_legacy, version_changes
from ..stream import StreamResult
from ..text.documents import source_identity, text_path
from ..text.segments import Segment
from ..version import __version__
from .hashing import file_sha256
from .migration import legacy_refusal
from .snapshot import Snapshot, SnapshotError, SnapshotStore


class Interrupted(LongctxError):
    """Stopped by Ctrl-C after saving a snapshot; the message carries the resume command."""

    exit_code = 130


@dataclass
class RunSpec:
    """What a snapshot must agree with to be continued."""

    method: Method
    preset: str
    segment: int
    max_tokens: int | None


def prefix_sha256(path: str, nbytes: int) -> str:
    """sha256 of the first `nbytes` bytes of the document's text (the part a snapshot has consumed); for a
    PDF, HTML or compressed document that is its extracted text."""
    return file_sha256(text_path(path), limit=nbytes)


def document_identity(path: str, consumed: int) -> dict[str, Any]:
    """Path, size and the hash of the consumed prefix (stdin cannot be re-read, so it has no hash). A
    document's size and hash are those of its extracted text, and `source` names its file's sha256 and the
    extractor (plain text has no `source`: its identity is as it always was)."""
    if path == "-":
        return {"path": "<stdin>", "size": None, "bytes_consumed": consumed, "sha256_prefix": None}
    p = Path(path).resolve()
    if not p.is_file():  # a FIFO cannot be re-read: like stdin, it cannot be verified or resumed
        return {"path": str(p), "size": None, "bytes_consumed": consumed, "sha256_prefix": None}
    source = source_identity(str(p))
    doc = {"path": str(p), "size": Path(text_path(str(p))).stat().st_size, "bytes_consumed": consumed,
           "sha256_prefix": prefix_sha256(str(p), consumed)}
    return {**doc, "source": source} if source else doc


def save_run(store: SnapshotStore, name: str, backbone: Backbone, spec: RunSpec, path: str,
             result: StreamResult, *, extra: dict[str, Any] | None = None,
             extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Snapshot the memory and the running sums after the last completed segment (with a task's own
    manifest section and tensors, e.g. an ingestion's pending tokens)."""
    m = spec.method
    manifest = {
        "longctx_version": __version__,
        "fingerprint": dict(backbone.fingerprint),  # RUN_KEYS are compared on resume; the rest is information
        "method": {"name": m.name, "preset": spec.preset, "options": m.options.to_dict(),
                   "options_digest": m.options.digest(), "protocol": m.describe(), "segment": spec.segment,
                   "max_tokens": spec.max_tokens, "adapter": _adapter_ref(m)},
        "document": document_identity(path, result.next_byte),
        "progress": {"tokens_consumed": result.tokens, "bytes_scored": result.sums.bytes,
                     "segments": result.sums.segments, "tokens_scored": result.sums.tokens,
                     "nll_sum": result.sums.nll, "token_sha256_so_far": result.token_digest,
                     # the prediction past a --max-tokens cut (a float repr round-trips exactly in JSON)
                     "after_cut": ({"id": result.after_cut[0], "nll": result.after_cut[1]}
                                   if result.after_cut else None)},
        "rng": None,  # no method of this release draws random numbers
        "memory": {"entries": m.memory_size(result.state), "ram_bytes": m.memory_bytes(result.state),
                   "groups": m.dump(result.state)},
        "command": " ".join(sys.argv),
        **(extra or {}),
    }
    tensors = {f"state.{k}": v for k, v in m.state_tensors(result.state).items()}
    tensors.update({f"metrics.{k}": v for k, v in result.sums.to_tensors().items()})
    tensors.update(extra_tensors or {})
    files = {f"state.{k}": v for k, v in m.state_files(result.state).items()}
    return store.save(name, tensors, manifest, files=files)


def fingerprint_differences(manifest: dict[str, Any], backbone: Backbone, name: str = "NAME") -> list[str]:
    """Each way the snapshot's model/tokenizer/dtype differs from the loaded backbone; warns (and goes on)
    when only library versions differ."""
    saved: dict[str, Any] = manifest.get("fingerprint", {})
    now: Mapping[str, Any] = backbone.fingerprint
    if is_legacy(saved):
        raise legacy_refusal("snapshot", name, "memory")
    changed = version_changes(saved.get("versions"), now["versions"])
    if changed:
        warnings.warn(f"snapshot '{name}' was written under other library versions ({', '.join(changed)}); "
                      "it is continued, but results are bit-identical only under identical versions",
                      LongctxWarning, stacklevel=2)
    return differences(saved, now, RUN_KEYS, "snapshot has", "this run has")


def _adapter_ref(method: Method) -> dict[str, str] | None:
    a = getattr(method, "adapter", None)
    return {"name": a["name"], "path": a["path"], "sha256": a["sha256"]} if a else None


def method_from_snapshot(snap: Snapshot, backbone: Backbone) -> RunSpec:
    """Rebuild the method, options, adapter and segment the snapshot was made with."""
    from .adapters import attach_adapter

    meta = snap.manifest["method"]
    cls = get_method(meta["name"])
    method = cls(cls.Options.from_mapping(meta["options"], where="snapshot option"), backbone)
    ref = meta.get("adapter")
    if ref:  # the same trained parameters, verified by hash: other parameters would read the memory differently
        attached = attach_adapter(method, ref["path"] if Path(ref["path"]).is_dir() else ref["name"], backbone)
        if attached["sha256"] != ref["sha256"]:
            raise SnapshotError(f"snapshot '{snap.name}' was made with adapter {ref['name']} "
                                f"(sha256 {ref['sha256'][:12]}); the adapter found now differs")
    return RunSpec(method, meta.get("preset", meta["name"]), int(meta["segment"]), meta.get("max_tokens"))


def check_resume(snap: Snapshot, backbone: Backbone, spec: RunSpec, path: str, requested: dict[str, Any]) -> None:
    """Refuse a resume whose model, method, options, segment or document differ, naming each difference."""
    check_setup(snap, backbone, requested)
    check_document(snap, path)


def check_setup(snap: Snapshot, backbone: Backbone, requested: dict[str, Any]) -> None:
    """Refuse a snapshot whose model, method, options or segment differ from `requested`, naming each."""
    diffs = fingerprint_differences(snap.manifest, backbone, snap.name)
    meta = snap.manifest["method"]
    for key, value in requested.items():
        saved = {"method": meta["name"], "segment": meta["segment"], "max_tokens": meta.get("max_tokens")}.get(key)
        if key == "options":
            saved, value = meta["options"], {**meta["options"], **value}
        if value is not None and value != saved:
            diffs.append(f"{key}: snapshot has {saved!r}, this run asks for {value!r}")
    if diffs:
        raise SnapshotError(f"snapshot '{snap.name}' was made with a different setup:\n  " + "\n  ".join(diffs))


def check_document(snap: Snapshot, path: str) -> None:
    """The document must still start with exactly the bytes the snapshot consumed."""
    doc = snap.manifest["document"]
    if path == "-" or doc.get("sha256_prefix") is None:
        raise UsageError("a run over standard input or a pipe cannot be resumed: there is no file to re-read "
                         "and verify")
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path} is not a file")
    _check_source(snap, path, doc.get("source"))
    need, p = int(doc["bytes_consumed"]), Path(text_path(path))
    if p.stat().st_size < need:
        raise SnapshotError(f"{path} is shorter ({p.stat().st_size} bytes) than the {need} bytes snapshot "
                            f"'{snap.name}' already consumed from {doc['path']}")
    if prefix_sha256(path, need) != doc["sha256_prefix"]:
        raise SnapshotError(f"the first {need} bytes of {path} differ from those snapshot '{snap.name}' consumed "
                            f"from {doc['path']}: the document changed")


def _check_source(snap: Snapshot, path: str, saved: dict[str, Any] | None) -> None:
    """A document's snapshot resumes only on the same source file read by the same extractor (named when not)."""
    now = source_identity(path)
    if saved is None and now is None:
        return
    if saved is None or now is None:
        was = f"a {saved['format']} document" if saved else "plain text"
        nowis = f"a {now['format']} document" if now else "plain text"
        raise SnapshotError(f"snapshot '{snap.name}' was made from {was}; {path} is {nowis}")
    if now["sha256"] != saved["sha256"]:
        raise SnapshotError(f"{path} differs from the {saved['format']} file snapshot '{snap.name}' read "
                            f"(sha256 {saved['sha256'][:12]}, now {now['sha256'][:12]}): the document changed")
    if now["extractor"] != saved["extractor"]:
        raise SnapshotError(f"snapshot '{snap.name}' read the text of {path} extracted by {saved['extractor']}; "
                            f"this run extracts it with {now['extractor']}: start a new run")


def restore(snap: Snapshot, spec: RunSpec) -> tuple[Any, NllSums, int]:
    """State, sums and tokens consumed, ready to continue."""
    files = {k[6:]: v for k, v in snap.files.items() if k.startswith("state.")}
    with snapshot_files(files):  # a disk store reopens the segment files the snapshot links
        state = spec.method.state_from_tensors({k[6:]: v for k, v in snap.tensors.items() if k.startswith("state.")})
    prog = snap.manifest["progress"]
    sums = NllSums.from_tensors({k[8:]: v for k, v in snap.tensors.items() if k.startswith("metrics.")},
                                bytes=int(prog["bytes_scored"]), segments=int(prog["segments"]))
    return state, sums, int(prog["tokens_consumed"])


def resume_max_tokens(snap: Snapshot, requested: int | str | None) -> int | None:
    """How far a resumed run reads: the snapshot's own --max-tokens unless a larger one (or "all": to the end)
    is asked for. A run that stopped at its cut is extended only from a segment boundary: only there is its
    memory the memory the longer run holds at that token."""
    meta, prog = snap.manifest["method"], snap.manifest["progress"]
    if requested is None:
        return meta.get("max_tokens")
    target = None if requested == "all" else int(requested)
    consumed, segment = int(prog["tokens_consumed"]), int(meta["segment"])
    if target is not None and target < consumed:
        raise SnapshotError(f"snapshot '{snap.name}' already read {consumed:,} tokens; --max-tokens {target:,} "
                            "asks for fewer (start a new run for a shorter one)")
    extends = target is None or target > consumed
    if extends and _ended(prog) and prog.get("after_cut") and consumed % segment:
        raise SnapshotError(f"snapshot '{snap.name}' ended at token {consumed:,}, inside a segment of {segment}: "
                            "a longer run cannot continue it exactly; start a new run (a --max-tokens that is a "
                            f"multiple of {segment} can be extended later)")
    return target


def _ended(progress: dict[str, Any]) -> bool:
    """True when the run reached its end or its cut: a run stopped mid-document has scored every token it
    read (each token's successor was read with it); one that ended has not scored its last token's."""
    return int(progress["tokens_scored"]) < int(progress["tokens_consumed"])


def continuation(snap: Snapshot, sums: NllSums) -> Callable[[Segment], None] | None:
    """What to do with the first segment past a finished snapshot (None when the snapshot stopped
    mid-document): add the prediction its run made past its cut, after checking that the document still
    has that token there, so the sums equal those of one uninterrupted longer run."""
    prog = snap.manifest["progress"]
    if not _ended(prog):
        return None
    consumed, cut = int(prog["tokens_consumed"]), prog.get("after_cut")

    def first(seg: Segment) -> None:
        if not cut:
            raise SnapshotError(f"snapshot '{snap.name}' read its document to the end ({consumed:,} tokens) and "
                                "the document is longer now; start a new run to score the longer document")
        if int(seg.ids[0]) != int(cut["id"]):
            raise SnapshotError(f"token {consumed:,} of the document differs from the one snapshot '{snap.name}' "
                                "predicted there: the document changed")
        end = int(seg.byte_start[1]) if len(seg) > 1 else int(seg.next_byte)
        sums.add_pending(consumed, float(cut["nll"]), end - int(seg.byte_start[0]))

    return first


def restored_after_cut(snap: Snapshot) -> tuple[int, float] | None:
    """The snapshot's prediction past its cut, for a resumed run that read nothing new (saved again as is)."""
    cut = snap.manifest["progress"].get("after_cut")
    return (int(cut["id"]), float(cut["nll"])) if cut else None


def resume_command(path: str, name: str) -> str:
    """The command that continues a saved run, spelled the way the user started longctx."""
    return command_line("ppl", path, "--resume", name)


