"""`longctx ppl` as a library function: every named method over the same tokens, in one process."""

from __future__ import annotations

import functools
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..config import RunSettings
from ..errors import InputError, UsageError
from ..methods.base import Method
from ..metrics import paired_delta, summarize
from ..model.backbone import Backbone
from ..presets import Preset, load_preset
from ..resources import peak_gpu_mb, peak_rss_mb, reset_peak_rss
from ..run import backbone_for, build_method, environment, resolve_settings
from ..storage.checkpoint import (
    Interrupted,
    RunSpec,
    check_resume,
    continuation,
    document_identity,
    method_from_snapshot,
    prefix_sha256,
    restore,
    restored_after_cut,
    resume_command,
    resume_max_tokens,
    save_run,
)
from ..storage.snapshot import Snapshot, SnapshotError, SnapshotStore, check_name
from ..stream import SegmentEvent, StreamResult, run_stream
from ..text.segments import iter_segments
from ..text.textio import open_source
from ..text.tokens import iter_tokens
from ..version import __version__

SCHEMA_VERSION = 1


@dataclass
class MethodRun:
    """One method's result over the document."""

    method: str
    protocol: str
    segment: int
    unimem: dict[str, str]
    result: StreamResult
    peak_rss_mb: float
    peak_gpu_mb: float | None
    save_error: str | None = None  # the memory could not be saved at the end (the result itself is complete)

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"method": self.method, "protocol": self.protocol, "segment": self.segment, "unimem": self.unimem,
                **summarize(r.sums), "tokens_read": r.tokens, "seconds": r.seconds,
                "tokens_per_s": r.tokens / r.seconds if r.seconds > 0 else None,
                "peak_rss_mb": self.peak_rss_mb, "peak_gpu_mb": self.peak_gpu_mb,
                "untrained": "UNTRAINED" in self.protocol, "causal": "non-causal" not in self.protocol,
                "memory_entries": _memory_entries(r.state), "token_sha256": r.token_digest,
                "save_error": self.save_error}


@dataclass
class PplReport:
    """Results of `perplexity()`: one run per method, paired deltas against the first, the context."""

    source: dict[str, Any]
    runs: list[MethodRun]
    settings: RunSettings
    fingerprint: dict[str, Any]
    deltas: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "longctx": __version__, "source": self.source,
                "model": self.fingerprint, "settings": self.settings.values, "settings_origin": self.settings.origins,
                "runs": [r.to_dict() for r in self.runs], "deltas": self.deltas, "environment": environment()}


def _memory_entries(state: Any) -> int | None:
    return len(state) if hasattr(state, "__len__") else None


def perplexity(path: str, methods: Sequence[str] | None = None, *, model: str | None = None,
               dtype: str | None = None, device: str | None = None, threads: int | None = None,
               segment: int | None = None, max_tokens: int | str | None = None,
               options: dict[str, dict[str, Any]] | None = None, backbone: Backbone | None = None,
               save_memory: str | None = None, save_every: int | None = None, resume: str | None = None,
               adapter: str | None = None, allow_untrained: bool = False, overwrite: bool = False,
               stop: Callable[[], bool] | None = None,
               on_segment: Callable[[SegmentEvent], None] | None = None,
               on_method: Callable[[str, Method, dict], None] | None = None) -> PplReport:
    """Score `path` ("-" = stdin) with each method in turn on the same tokens; deltas vs the first method.

    `methods` are method or preset names (default: xl, or the snapshot's when resuming). `options` maps a
    method name to option overrides. Settings resolve flag > env > user config > preset > default.
    `save_memory` snapshots each method's memory at the end (and every `save_every` segments); `resume`
    continues a snapshot's run, to the snapshot's own `max_tokens` or to a larger one ("all": the end), and
    equals the uninterrupted run exactly; `adapter` is loaded by the first method (trainable methods refuse to run
    untrained unless `allow_untrained`); a `save_memory` name that holds another document's memory is refused
    unless `overwrite`; `stop()` is polled between segments, and a stopped run is saved and raises
    `Interrupted` (exit 130) carrying the resume command.
    """
    if max_tokens == "all" and not resume:
        max_tokens = None
    if isinstance(max_tokens, int) and max_tokens < 2:
        raise UsageError(f"--max-tokens must be >= 2 (got {max_tokens})")
    if save_every is not None and (save_every < 1 or not save_memory):
        raise UsageError("--save-every N needs N >= 1 and --save-memory NAME")
    store = SnapshotStore()
    snap = store.load(resume) if resume else None
    if snap is not None and methods and len(methods) > 1:
        raise UsageError("--resume continues one method's run; it cannot be combined with --compare")
    names = list(methods or ([snap.manifest["method"]["preset"]] if snap else ["xl"]))
    if snap is not None:  # the snapshot knows its model and dtype; explicit ones are checked against it
        model = model or snap.manifest["fingerprint"]["model"]
        dtype = dtype or snap.manifest["fingerprint"]["dtype"]
    presets = [load_preset(m) for m in names]
    if save_memory:
        store.check_writable()
    if save_memory and not overwrite:
        _check_not_another_document(store, [_save_name(save_memory, p.name, len(presets)) for p in presets], path)
    flags: dict[str, Any] = {"model": model, "dtype": dtype, "device": device, "threads": threads, "segment": segment}
    settings = resolve_settings(**flags, preset=presets[0])
    if backbone is None:
        backbone = backbone_for(settings)
    specs = _specs(presets, backbone, flags, options, max_tokens, snap, path, adapter, allow_untrained)
    _check_comparable(specs)
    runs: list[MethodRun] = []
    source: dict[str, Any] = {}
    with _replayable(path, len(specs)) as src_path:
        for spec in specs:
            if on_method is not None:
                on_method(spec.preset, spec.method, {"segment": spec.segment, "max_tokens": spec.max_tokens,
                                                     **_resume_point(snap)})
            name = _snapshot_name(save_memory, spec, len(specs), stop)
            run, source = _run_one(backbone, spec, src_path, path, store, name, save_every, bool(save_memory), snap,
                                   stop, on_segment)
            runs.append(run)
            if run.result.interrupted:
                assert name is not None  # only a run with `stop` is interrupted, and such a run is always named
                raise Interrupted(f"stopped after {run.result.tokens:,} tokens; memory saved as snapshot "
                                  f"'{name}'. Resume with:\n  {resume_command(path, name)}")
    source["path"] = path if path != "-" else "<stdin>"
    _check_same_tokens(runs)
    deltas = [{"method": r.method, "reference": runs[0].method, **paired_delta(r.result.sums, runs[0].result.sums)}
              for r in runs[1:]]
    return PplReport(source, runs, settings, dict(backbone.fingerprint), deltas)


def _specs(presets: list[Preset], backbone: Backbone, flags: dict[str, Any], options: dict | None,
           max_tokens: int | str | None, snap: Snapshot | None, path: str, adapter: str | None = None,
           allow_untrained: bool = False) -> list[RunSpec]:
    """Build and check each method's run; a resume rebuilds it from the snapshot and checks agreement."""
    if snap is not None:
        spec = method_from_snapshot(snap, backbone)
        spec.max_tokens = resume_max_tokens(snap, max_tokens)
        requested = {"segment": flags["segment"], "options": (options or {}).get(spec.method.name, {})}
        if presets[0].name != spec.preset:
            requested["method"] = presets[0].method
        check_resume(snap, backbone, spec, path, requested)
        return [spec]
    specs = []
    for i, p in enumerate(presets):
        opts = options or {}
        method, _ = build_method(p, backbone, {**opts.get(p.method, {}), **opts.get(p.name, {})},
                                 adapter=adapter if i == 0 else None, allow_untrained=allow_untrained)
        seg = resolve_settings(**flags, preset=p)["segment"]
        method.check_segment(seg)
        specs.append(RunSpec(method, p.name, seg, None if isinstance(max_tokens, str) else max_tokens))
    return specs


def _check_comparable(specs: list[RunSpec]) -> None:
    """Refuse to pair a non-causal configuration (its tokens see text after them) with causal ones."""
    leaky = [s.method.describe() for s in specs if not s.method.causal]
    if leaky and len(leaky) < len(specs):
        raise UsageError(f"{', '.join(leaky)} is non-causal (a scored token sees text after it), so its perplexity "
                         "is not comparable with causal methods; run it alone or only with other non-causal ones")


def _save_name(save_memory: str, preset: str, n: int) -> str:
    """The snapshot a method's memory is saved as: NAME, or NAME-PRESET when several methods run."""
    return check_name(save_memory if n == 1 else f"{save_memory}-{preset}")


def _check_not_another_document(store: SnapshotStore, names: list[str], path: str) -> None:
    """Refuse, before anything runs, to save over a snapshot that holds another document's memory."""
    here = document_identity(path, 0)["path"]  # the path a snapshot of this run records
    for name in names:
        if name not in store.names():
            continue
        theirs = store.load(name, tensors=False).manifest.get("document", {}).get("path")
        if theirs != here:
            raise UsageError(f"snapshot '{name}' already holds the memory of {theirs}; choose another --save-memory "
                             "name, or pass --overwrite to save over it (its current version is kept as the "
                             "previous one)")


def _snapshot_name(save_memory: str | None, spec: RunSpec, n: int, stop: Callable | None) -> str | None:
    if save_memory:
        return _save_name(save_memory, spec.preset, n)
    if stop is not None:  # an interruptible run saves where it stops, under a generated name
        return check_name(f"interrupted-{spec.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    return None


def _run_one(backbone: Backbone, spec: RunSpec, src_path: str, path: str, store: SnapshotStore, name: str | None,
             save_every: int | None, save_final: bool, snap: Snapshot | None, stop: Callable[[], bool] | None,
             on_segment: Callable[[SegmentEvent], None] | None) -> tuple[MethodRun, dict[str, Any]]:
    method = spec.method
    stats: dict[str, Any] = {}
    state, sums, skip = restore(snap, spec) if snap is not None else (None, None, 0)
    first = continuation(snap, sums) if snap is not None and sums is not None else None
    save: Callable[[StreamResult], object] | None = None
    if name:
        save = functools.partial(save_run, store, name, backbone, spec, path)
    reset_peak_rss()
    with open_source(src_path) as src:
        segments = iter_segments(iter_tokens(backbone.tokenizer, src.blocks()), spec.segment,
                                 max_tokens=spec.max_tokens, stats=stats)
        result = run_stream(backbone, method, _skip(segments, skip, first), state=state, sums=sums, on_segment=on_segment,
                            stop=stop, checkpoint_every=save_every if save_final else None,
                            on_checkpoint=save)
        if snap is not None and result.tokens <= skip:  # nothing was left to read
            result.tokens, result.next_byte = skip, int(snap.manifest["document"]["bytes_consumed"])
            result.after_cut = restored_after_cut(snap)
        if result.sums.tokens < 1 and not result.interrupted:
            raise InputError(f"{src.name} has {result.tokens} token(s); at least 2 are needed to score one")
        if stats.get("words") == 0:  # complete input, and not one non-space character in it
            raise InputError(f"{src.name} contains only whitespace ({src.bytes_read} bytes); there is no text to score")
        save_error = _save_end(save, result, save_final)
        source = _source_identity(src, src_path, path, stats)
    run = MethodRun(spec.preset, method.describe(), spec.segment, dict(method.unimem().rows()), result,
                    peak_rss_mb(), peak_gpu_mb(), save_error)
    return run, source


def _save_end(save: Callable[[StreamResult], object] | None, result: StreamResult, save_final: bool) -> str | None:
    """Save the memory where the run ended. A failed final save (disk full, read-only directory) must not
    lose a finished result: it is returned as a message and the result is still reported; an interrupted
    run, whose whole point is the snapshot, raises."""
    if save is None or not (result.interrupted or save_final):
        return None
    try:
        save(result)
    except SnapshotError as e:
        if result.interrupted:
            raise
        return e.message
    return None


def _source_identity(src, src_path: str, path: str, stats: dict[str, Any]) -> dict[str, Any]:
    """Size and sha256 of exactly the bytes the scored tokens came from (the consumed prefix)."""
    end = stats.get("end_byte")
    if end is None or src.size is None:  # stdin, a FIFO: cannot be re-read, so hash what was read
        digest, hashed = src.sha256_hex(), src.bytes_read
    else:
        digest, hashed = prefix_sha256(src_path, end), end
    return {"size": src.size, "bytes_read": src.bytes_read, "sha256_prefix": digest, "bytes_hashed": hashed,
            "tokens": stats.get("tokens"), "end_byte": end, "words": stats.get("words")}


def _resume_point(snap: Snapshot | None) -> dict[str, int]:
    """Where a run starts: tokens and bytes a resumed snapshot already consumed (0 for a new run)."""
    if snap is None:
        return {"start_tokens": 0, "start_byte": 0}
    return {"start_tokens": int(snap.manifest["progress"]["tokens_consumed"]),
            "start_byte": int(snap.manifest["document"]["bytes_consumed"])}


def _skip(segments, tokens: int, first: Callable | None = None):
    """Drop the segments a resumed snapshot already consumed (they must end exactly at `tokens`); `first`
    sees the first new segment (a finished run's prediction past its cut is added there)."""
    for seg in segments:
        if seg.start < tokens:
            if seg.start + len(seg) > tokens:
                if first is not None:  # the snapshot's run had ended there, inside a segment
                    raise SnapshotError(f"the snapshot's run ended at token {tokens:,}, inside a segment, and the "
                                        "document is longer now; start a new run to score the longer document")
                raise SnapshotError("the snapshot does not end on a segment boundary of this run")
            continue
        if seg.start == tokens and first is not None:
            first(seg)
        yield seg


def _check_same_tokens(runs: list[MethodRun]) -> None:
    digests = {r.result.token_digest for r in runs}
    if len(digests) > 1:  # a bug, not a user error: comparisons would be meaningless
        raise RuntimeError("methods saw different token streams; paired comparison refused")


def _is_pipe(path: str) -> bool:
    """A FIFO or a process substitution (/dev/fd/N): it can be read only once."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False  # missing etc.: open_source reports it


@contextmanager
def _replayable(path: str, uses: int):
    """Yield a path that can be read `uses` times: stdin or a pipe is spooled to a temporary file when needed."""
    if uses == 1 or (path != "-" and not _is_pipe(path)):
        yield path
        return
    tmp = tempfile.NamedTemporaryFile(prefix="longctx-stdin-", delete=False)
    try:
        with tmp:
            if path == "-":
                import sys

                shutil.copyfileobj(sys.stdin.buffer, tmp, 1 << 20)
            else:
                with open(path, "rb") as pipe:
                    shutil.copyfileobj(pipe, tmp, 1 << 20)
        yield tmp.name
    finally:
        os.unlink(tmp.name)
