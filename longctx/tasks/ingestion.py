"""Read a document once into a method's memory, and reuse that memory from the snapshot store afterwards.

`ask` and `generate` put a prompt head before the document (the chat template's opening), stream the
document through the method, and keep what the next token needs (`decode.Ingested`). That memory is saved
as an ordinary snapshot (`memory ls/dump` show it) under a name derived from everything it depends on: the
document's sha256, the model, tokenizer and dtype, the method with its options and adapter, the segment
length and the head. The same command on the same document therefore loads it instead of reading the
document again (ingest once, ask many); any change gives another name, so a stale memory is never used.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..metrics import NllSums
from ..model.backbone import Backbone
from ..storage.checkpoint import RunSpec, check_setup, restore, save_run
from ..storage.hashing import file_sha256
from ..storage.snapshot import SnapshotError, SnapshotStore
from ..stream import StreamResult
from ..text.segments import Segment, iter_segments
from ..text.textio import open_source
from ..text.tokens import TokenChunk, iter_tokens
from .decode import Ingested, ingest


@dataclass
class DocumentMemory:
    """A document read into memory (fresh or reused), ready for a question or a continuation."""

    done: Ingested
    byte_start: torch.Tensor  # [tokens] byte offset of every token read; prompt-head tokens sit at byte 0
    head_tokens: int  # the first `head_tokens` tokens are the prompt head, not the document
    document: dict[str, Any]  # path, size, sha256
    snapshot: str | None  # its name in the store (None: stdin or a pipe, not saved)
    reused: bool
    seconds: float  # reading the document (0 when reused)
    load_seconds: float  # loading and verifying the snapshot (0 when read fresh)
    note: str | None = None  # why a stored memory was not reused, if one existed
    saved_at: float | None = None  # when a reused memory was saved (Unix time), to say how old it is

    @property
    def tokens(self) -> int:
        """Document tokens (the head excluded)."""
        return self.done.tokens - self.head_tokens

    def to_dict(self) -> dict[str, Any]:
        rate = self.tokens / self.seconds if self.seconds else None
        return {"snapshot": self.snapshot, "reused": self.reused, "document_tokens": self.tokens,
                "head_tokens": self.head_tokens, "ingest_seconds": self.seconds, "ingest_tokens_per_s": rate,
                "load_seconds": self.load_seconds, "note": self.note, "saved_at": self.saved_at}


def read_document(backbone: Backbone, spec: RunSpec, path: str, head_ids: list[int], *, kind: str,
                  reuse: bool = True, save: bool = True, store: SnapshotStore | None = None,
                  on_segment: Callable[[Segment], None] | None = None) -> DocumentMemory:
    """The memory of `head_ids` + the document at `path` under `spec`'s method: loaded from the store when
    this exact reading was saved before (and `reuse`), else read now and saved (files only, if `save`)."""
    store = store or SnapshotStore()
    replayable = path != "-" and Path(path).is_file()
    identity = _identity(path) if replayable else {"path": "<stdin>" if path == "-" else path, "size": None,
                                                   "sha256": None}
    name = snapshot_name(kind, identity, backbone, spec, head_ids) if replayable else None
    note = None
    if name and reuse and name in store.names():
        try:
            return _load(store, name, backbone, spec, path, identity, head_ids)
        except SnapshotError as e:  # damaged or mismatched: read the document again and save a new version
            note = f"stored memory '{name}' was not usable ({e}); the document was read again"
    mem = _read(backbone, spec, path, head_ids, identity, on_segment)
    mem.note = note
    if name and save:
        _save(store, name, backbone, spec, path, mem, kind, head_ids)
        mem.snapshot = name
    return mem


def _identity(path: str) -> dict[str, Any]:
    p = Path(path).resolve()
    return {"path": str(p), "size": p.stat().st_size, "sha256": file_sha256(p)}


def snapshot_name(kind: str, identity: dict[str, Any], backbone: Backbone, spec: RunSpec,
                  head_ids: list[int]) -> str:
    """`KIND-DOCSTEM-PRESET-KEY`, KEY hashing everything the memory depends on."""
    m = spec.method
    adapter = getattr(m, "adapter", None)
    key = {"kind": kind, "document": [identity["sha256"], identity["size"]],
           "model": backbone.run_identity, "method": m.name,
           "options": m.options.to_dict(), "adapter": adapter["sha256"] if adapter else None,
           "segment": spec.segment, "head": head_ids}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(identity["path"]).stem).strip("._-")[:40] or "doc"
    preset = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.preset)[:32]
    return f"{kind}-{stem}-{preset}-{digest}"


def _segments(backbone: Backbone, src, head_ids: list[int], segment: int, stats: dict) -> Iterator[Segment]:
    """The head's tokens (zero bytes at the document's start), then the document's, cut into segments."""
    head = TokenChunk(np.asarray(head_ids, dtype=np.int64), np.zeros(len(head_ids), dtype=np.int64), 0, 0)
    doc = iter_tokens(backbone.tokenizer, src.blocks(), add_bos=False if head_ids else None)
    return iter_segments(itertools.chain([head], doc) if head_ids else doc, segment, stats=stats)


def _read(backbone: Backbone, spec: RunSpec, path: str, head_ids: list[int], identity: dict[str, Any],
          on_segment: Callable[[Segment], None] | None) -> DocumentMemory:
    starts: list[torch.Tensor] = []

    def seen(seg: Segment) -> None:
        starts.append(seg.byte_start)
        if on_segment is not None:
            on_segment(seg)

    t0 = time.perf_counter()
    stats: dict[str, Any] = {}
    with open_source(path) as src:
        done = ingest(backbone, spec.method, _segments(backbone, src, head_ids, spec.segment, stats),
                      segment=spec.segment, on_segment=seen)
        if done.tokens <= len(head_ids) or stats.get("words") == 0:
            raise InputError(f"{src.name} contains only whitespace ({src.bytes_read} bytes); there is no text to read")
        if identity["size"] is None:
            identity["size"], identity["sha256"] = src.bytes_read, src.sha256_hex()
    return DocumentMemory(done, torch.cat(starts), len(head_ids), identity, None, False,
                          time.perf_counter() - t0, 0.0)


def _save(store: SnapshotStore, name: str, backbone: Backbone, spec: RunSpec, path: str, mem: DocumentMemory,
          kind: str, head_ids: list[int]) -> None:
    done = mem.done
    result = StreamResult(NllSums(), done.state, done.tokens, mem.seconds, "", next_byte=int(mem.document["size"]))
    extra = {"ingest": {"kind": kind, "head_tokens": mem.head_tokens, "head_sha256": _ids_sha(head_ids),
                        "document_sha256": mem.document["sha256"], "pending_tokens": len(done.pending),
                        "seconds": mem.seconds}}
    tensors = {"ingest.pending": done.pending, "ingest.last_hidden": done.last_hidden.float(),
               "ingest.byte_start": mem.byte_start}
    save_run(store, name, backbone, spec, path, result, extra=extra, extra_tensors=tensors)


def _load(store: SnapshotStore, name: str, backbone: Backbone, spec: RunSpec, path: str, identity: dict[str, Any],
          head_ids: list[int]) -> DocumentMemory:
    """Load and check a stored reading: same model, method, options, segment, head and whole document."""
    t0 = time.perf_counter()
    snap = store.load(name)
    check_setup(snap, backbone, {"segment": spec.segment, "options": spec.method.options.to_dict()})
    meta = snap.manifest.get("ingest") or {}  # the whole document's sha256 was just computed: no second read
    if meta.get("head_sha256") != _ids_sha(head_ids) or meta.get("document_sha256") != identity["sha256"]:
        raise SnapshotError(f"snapshot '{name}' holds another prompt or document version")
    state, _, tokens = restore(snap, spec)
    t = snap.tensors
    hidden = t["ingest.last_hidden"].to(backbone.device, backbone.dtype)
    done = Ingested(state, tokens, hidden, None, t["ingest.pending"].long(), spec.segment)
    return DocumentMemory(done, t["ingest.byte_start"].long(), int(meta["head_tokens"]), identity, name, True, 0.0,
                          time.perf_counter() - t0, saved_at=snap.manifest.get("created"))


def _ids_sha(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()
