"""Snapshot store, format v1 (docs/snapshots.md): `state.safetensors` + `manifest.json`, written atomically.

Layout under `LONGCTX_HOME/snapshots/`:
    NAME/v000007/{state.safetensors, manifest.json}   one complete version per save
    NAME/LATEST                                        "v000007": replaced atomically after the version is durable
    NAME/.lock                                         flock held while writing (two writers: refused, not corrupted)
    LATEST                                             name of the most recently saved snapshot
A version directory is built under a temporary name, fsynced and renamed; only then does LATEST move, and
only then are older versions pruned. A process killed at any point leaves LATEST naming a complete version.
Never pickle: tensors go to safetensors, everything else to JSON; loading checks sizes and sha256 first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LongctxError, UsageError, os_reason
from .hashing import file_sha256
from .paths import longctx_home

if TYPE_CHECKING:  # torch is imported only where tensors are read or written: `memory ls` lists without it
    import torch

FORMAT_VERSION = 1
STATE_FILE = "state.safetensors"
MANIFEST_FILE = "manifest.json"
KEEP_VERSIONS = 2  # the newest and one fallback
STORE_KEYS = ("files", "format_version", "name", "created")  # manifest keys the store itself writes
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^v(\d{6})$")


class SnapshotError(LongctxError):
    """A snapshot that cannot be used: missing, corrupted, another format, or made for another setup."""

    exit_code = 2


@dataclass
class Snapshot:
    """A loaded, verified snapshot."""

    name: str
    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    files: dict[str, Path] = field(default_factory=dict)  # linked beside the tensors (a disk store's segments)


def check_name(name: str) -> str:
    """Snapshot names are file-system safe: letters, digits, '.', '_', '-' (not starting with '.')."""
    if not _NAME.match(name or ""):
        raise UsageError(f"invalid snapshot name {name!r}: use letters, digits, '.', '_' and '-' (max 128)")
    return name


class SnapshotStore:
    """Snapshots under one root directory (default `LONGCTX_HOME/snapshots`)."""

    def __init__(self, root: Path | None = None, *, what: str = "snapshot"):
        self.root = Path(root) if root is not None else longctx_home() / "snapshots"
        self.what = what  # the word in messages: the same store layout also holds trained adapters

    # ---- writing -------------------------------------------------------------------------------------------
    def save(self, name: str, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], *,
             state_file: Path | None = None, files: dict[str, Path] | None = None, link: bool = True) -> Path:
        """Write a new version of `name` atomically and point LATEST at it; returns the version directory.
        With `state_file`, that file is copied byte for byte instead of writing `tensors` (a new manifest for
        the same state: its sha256, and every reference to it, still hold). `files` (name -> path) are hard-
        linked into the version (copied where a link cannot be made, or without `link`) and verified like the
        state file; a caller that links them never writes them again."""
        check_name(name)
        snap_dir = self.root / name
        self._make_dir(snap_dir, name)
        with self._lock(snap_dir):
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=snap_dir))
            try:
                self._write_version(tmp, tensors, manifest, name, state_file, files or {}, link)
                final = snap_dir / f"v{self._next_seq(snap_dir):06d}"
                os.rename(tmp, final)
                _fsync_path(snap_dir)
                _atomic_write_text(snap_dir / "LATEST", final.name)
                _atomic_write_text(self.root / "LATEST", name)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise SnapshotError(f"could not write snapshot '{name}': {os_reason(e)}; the previous version "
                                    "(if any) is intact") from e
            except BaseException:  # Ctrl-C mid-write: LATEST still names the previous version
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._prune(snap_dir, keep=final.name)
        return final

    def check_writable(self) -> None:
        """Refuse early (before a run spends its time) when snapshots cannot be written here."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SnapshotError(f"cannot save {self.what}s under {self.root}: {os_reason(e)}",
                                hint="point LONGCTX_HOME at a writable directory") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise SnapshotError(f"cannot save {self.what}s under {self.root}: permission denied",
                                hint="point LONGCTX_HOME at a writable directory")

    def _make_dir(self, snap_dir: Path, name: str) -> None:
        try:
            snap_dir.mkdir(parents=True, exist_ok=True)
            (snap_dir / ".lock").touch()
        except OSError as e:
            raise SnapshotError(f"could not write {self.what} '{name}': {os_reason(e)}; nothing was changed") from e

    def _write_version(self, tmp: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], name: str,
                       state_file: Path | None, files: dict[str, Path], link: bool) -> None:
        for fname, src in files.items():
            if link:
                _link_or_copy(src, tmp / fname)
            else:
                shutil.copyfile(src, tmp / fname)
            _fsync_path(tmp / fname)
        state = tmp / STATE_FILE
        if state_file is not None:
            shutil.copyfile(state_file, state)
        else:
            from safetensors.torch import save_file

            flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            save_file(flat, str(state), metadata={"format": "longctx-snapshot", "format_version": str(FORMAT_VERSION)})
        _fsync_path(state)
        full = {**manifest, "format_version": FORMAT_VERSION, "name": name, "created": time.time(),
                "files": {f: {"size": (tmp / f).stat().st_size, "sha256": file_sha256(tmp / f)}
                          for f in (STATE_FILE, *files)}}
        (tmp / MANIFEST_FILE).write_text(json.dumps(full, indent=1, sort_keys=True), encoding="utf-8")
        _fsync_path(tmp / MANIFEST_FILE)
        _fsync_path(tmp)

    @contextlib.contextmanager
    def _lock(self, snap_dir: Path) -> Iterator[None]:
        with open(snap_dir / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SnapshotError(f"snapshot '{snap_dir.name}' is being written by another process") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _next_seq(snap_dir: Path) -> int:
        seqs = [int(m.group(1)) for p in snap_dir.iterdir() if (m := _VERSION.match(p.name))]
        return max(seqs, default=0) + 1

    @staticmethod
    def _prune(snap_dir: Path, keep: str) -> None:
        versions = sorted(p for p in snap_dir.iterdir() if _VERSION.match(p.name))
        for old in versions[:-KEEP_VERSIONS]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in snap_dir.glob(".tmp-*"):  # left by a killed writer; we hold the lock, so none is live
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)

    # ---- reading -------------------------------------------------------------------------------------------
    def latest_name(self) -> str | None:
        """The most recently saved snapshot that still exists (after `rm` of the latest: the next newest)."""
        p = self.root / "LATEST"
        name = p.read_text().strip() if p.is_file() else None
        if name and (self.root / name / "LATEST").is_file():
            return name
        pointers = [self.root / n / "LATEST" for n in self.names()]
        return max(pointers, key=lambda q: q.stat().st_mtime).parent.name if pointers else None

    def version_dir(self, name: str) -> Path:
        check_name(name)
        pointer = self.root / name / "LATEST"
        if not pointer.is_file():
            known = ", ".join(self.names()) or "none"
            raise SnapshotError(f"no {self.what} named '{name}' (available: {known})")
        return self.root / name / pointer.read_text().strip()

    def load(self, name: str | None = None, *, tensors: bool = True) -> Snapshot:
        """Load and verify a snapshot (default: the latest). Refuses other formats and damaged files."""
        name = name or self.latest_name()
        if name is None:
            raise SnapshotError("there are no snapshots yet (save one with --save-memory NAME)")
        return read_snapshot_dir(self.version_dir(name), name=name, tensors=tensors)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / "LATEST").is_file())

    def remove(self, name: str) -> None:
        """Delete every version of a snapshot."""
        self.version_dir(name)  # raises if missing
        with self._lock(self.root / name):
            shutil.rmtree(self.root / name)
        if (self.root / "LATEST").is_file() and (self.root / "LATEST").read_text().strip() == name:
            (self.root / "LATEST").unlink()

    def export(self, name: str, dest: Path) -> Path:
        """Copy the current version to `dest` (a new directory), verified."""
        snap = self.load(name, tensors=False)
        if dest.exists():
            raise UsageError(f"{dest} already exists; choose a new directory (nothing was overwritten)")
        shutil.copytree(snap.path, dest)
        read_snapshot_dir(dest, name=name, tensors=False)
        return dest

    def import_(self, src: Path, name: str | None = None) -> str:
        """Verify an exported snapshot directory and store it as a new version (under its own name by default)."""
        snap = read_snapshot_dir(src, name=name or "", tensors=True)
        target = check_name(name or snap.manifest.get("name", ""))
        # copied, not linked: the exported directory stays the user's to change or delete
        self.save(target, snap.tensors, own_manifest(snap.manifest), files=snap.files, link=False)
        return target


def own_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest without the keys the store writes itself (what a new version of it is saved with)."""
    return {k: v for k, v in manifest.items() if k not in STORE_KEYS}


def read_snapshot_dir(path: Path, *, name: str, tensors: bool = True) -> Snapshot:
    """Read one version directory: format, then sizes and sha256 of every file, then the tensors."""
    man_path = path / MANIFEST_FILE
    if not man_path.is_file():
        raise SnapshotError(f"{path} is not a longctx snapshot ({MANIFEST_FILE} is missing)")
    try:
        manifest = json.loads(man_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{man_path} is damaged: not valid JSON ({e})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{path} has snapshot format {version!r}; this longctx reads format {FORMAT_VERSION}")
    for fname, meta in manifest.get("files", {}).items():
        f = path / fname
        if not f.is_file():
            raise SnapshotError(f"{f} is missing")
        if f.stat().st_size != meta["size"] or file_sha256(f) != meta["sha256"]:
            raise SnapshotError(f"{f} is corrupted or was modified: its size/sha256 differ from the manifest")
    if STATE_FILE not in manifest.get("files", {}):
        raise SnapshotError(f"{man_path} does not list {STATE_FILE}")
    if tensors:
        from safetensors.torch import load_file
    data = load_file(str(path / STATE_FILE)) if tensors else {}
    linked = {f: path / f for f in manifest["files"] if f != STATE_FILE}
    return Snapshot(name or manifest.get("name", ""), path, manifest, data, linked)


def _link_or_copy(src: Path, dest: Path) -> None:
    """`dest` as a hard link to `src` (no copy), or a copy where links cannot be made (another file system)."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

