"""`longctx ppl` over many documents: per-file results, micro and macro averages, a resumable run log.

Each document is scored independently (fresh memory) by `perplexity()`. Results are kept as sums, so the
micro average (all tokens pooled) is exact whatever order or process the files were scored in, and a run
log (one JSON line per finished file, with the file's sha256) lets an interrupted run continue where it
stopped with totals equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunSettings
from ..errors import InputError, UsageError
from ..presets import load_preset
from ..run import backbone_for, build_method, environment, resolve_settings
from ..sharding import current_shard, in_order
from ..storage.checkpoint import Interrupted
from ..storage.hashing import file_sha256
from ..stream import SegmentEvent
from ..text.documents import text_path
from ..version import __version__
from .perplexity import SCHEMA_VERSION, perplexity

# Per-file numbers kept in the log and the report (the position buckets stay with single-file runs).
FILE_KEYS = ("ppl", "ppl_se", "nll_sum", "nll_mean", "nll_se", "tokens", "bytes", "bits_per_byte", "segments",
             "tokens_read", "seconds", "tokens_per_s", "token_sha256")


@dataclass
class FileResult:
    """One document's result, scored now or taken from the run log."""

    path: str
    sha256: str
    size: int
    numbers: dict[str, Any]
    from_log: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size, "from_log": self.from_log,
                **self.numbers}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileResult:
        """Inverse of `to_dict()` (results travel between processes as JSON)."""
        return cls(d["path"], d["sha256"], d["size"], {k: d[k] for k in FILE_KEYS}, d["from_log"])


@dataclass
class CorpusReport:
    """Results of `perplexity_many()`: per-file numbers in the order given, micro and macro averages."""

    files: list[FileResult]
    setup: dict[str, Any]
    settings: RunSettings
    fingerprint: dict[str, Any]
    log: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def micro(self) -> dict[str, Any]:
        """All scored tokens pooled: what one long document made of all files would give (sums, not means)."""
        nll = math.fsum(f.numbers["nll_sum"] for f in self.files)
        tokens = sum(f.numbers["tokens"] for f in self.files)
        nbytes = sum(f.numbers["bytes"] for f in self.files)
        return {"ppl": math.exp(nll / tokens), "nll_mean": nll / tokens, "nll_sum": nll, "tokens": tokens,
                "bytes": nbytes, "bits_per_byte": nll / (math.log(2) * nbytes) if nbytes else None}

    def macro(self) -> dict[str, Any]:
        """Every file weighs the same: the mean of per-file PPL, NLL per token and bits per byte."""
        n = len(self.files)
        bpb = [f.numbers["bits_per_byte"] for f in self.files]
        return {"ppl": math.fsum(f.numbers["ppl"] for f in self.files) / n,
                "nll_mean": math.fsum(f.numbers["nll_mean"] for f in self.files) / n,
                "bits_per_byte": math.fsum(bpb) / n if None not in bpb else None, "files": n}

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": "corpus", "longctx": __version__,
                "model": self.fingerprint, "settings": self.settings.values,
                "settings_origin": self.settings.origins, **self.setup, "log": self.log,
                "files": [f.to_dict() for f in self.files], "micro": self.micro(), "macro": self.macro(),
                **self.extra, "environment": environment()}


# -- the list of documents -----------------------------------------------------------------------------
def read_file_list(path: str) -> list[str]:
    """Paths from a list file: one per line; blank lines and lines starting with '#' are skipped.

    Relative paths are relative to the current directory (as with `tar -T`). '-' (stdin) cannot be listed.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"file list not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read file list {path}: {getattr(e, 'strerror', None) or e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry == "-":
            raise UsageError(f"{path} line {n}: '-' (stdin) cannot be listed; give it alone as the argument")
        out.append(entry)
    if not out:
        raise UsageError(f"{path} lists no files (one path per line; '#' starts a comment line)")
    return out


def check_documents(paths: Sequence[str]) -> None:
    """Every document must be a readable regular file, listed once; all problems are named before any work."""
    if "-" in paths:
        raise UsageError("'-' (stdin) can only be scored alone; give several documents as files")
    problems: list[str] = []
    seen: dict[str, str] = {}  # real path -> the name it was first given as
    for p in paths:
        why = _unusable(p)
        if why:
            problems.append(f"{p}: {why}")
        key = os.path.realpath(p)
        if key in seen:
            problems.append(f"{p}: listed twice (also as {seen[key]}); it would count twice in the averages")
        seen.setdefault(key, p)
    if problems:
        raise InputError(f"{len(problems)} problem(s) with the {len(paths)} documents; nothing was scored:\n  "
                         + "\n  ".join(problems))


def _unusable(path: str) -> str | None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISDIR(mode):
        return "is a directory"
    if not stat.S_ISREG(mode):
        return "not a regular file (a pipe cannot be re-read and verified)"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


# -- the run log ---------------------------------------------------------------------------------------
class RunLog:
    """Append-only JSON lines, one per finished file: path, sha256, size, setup and the file's numbers."""

    def __init__(self, path: str, setup: dict[str, Any]):
        self.path, self.setup = path, setup
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise UsageError(f"--run-log {path}: directory {parent} does not exist")
        self.done = self._read()

    def _read(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Entries by (absolute path, sha256); a torn last line (killed mid-write) is ignored."""
        if not os.path.exists(self.path):
            return {}
        lines = Path(self.path).read_text(encoding="utf-8").splitlines()
        done = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):
                    break  # the process died while appending it: that file is simply scored again
                raise UsageError(f"run log {self.path} line {n} is not JSON; it is not a longctx run log") from None
            self._check_setup(entry, n)
            done[(entry["path"], entry["sha256"])] = entry
        return done

    def _check_setup(self, entry: Any, n: int) -> None:
        if not isinstance(entry, dict) or entry.get("event") != "file":
            raise UsageError(f"run log {self.path} line {n} is not a longctx file record")
        if entry.get("setup") != self.setup:
            diffs = [f"{k}: log has {entry.get('setup', {}).get(k)!r}, this run has {v!r}"
                     for k, v in self.setup.items() if entry.get("setup", {}).get(k) != v]
            raise UsageError(f"run log {self.path} was written by a run with a different setup:\n  "
                             + "\n  ".join(diffs), hint="use a new --run-log file, or the same model, method and options")

    def lookup(self, path: str, sha256: str) -> dict[str, Any] | None:
        return self.done.get((str(Path(path).resolve()), sha256))

    def append(self, result: FileResult) -> None:
        """One line, flushed and fsynced: a finished file is never scored twice."""
        entry = {"schema_version": SCHEMA_VERSION, "event": "file", "path": str(Path(result.path).resolve()),
                 "sha256": result.sha256, "size": result.size, "setup": self.setup, "result": result.numbers}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


# -- scoring -------------------------------------------------------------------------------------------
def perplexity_many(paths: Sequence[str], method: str | None = None, *, model: str | None = None,
                    dtype: str | None = None, device: str | None = None, threads: int | None = None,
                    segment: int | None = None, max_tokens: int | None = None,
                    options: dict[str, dict[str, Any]] | None = None, backbone=None, log: str | None = None,
                    adapter: str | None = None, allow_untrained: bool = False,
                    on_file: Callable[[int, FileResult], None] | None = None,
                    on_start: Callable[[int, str], None] | None = None,
                    on_segment: Callable[[SegmentEvent], None] | None = None) -> CorpusReport:
    """Score each document with one method (fresh memory per document); micro and macro averages.

    `paths` are files (checked all at once before the model loads). With `log`, each finished file is
    appended to that JSON-lines file, and files already there with the same sha256 and setup are not
    scored again. `on_start(i, path)` / `on_file(i, result)` report progress. Ctrl-C raises `Interrupted`.
    """
    paths = list(paths)
    if not paths:
        raise UsageError("no documents to score")
    check_documents(paths)
    preset = load_preset(method or "xl")
    settings = resolve_settings(model=model, dtype=dtype, device=device, threads=threads, segment=segment,
                                preset=preset)
    shard = current_shard(settings["device"])
    if backbone is None:
        backbone = backbone_for(settings, shard.device(settings["device"]))
    overrides = {**(options or {}).get(preset.method, {}), **(options or {}).get(preset.name, {})}
    built, _ = build_method(preset, backbone, overrides, adapter=adapter, allow_untrained=allow_untrained)
    built.check_segment(settings["segment"])
    setup = {"method": preset.name, "protocol": built.describe(), "segment": settings["segment"],
             "max_tokens": max_tokens,
             "model": {k: v for k, v in backbone.fingerprint.items() if k != "versions"}}  # versions may change
    run_log = RunLog(log, setup) if log else None
    mine: list[list[Any]] = []  # [index in paths, result dict]: this process's share
    for i in shard.split(len(paths)):
        try:
            result = _one_file(i, paths[i], run_log, on_start, lambda p: perplexity(
                p, [method or "xl"], backbone=backbone, segment=segment, max_tokens=max_tokens, options=options,
                adapter=adapter, allow_untrained=allow_untrained, on_segment=on_segment))
        except KeyboardInterrupt:
            raise Interrupted(_interrupted_message(paths[i], len(mine), len(paths), log)) from None
        mine.append([i, result.to_dict()])
        if on_file is not None:
            on_file(i, result)
    results = [FileResult.from_dict(d) for d in in_order(shard.gather_json(mine))]
    return CorpusReport(results, setup, settings, dict(backbone.fingerprint), log, {"processes": shard.world})


def _one_file(i: int, path: str, run_log: RunLog | None, on_start: Callable | None,
              score: Callable[[str], Any]) -> FileResult:
    """From the log when it holds this exact file, else scored now (and appended to the log)."""
    text = text_path(path)  # a document's extracted text: what is scored and what the hash must match
    sha, size = file_sha256(text), os.path.getsize(text)
    entry = run_log.lookup(path, sha) if run_log else None
    if entry is not None:
        return FileResult(path, sha, size, entry["result"], from_log=True)
    if on_start is not None:
        on_start(i, path)
    report = score(path)
    if report.source["bytes_hashed"] == size and report.source["sha256_prefix"] != sha:
        raise InputError(f"{path} changed between hashing and scoring; score a copy that nothing writes to")
    run = report.runs[0].to_dict()
    result = FileResult(path, sha, size, {k: run[k] for k in FILE_KEYS})
    if run_log is not None:
        run_log.append(result)
    return result


def _interrupted_message(path: str, i: int, n: int, log: str | None) -> str:
    head = f"interrupted while scoring {path}; {i} of {n} documents finished"
    if log:
        return f"{head} and are in run log {log}. Run the same command again to continue (finished files are skipped)"
    return f"{head}; without --run-log nothing was kept (add --run-log run.jsonl to make a run resumable)"
