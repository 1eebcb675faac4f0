"""Rendering: rich progress on stderr; results (tables, JSON, JSON lines) on stdout."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:  # annotations only: rendering a listing must not import torch
    from ..stream import SegmentEvent
    from ..tasks.corpus import CorpusReport
    from ..tasks.perplexity import PplReport

PLAIN_EVERY_S = 15.0  # non-interactive stderr: one log line at most this often


def stderr_console() -> Console:
    return Console(stderr=True, soft_wrap=True)  # long paths and commands must stay copy-pasteable


def stdout_console() -> Console:
    """Results: on a terminal at its width; piped or redirected, wide enough that no table cuts a name
    (rich would otherwise assume 80 columns and shorten `ask-smallbook-…` into something no command accepts)."""
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else PIPED_WIDTH)


PIPED_WIDTH = 1000


def clock(seconds: float) -> str:
    """0:42, 3:05, 1:02:03."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class ProgressView:
    """Per-method progress: a rich bar on a terminal, periodic plain lines otherwise (CI logs); both show
    the elapsed and the remaining time. Rates count only what this process read (a resumed run starts at
    its snapshot, not at 0)."""

    def __init__(self, console: Console, *, total: int | None, unit: str, enabled: bool = True):
        self.console, self.total, self.unit, self.enabled = console, total, unit, enabled
        self.interactive = console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_log = 0.0
        self._name = ""
        self._first: tuple[float, int, int] | None = None  # (time, tokens, done) at the first update
        self._t_start = time.monotonic()

    def start_method(self, name: str, protocol: str, *, total: int | None = None, unit: str | None = None,
                     start: int = 0) -> None:
        """A new method (or document) begins; `total`/`unit` replace the view's, `start` is where it resumes."""
        self._name, self._first = name, None
        self._t_start = self._last_log = time.monotonic()
        if total is not None or unit is not None:
            self.total, self.unit = total, unit or self.unit
        if not self.enabled:
            return
        self.console.print(f"[bold]{name}[/]: {protocol}", highlight=False)
        if self.interactive:
            self._stop_bar()
            # the times before the statistics: on a narrow terminal rich cuts the end of the line
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), TimeElapsedColumn(),
                                      TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                                      console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(name, total=self.total, stats="", completed=start)

    def update(self, ev: SegmentEvent) -> None:
        if not self.enabled:
            return
        done = ev.tokens if self.unit == "tokens" else ev.byte_end
        self._show(done, ev.tokens, f"ppl {ev.running_ppl:.3f}  mem {ev.memory:,}")

    def reading(self, tokens: int, byte_end: int) -> None:
        """Progress of a document read into memory without scoring (ask, generate)."""
        if not self.enabled:
            return
        self._show(tokens if self.unit == "tokens" else byte_end, tokens, "")

    def _rate(self, done: int, tokens: int) -> tuple[float | None, float | None, float]:
        """Tokens/s and units/s since the first update (None before a second one: one segment is no rate),
        and the seconds since then."""
        now = time.monotonic()
        if self._first is None:
            self._first = (now, tokens, done)
        t0, tok0, done0 = self._first
        dt = now - t0
        if dt <= 0 or tokens <= tok0:
            return None, None, dt
        return (tokens - tok0) / dt, (done - done0) / dt, dt

    def _show(self, done: int, tokens: int, extra: str) -> None:
        tps, ups, _ = self._rate(done, tokens)
        rate = f"{tps:,.0f} tok/s" if tps is not None else "— tok/s"
        stats = f"{tokens:,} tok  {rate}" + (f"  {extra}" if extra else "")
        if self._progress is not None:
            assert self._task is not None  # added with the bar
            self._progress.update(self._task, completed=done, stats=stats)
        elif time.monotonic() - self._last_log >= PLAIN_EVERY_S:
            self._last_log = time.monotonic()
            pct = f"{100 * done / self.total:5.1f}% " if self.total else ""
            elapsed = clock(time.monotonic() - self._t_start)
            left = f", ~{clock((self.total - done) / ups)} left" if self.total and ups else ""
            self.console.print(f"  {self._name}: {pct}{stats}  ({elapsed} elapsed{left})", highlight=False)

    def _stop_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self._stop_bar()


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def ppl_tables(report: PplReport) -> list[Table]:
    """The summary table (one row per method) and the PPL-by-position table."""
    d = report.to_dict()
    deltas = {x["method"]: x for x in d["deltas"]}
    summary = Table(title=f"Perplexity — {d['source']['path']}", title_justify="left")
    cols = ["method", "segment", "PPL ± SE", "bits/byte", "scored", "tok/s", "peak RSS MiB"]
    if deltas:
        cols.append(f"Δ NLL vs {d['runs'][0]['method']}")
    for col in cols:
        summary.add_column(col, justify="left" if col == "method" else "right")
    for r in d["runs"]:
        delta = deltas.get(r["method"])
        dtxt = f"{delta['delta_nll']:+.4f} ± {_fmt(delta['delta_nll_se'], '.4f')} (×{delta['ppl_ratio']:.3f})" if delta else "ref"
        row = [r["method"], str(r["segment"]), f"{_fmt(r['ppl'])} ± {_fmt(r['ppl_se'])}",
               _fmt(r["bits_per_byte"], ".4f"), f"{r['tokens']:,}", _fmt(r["tokens_per_s"], ",.0f"),
               _fmt(r["peak_rss_mb"], ",.0f")]
        summary.add_row(*(row + [dtxt] if deltas else row))
    buckets = Table(title="PPL by position of the predicted token", title_justify="left")
    buckets.add_column("positions")
    for r in d["runs"]:
        buckets.add_column(r["method"], justify="right")
    spans = [(b["from"], b["to"]) for b in d["runs"][0]["buckets"]]
    for lo, hi in spans:
        row = [f"{lo:,}–{hi:,}"]
        for r in d["runs"]:
            hit = [b for b in r["buckets"] if b["from"] == lo]
            row.append(_fmt(hit[0]["ppl"]) if hit else "—")
        buckets.add_row(*row)
    return [summary, buckets]


def protocol_lines(report: PplReport) -> list[str]:
    """One llama.cpp-style line per method carrying everything needed to compare numbers."""
    d = report.to_dict()
    m = d["model"]
    lines = []
    for r in d["runs"]:
        lines.append(
            f"PPL = {_fmt(r['ppl'], '.4f')} ± {_fmt(r['ppl_se'], '.4f')} | bpb = {_fmt(r['bits_per_byte'], '.4f')} | "
            f"tokens = {r['tokens']} | segments = {r['segments']} | method = {r['protocol']} | segment = {r['segment']} | "
            f"model = {m['model']} ({m['source']}, {m['dtype']}, tokenizer {m['tokenizer_sha256']}) | "
            f"input sha256 = {d['source']['sha256_prefix'][:16]} (first {d['source']['bytes_hashed']} bytes)")
    return lines


def print_ppl(report: PplReport, console: Console) -> None:
    for table in ppl_tables(report):
        console.print(table)
    for line in protocol_lines(report):
        console.print(line, highlight=False, markup=False)


def corpus_table(report: CorpusReport) -> Table:
    """One row per document, then the micro (pooled tokens) and macro (mean over files) averages."""
    d = report.to_dict()
    table = Table(title=f"Perplexity — {len(d['files'])} documents, {d['protocol']}, segment {d['segment']}",
                  title_justify="left")
    for col in ("document", "tokens", "PPL ± SE", "bits/byte", "tok/s", "from"):
        table.add_column(col, justify="left" if col in ("document", "from") else "right")
    for f in d["files"]:
        table.add_row(f["path"], f"{f['tokens']:,}", f"{_fmt(f['ppl'])} ± {_fmt(f['ppl_se'])}",
                      _fmt(f["bits_per_byte"], ".4f"), _fmt(f["tokens_per_s"], ",.0f"), "log" if f["from_log"] else "run")
    micro, macro = d["micro"], d["macro"]
    table.add_section()
    table.add_row("micro (tokens pooled)", f"{micro['tokens']:,}", _fmt(micro["ppl"]),
                  _fmt(micro["bits_per_byte"], ".4f"), "", "")
    table.add_row(f"macro (mean of {macro['files']})", "", _fmt(macro["ppl"]), _fmt(macro["bits_per_byte"], ".4f"),
                  "", "")
    return table


def corpus_protocol_line(report: CorpusReport) -> str:
    """The llama.cpp-style line for a many-document run."""
    d = report.to_dict()
    m, micro, macro = d["model"], d["micro"], d["macro"]
    return (f"micro PPL = {_fmt(micro['ppl'], '.4f')} | macro PPL = {_fmt(macro['ppl'], '.4f')} | "
            f"bpb = {_fmt(micro['bits_per_byte'], '.4f')} | files = {macro['files']} | tokens = {micro['tokens']} | "
            f"method = {d['protocol']} | segment = {d['segment']} | "
            f"model = {m['model']} ({m['source']}, {m['dtype']}, tokenizer {m['tokenizer_sha256']})")


def print_corpus(report: CorpusReport, console: Console) -> None:
    console.print(corpus_table(report))
    console.print(corpus_protocol_line(report), highlight=False, markup=False)


def print_json(obj: Any) -> None:
    """One JSON document per line on stdout; NaN becomes null (JSON has no NaN)."""
    sys.stdout.write(json.dumps(_finite(obj), default=str) + "\n")
    sys.stdout.flush()


def event_json(ev: SegmentEvent) -> dict[str, Any]:
    return {"schema_version": 1, "event": "segment", **asdict(ev)}


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def mib(nbytes: int | None) -> str:
    """Bytes as MiB for a table; "?" where they were not recorded (a snapshot from before they were)."""
    return "?" if nbytes is None else f"{nbytes / 2**20:,.1f} MiB"


def print_dump(info: dict[str, Any], console: Console) -> None:
    """`memory dump`: header, tensors, then one row per group of entries with its source excerpt."""
    console.print(f"[bold]{info['name']}[/]: {info['method']}, segment {info['segment']}, model {info['model']}",
                  highlight=False)
    console.print(f"document {info['document']}: {info['tokens_consumed']:,} tokens consumed; "
                  f"{info['entries']:,} entries in memory; {mib(info['disk_bytes'])} on disk, "
                  f"{mib(info['ram_bytes'])} in RAM", highlight=False)
    tensors = Table(title="Tensors", title_justify="left")
    for col in ("name", "shape", "dtype", "MiB"):
        tensors.add_column(col)
    for t in info["tensors"]:
        tensors.add_row(t["name"], "×".join(map(str, t["shape"])) or "scalar", t["dtype"], f"{t['bytes'] / 2**20:.2f}")
    console.print(tensors)
    groups = Table(title="Entries by source span", title_justify="left")
    for col in ("kind", "entries", "tokens", "bytes from", "excerpt"):
        groups.add_column(col)
    for g in info["groups"]:
        excerpt = g["excerpt"] if g["excerpt"] is not None else "(source not available or changed)"
        where = f"{g['byte_start']:,}" + (f" ({g['page']})" if g.get("page") else "")  # a PDF's page
        groups.add_row(g["kind"], f"{g['entries']:,}", f"{g['tokens'][0]:,}–{g['tokens'][1]:,}", where, excerpt)
    console.print(groups)


def print_passkey(result: dict[str, Any], console: Console) -> None:
    """Accuracy per method (rows) and length (columns), then failures and the protocol of each method."""
    lengths = result["config"]["lengths"]
    table = Table(title=f"passkey retrieval ({result['config']['trials']} trials per cell, depths "
                        f"{', '.join(map(str, result['config']['depths']))})")
    table.add_column("method")
    for n in lengths:
        table.add_column(f"{n:,} tok", justify="right")
    table.add_column("failures")
    table.add_column("s/trial", justify="right")
    for name in result["methods"]:
        cells = {c["length"]: c for c in result["cells"] if c["method"] == name}
        fails: dict[str, int] = {}
        for c in cells.values():
            for k, v in c["failures"].items():
                fails[k] = fails.get(k, 0) + v
        row = [f"{100 * cells[n]['accuracy']:.0f}% ({cells[n]['correct']}/{cells[n]['trials']})" if n in cells else "-"
               for n in lengths]
        secs = sum(c["seconds_per_trial"] for c in cells.values()) / max(len(cells), 1)
        table.add_row(name, *row, ", ".join(f"{k} {v}" for k, v in fails.items()) or "none", f"{secs:.1f}")
    console.print(table)
    for name, protocol in result["methods"].items():
        console.print(f"  {name}: {protocol}", highlight=False)
    fp = result["model"]
    console.print(f"  model {fp['model']} ({fp['dtype']}), filler {result['filler']}, seed {result['config']['seed']}",
                  highlight=False)


def print_needle(result: dict[str, Any], console: Console) -> None:
    """Needle accuracy per method (rows) and length (columns), absent-fact accuracy, ingestion rate."""
    cfg = result["config"]

    def row(name: str) -> tuple[dict[int, dict[str, Any]], list[str]]:
        cells = [c for c in result["cells"] if c["method"] == name]
        needle = {c["length"]: c for c in cells if c["kind"] == "needle"}
        absent = [c for c in cells if c["kind"] == "absent"]
        rates = [c["ingest_tokens_per_s"] for c in needle.values() if c["ingest_tokens_per_s"]]
        firsts = [c["first_token_s"] for c in needle.values() if c["first_token_s"] is not None]
        absent_text = f"{sum(c['correct'] for c in absent)}/{sum(c['items'] for c in absent)}"
        return needle, [absent_text, _mean(rates, "{:,.0f}"), _mean(firsts, "{:.2f}")]

    title = f"needle QA ({cfg['trials']} documents per length, {cfg['needles']} facts each)"
    _accuracy_table(result, title, [(n, f"{n:,} tok") for n in cfg["lengths"]],
                    ["absent fact", "read tok/s", "1st token s"], row, console)


def print_retention(result: dict[str, Any], console: Console) -> None:
    """Retention accuracy per method (rows) and distance (columns), with each method's reading rate."""
    cfg = result["config"]

    def row(name: str) -> tuple[dict[int, dict[str, Any]], list[str]]:
        rates = [r["tokens_per_s"] for r in result["reading"] if r["method"] == name and r["tokens_per_s"]]
        return {c["distance"]: c for c in result["cells"] if c["method"] == name}, [_mean(rates, "{:,.0f}")]

    title = f"knowledge retention ({cfg['trials']} stream(s) of {cfg['facts']} facts per method)"
    _accuracy_table(result, title, [(d, f"{d:,} tok later") for d in cfg["distances"]], ["read tok/s"], row, console)


def _accuracy_table(result: dict[str, Any], title: str, columns: list[tuple[int, str]], extra: list[str],
                    row: Callable[[str], tuple[dict[int, dict[str, Any]], list[str]]], console: Console) -> None:
    """The shape the accuracy benchmarks share: one row per method with an accuracy cell per column key
    (`row(name)` gives the cells by key and the `extra` columns' texts), then each method's protocol line."""
    table = Table(title=title)
    table.add_column("method")
    for _, header in columns:
        table.add_column(header, justify="right")
    for header in extra:
        table.add_column(header, justify="right")
    for name in result["methods"]:
        cells, tail = row(name)
        table.add_row(name, *[_accuracy_cell(cells.get(key)) for key, _ in columns], *tail)
    console.print(table)
    for name, protocol in result["methods"].items():
        console.print(f"  {name}: {protocol}", highlight=False)


def _accuracy_cell(cell: dict[str, Any] | None) -> str:
    return f"{100 * cell['accuracy']:.0f}% ({cell['correct']}/{cell['items']})" if cell else "-"


def _mean(values: list[float], fmt: str) -> str:
    return fmt.format(sum(values) / len(values)) if values else "-"


def print_migration(result: dict[str, Any], what: str) -> None:
    """One line on stdout: what `adapters migrate` / `memory migrate` proved and wrote, or that nothing was due."""
    if not result["migrated"]:
        print(f"{what} {result['name']} already records its model by the semantic fingerprint; nothing to do")
        return
    proof = result["proof"]
    print(f"{what} {result['name']} migrated: config equal but for transformers_version "
          f"{proof['config_matched_with_transformers_version']}, same tokenizer, {proof['tensors']}; "
          f"new version at {result['path']}")


def print_models(rows: list[dict[str, Any]]) -> None:
    """The model catalog, the default first: one block per model (a full sha256 does not fit a table column)."""
    console = stdout_console()
    for r in rows:
        state = f"installed, {r['disk_bytes'] / 1e6:,.0f} MB on disk" if r["installed"] else "not installed"
        default = " (default)" if r["default"] else ""
        console.print(f"[bold]{r['name']}[/]{default}  {r['family']}, {r['parameters']} parameters, "
                      f"trained context {r['trained_context']:,}, {state}", highlight=False)
        for label, key in (("what", "what"), ("licence", "licence"), ("source", "source"), ("sha256", "sha256")):
            console.print(f"  {label + ':':<9}{r[key]}", highlight=False)
        if r["retrieval_layers"]:  # infllm's score_layers auto
            console.print(f"  {'layers:':<9}{', '.join(map(str, r['retrieval_layers']))} choose infllm's blocks "
                          "(measured retrieval layers)", highlight=False)
        if not r["installed"] and not r["default"]:
            console.print(f"  install: longctx models install {r['name']}", highlight=False)
