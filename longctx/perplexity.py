"""`longctx ppl` as a library function: every named method over the same tokens, in one process."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .backbone import Backbone
from .config import Resolved, resolve
from .errors import InputError, UsageError
from .methods import get_method
from .methods.base import Method
from .metrics import paired_delta, summarize
from .models import load_backbone
from .presets import Preset, load_preset
from .resources import peak_gpu_mb, peak_rss_mb, reset_peak_rss
from .segments import iter_segments
from .stream import SegmentEvent, StreamResult, run_stream
from .textio import open_source
from .tokens import iter_tokens

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

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"method": self.method, "protocol": self.protocol, "segment": self.segment, "unimem": self.unimem,
                **summarize(r.sums), "tokens_read": r.tokens, "seconds": r.seconds,
                "tokens_per_s": r.tokens / r.seconds if r.seconds > 0 else None,
                "peak_rss_mb": self.peak_rss_mb, "peak_gpu_mb": self.peak_gpu_mb,
                "memory_entries": _memory_entries(r.state), "token_sha256": r.token_digest}


@dataclass
class PplReport:
    """Results of `perplexity()`: one run per method, paired deltas against the first, the context."""

    source: dict[str, Any]
    runs: list[MethodRun]
    settings: Resolved
    fingerprint: dict[str, Any]
    deltas: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "longctx": __version__, "source": self.source,
                "model": self.fingerprint, "settings": self.settings.values, "settings_origin": self.settings.origins,
                "runs": [r.to_dict() for r in self.runs], "deltas": self.deltas, "environment": environment()}


def environment() -> dict[str, Any]:
    """Library versions, threads and machine, printed with every result."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _memory_entries(state: Any) -> int | None:
    return len(state) if hasattr(state, "__len__") else None


def build_method(spec: str | Preset, backbone: Backbone, overrides: dict[str, Any] | None = None) -> tuple[Method, Preset]:
    """Instantiate a method from a preset name/path (or Preset), with option overrides."""
    preset = load_preset(spec) if isinstance(spec, str) else spec
    cls = get_method(preset.method)
    options = cls.Options.from_mapping({**preset.options, **(overrides or {})}, where=f"{preset.method} option")
    return cls(options, backbone), preset


def perplexity(path: str, methods: Sequence[str] = ("xl",), *, model: str | None = None, dtype: str | None = None,
               device: str | None = None, threads: int | None = None, segment: int | None = None,
               max_tokens: int | None = None, options: dict[str, dict[str, Any]] | None = None,
               backbone: Backbone | None = None,
               on_segment: Callable[[SegmentEvent], None] | None = None,
               on_method: Callable[[str, Method, dict], None] | None = None) -> PplReport:
    """Score `path` ("-" = stdin) with each method in turn on the same tokens; deltas vs the first method.

    `options` maps a method name to option overrides. Settings resolve flag > env > user config > preset >
    default; the first method's preset supplies the preset layer for model-level settings.
    """
    if not methods:
        raise UsageError("name at least one method")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens must be >= 2 (got {max_tokens})")
    presets = [load_preset(m) for m in methods]
    flags = {"model": model, "dtype": dtype, "device": device, "threads": threads, "segment": segment}
    settings = resolve(flags, {"segment": presets[0].segment})
    if backbone is None:
        backbone = load_backbone(settings["model"], dtype=settings["dtype"], device=settings["device"],
                                 threads=settings["threads"])
    built = [build_method(p, backbone, (options or {}).get(p.method)) for p in presets]
    seg_lens = [resolve(flags, {"segment": p.segment})["segment"] for p in presets]
    for (method, _), seg in zip(built, seg_lens):
        method.check_segment(seg)
    with _replayable(path, len(built)) as src_path:
        runs, source = [], {}
        for (method, preset), seg in zip(built, seg_lens):
            if on_method is not None:
                on_method(preset.name, method, {"segment": seg})
            run, source = _run_one(backbone, method, src_path, seg, max_tokens, on_segment)
            runs.append(run)
    source["path"] = path if path != "-" else "<stdin>"
    _check_same_tokens(runs)
    deltas = [{"method": r.method, "reference": runs[0].method, **paired_delta(r.result.sums, runs[0].result.sums)}
              for r in runs[1:]]
    return PplReport(source, runs, settings, dict(backbone.fingerprint), deltas)


def _run_one(backbone: Backbone, method: Method, path: str, segment: int, max_tokens: int | None,
             on_segment: Callable[[SegmentEvent], None] | None) -> tuple[MethodRun, dict[str, Any]]:
    stats: dict[str, Any] = {}
    reset_peak_rss()
    with open_source(path) as src:
        segments = iter_segments(iter_tokens(backbone.tokenizer, src.blocks()), segment, max_tokens=max_tokens,
                                 stats=stats)
        result = run_stream(backbone, method, segments, on_segment=on_segment)
        if result.tokens < 2:
            raise InputError(f"{src.name} has {result.tokens} token(s); at least 2 are needed to score one")
        source = {"size": src.size, "bytes_read": src.bytes_read, "sha256_of_read": src.sha256_hex(),
                  "tokens": stats.get("tokens"), "end_byte": stats.get("end_byte"), "words": stats.get("words")}
    run = MethodRun(method.name, method.describe(), segment, dict(method.unimem().rows()), result,
                    peak_rss_mb(), peak_gpu_mb())
    return run, source


def _check_same_tokens(runs: list[MethodRun]) -> None:
    digests = {r.result.token_digest for r in runs}
    if len(digests) > 1:  # a bug, not a user error: comparisons would be meaningless
        raise RuntimeError("methods saw different token streams; paired comparison refused")


@contextmanager
def _replayable(path: str, uses: int):
    """Yield a path that can be read `uses` times: stdin is spooled to a temporary file when needed."""
    if path != "-" or uses == 1:
        yield path
        return
    tmp = tempfile.NamedTemporaryFile(prefix="longctx-stdin-", delete=False)
    try:
        with tmp:
            import sys

            shutil.copyfileobj(sys.stdin.buffer, tmp, 1 << 20)
        yield tmp.name
    finally:
        os.unlink(tmp.name)
