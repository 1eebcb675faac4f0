"""`longctx memory ...` as library functions: list, inspect, remove, export and import snapshots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from ..text.documents import page_label, page_starts, source_identity, text_path
from .hashing import file_sha256
from .snapshot import Snapshot, SnapshotError, SnapshotStore

EXCERPT_BYTES = 80


def list_snapshots(store: SnapshotStore | None = None) -> list[dict[str, Any]]:
    """One summary per snapshot: name, method, model, document, tokens consumed, bytes on disk (its files) and
    in RAM (the memory's buffers when it was saved; None for a snapshot from before that was recorded), created."""
    store = store or SnapshotStore()
    rows = []
    for name in store.names():
        try:
            snap = store.load(name, tensors=False)
        except SnapshotError as e:  # one damaged snapshot must not hide the others
            rows.append(_damaged_row(store, name, e))
            continue
        m = snap.manifest
        rows.append({"name": name, "method": m["method"]["protocol"], "model": m["fingerprint"]["model"],
                     "document": m["document"]["path"], "tokens": m["progress"]["tokens_consumed"],
                     "size_bytes": _disk_bytes(snap), "ram_bytes": m["memory"].get("ram_bytes"), "created": m["created"],
                     "version": snap.path.name, "latest": name == store.latest_name()})
    return rows


def _disk_bytes(snap: Snapshot) -> int:
    """Bytes the snapshot's files (tensors and all) occupy: allocated blocks, since a disk store's segment
    files are sparse (a file that cannot be read counts at the size its manifest lists)."""
    total = 0
    for name, f in snap.manifest["files"].items():
        try:
            st = (snap.path / name).stat()
            total += min(st.st_size, st.st_blocks * 512)
        except OSError:
            total += f["size"]
    return total


def _damaged_row(store: SnapshotStore, name: str, error: SnapshotError) -> dict[str, Any]:
    """A listing row for a snapshot that fails verification: what is wrong, and what to do."""
    return {"name": name, "method": "?", "model": "?", "document": "?", "tokens": 0, "size_bytes": 0, "ram_bytes": None,
            "created": 0.0,
            "version": None, "latest": name == store.latest_name(),
            "damaged": f"{error.message} (remove it with `longctx memory rm {name}`)"}


def show_snapshot(name: str | None = None, store: SnapshotStore | None = None) -> dict[str, Any]:
    """The verified manifest plus tensor shapes."""
    snap = (store or SnapshotStore()).load(name)
    return {**snap.manifest, "path": str(snap.path), "tensors": _tensor_table(snap)}


def dump_snapshot(name: str | None = None, store: SnapshotStore | None = None) -> dict[str, Any]:
    """What the memory holds: tensors, entries in use, and each group's source span with an excerpt."""
    snap = (store or SnapshotStore()).load(name)
    m = snap.manifest
    source = _readable_source(m["document"])
    # a group with an empty token span describes a store as a whole (M+'s occupancy rows): no text of its own
    pages = page_starts(m["document"]["path"]) if source and m["document"].get("source") else ()
    groups = [{**g, "excerpt": "" if g["tokens"][0] == g["tokens"][1] else
               _excerpt(source, g["byte_start"], g["byte_last_token"]),
               **({"page": page_label(pages, g["byte_start"], g["byte_last_token"] + 1)} if pages else {})}
              for g in m["memory"]["groups"]]
    return {"name": snap.name, "method": m["method"]["protocol"], "segment": m["method"]["segment"],
            "model": m["fingerprint"]["model"], "document": m["document"]["path"],
            "source_available": source is not None, "tokens_consumed": m["progress"]["tokens_consumed"],
            "entries": m["memory"]["entries"], "disk_bytes": _disk_bytes(snap), "ram_bytes": m["memory"].get("ram_bytes"),
            "tensors": _tensor_table(snap), "groups": groups}


def _tensor_table(snap: Snapshot) -> list[dict[str, Any]]:
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
             "bytes": v.numel() * v.element_size()} for k, v in sorted(snap.tensors.items())]


def _readable_source(doc: dict[str, Any]) -> str | None:
    """The document path if it still holds the bytes the snapshot consumed (else excerpts would lie)."""
    path, digest = doc.get("path"), doc.get("sha256_prefix")
    if not path or digest is None or not Path(path).is_file():
        return None
    try:
        if doc.get("source") != source_identity(path):  # another file, or another extractor's text
            return None
        path = text_path(path)  # a document's offsets are into its extracted text
    except InputError:  # the source no longer extracts (damaged since): no excerpts
        return None
    if Path(path).stat().st_size < doc["bytes_consumed"] or file_sha256(path, limit=doc["bytes_consumed"]) != digest:
        return None
    return path


def _excerpt(path: str | None, start: int, last: int) -> str | None:
    """The text around a span: its first and last EXCERPT_BYTES bytes, joined by an ellipsis."""
    if path is None:
        return None
    with open(path, "rb") as f:
        f.seek(start)
        head = f.read(min(EXCERPT_BYTES, last - start + 16))
        text = head.decode("utf-8", errors="replace")
        if last - start > EXCERPT_BYTES:
            f.seek(max(last - EXCERPT_BYTES // 2, start))
            text += " … " + f.read(EXCERPT_BYTES // 2 + 16).decode("utf-8", errors="replace")
    return " ".join(text.split())


def remove_snapshot(name: str, store: SnapshotStore | None = None) -> None:
    (store or SnapshotStore()).remove(name)


def export_snapshot(name: str, dest: str, store: SnapshotStore | None = None) -> Path:
    return (store or SnapshotStore()).export(name, Path(dest))


def import_snapshot(src: str, name: str | None = None, store: SnapshotStore | None = None) -> str:
    return (store or SnapshotStore()).import_(Path(src), name)
