"""`ppl`: perplexity of one document, or of many (per-file results and averages), through a method."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from ..errors import UsageError
from ..text.textio import check_input
from . import app
from .exits import _errors_to_exit
from .options import (
    MethodsOptionOpt,
    ModelOpt,
    ProgressOpt,
    ThreadsOpt,
    _counts,
    _method_list,
    _parse_overrides,
)


@app.command()
@_errors_to_exit
def ppl(
    files: Annotated[list[str] | None, typer.Argument(help="Text file(s), PDF, HTML or gzip/bz2/xz text to score ('-' reads standard input, alone). Several files: per-file results and micro/macro averages.", show_default=False)] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Method or preset name, or a preset .yaml path. Default: xl.")] = None,
    compare: Annotated[str | None, typer.Option(help="Comma-separated methods to run on the same tokens in this process; deltas are against the first.")] = None,
    segment: Annotated[int | None, typer.Option(help="Tokens per forward (default: the preset's). \\[env: LONGCTX_SEGMENT]")] = None,
    max_tokens: Annotated[str | None, typer.Option(metavar="N", help="Read only the first N tokens (16384 or 16k) of the document (of each document). With --resume, a larger N, or all (to the end), extends a finished run.", show_default=False)] = None,
    option: MethodsOptionOpt = None,
    model: ModelOpt = None,
    dtype: Annotated[str | None, typer.Option(help="auto (default: bf16 on GPUs and CPUs with AMX/AVX512-BF16, else fp32), bf16, fp32 or fp16. \\[env: LONGCTX_DTYPE]")] = None,
    device: Annotated[str | None, typer.Option(help="cpu (default), cuda, cuda:N or auto. \\[env: LONGCTX_DEVICE]")] = None,
    threads: ThreadsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object with all results (schema_version 1).")] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON line per segment (and per file), then the result object.")] = False,
    progress: ProgressOpt = True,
    save_memory: Annotated[str | None, typer.Option(help="Save the memory as snapshot NAME at the end (with --compare: NAME-METHOD).")] = None,
    save_every: Annotated[int | None, typer.Option(help="Also checkpoint the snapshot every N segments (needs --save-memory).")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue the run saved in snapshot NAME (same file, model, method, options).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Let --save-memory save over a snapshot of another document.")] = False,
    files_from: Annotated[str | None, typer.Option("--files", metavar="LIST", help="Also score the files listed in LIST: one path per line, '#' comment lines, no '-'.")] = None,
    log: Annotated[str | None, typer.Option("--run-log", metavar="FILE", help="Many documents: append each finished file to this JSON-lines run log; the same command with the same log skips files already done (same sha256 and setup).")] = None,
    adapter: Annotated[str | None, typer.Option(help="Trained parameters (adapter name or directory) for the --method; default: the preset's.")] = None,
    allow_untrained: Annotated[bool, typer.Option("--allow-untrained", help="Run a trainable method without an adapter (its memory is noise; every output says UNTRAINED).")] = False,
) -> None:
    """Perplexity of whole documents, streamed segment by segment through one or more memory methods.

    Prints PPL ± standard error (over 1024-token blocks), bits per byte, PPL by position, tokens/s and
    peak RSS, with the protocol of every number. With --compare, every method reads the same tokens.
    Ctrl-C stops after the current segment, saves the memory and prints the resume command (exit 130).
    Several documents (arguments and/or --files LIST) are scored one by one, each with fresh memory:
    a row per file, the micro average (all tokens pooled) and the macro average (mean over files).
    --run-log makes such a run resumable file by file.
    """
    from ..tasks.corpus import read_file_list

    docs = [*(files or []), *(read_file_list(files_from) if files_from else [])]
    if len(docs) == 1:
        check_input(docs[0])
    if not docs:
        raise UsageError("give a document to score (a file, or '-' for standard input), several files, or --files LIST")
    limit = _max_tokens(max_tokens)
    if limit == "all" and not resume:
        limit = None  # without a snapshot, "all" is the default: the whole document
    common = {"model": model, "dtype": dtype, "device": device, "threads": threads, "segment": segment,
              "max_tokens": limit, "adapter": adapter, "allow_untrained": allow_untrained}
    if len(docs) == 1 and not files_from and not log:
        common["overwrite"] = overwrite
        _ppl_one(docs[0], method, compare, option or [], common, json_out, jsonl, progress, save_memory, save_every,
                 resume)
        return
    if compare or save_memory or save_every or resume:
        raise UsageError("--compare, --save-memory, --save-every and --resume work on one document; "
                         "score several documents with one --method")
    _warn_untrained_start(common)
    _ppl_many(docs, method, _parse_overrides(option or [], [method or "xl"]), common, json_out, jsonl, progress, log)


def _max_tokens(text: str | None) -> int | str | None:
    """--max-tokens: a token count (16384 or 16k), or all (with --resume: read to the end)."""
    if text is None or text.strip().lower() == "all":
        return None if text is None else "all"
    counts = _counts(text, "--max-tokens")
    if len(counts) != 1:
        raise UsageError(f"--max-tokens takes one token count, e.g. 16k, or all (got {text!r})")
    return counts[0]


def _ppl_one(file: str, method: str | None, compare: str | None, option: list[str], common: dict[str, Any],
             json_out: bool, jsonl: bool, progress: bool, save_memory: str | None, save_every: int | None,
             resume: str | None) -> None:
    """One document: the `perplexity()` report, with snapshots, --compare and graceful Ctrl-C."""
    from ..interrupts import GracefulInterrupt
    from ..tasks.perplexity import perplexity
    from ..text.documents import text_path
    from .render import ProgressView, event_json, print_json, print_ppl, stderr_console, stdout_console

    names = _method_list(method, compare) if (method or compare or not resume) else []
    overrides = _parse_overrides(option, names)
    # a document's progress counts bytes of its extracted text (what is read), not of the file
    size = os.path.getsize(text_path(file)) if file != "-" and os.path.isfile(file) else None
    view = ProgressView(stderr_console(), total=size, unit="bytes", enabled=progress and not json_out)

    def on_method(name: str, m, info: dict[str, Any]) -> None:
        # the run knows how far it reads (a resumed one: the snapshot's --max-tokens) and where it starts
        limit = info["max_tokens"]
        view.start_method(name, f"{m.describe()}, segment {info['segment']}", total=limit or size,
                          unit="tokens" if limit else "bytes",
                          start=info["start_tokens"] if limit else info["start_byte"])

    def on_segment(ev):
        view.update(ev)
        if jsonl:
            print_json(event_json(ev))

    try:
        _warn_untrained_start(common)
        with GracefulInterrupt() as stop:
            report = perplexity(file, names, **common, options=overrides, save_memory=save_memory,
                                save_every=save_every, resume=resume, stop=stop, on_segment=on_segment,
                                on_method=on_method)
    finally:
        view.close()
    if json_out or jsonl:
        print_json({"event": "result", **report.to_dict()} if jsonl else report.to_dict())
    else:
        print_ppl(report, stdout_console())
        if progress and common["max_tokens"] and not resume and not report.runs[0].save_error:
            _next_step(file, report, common)
    _warn_untrained(report.runs)
    _report_save_errors(report.runs)


def _next_step(file: str, report, common: dict[str, Any]) -> None:
    """After a run cut by --max-tokens: the one-line command for the whole document (with the model, dtype,
    device, threads and segment flags given to this one), its size and the time it would take at the rate
    just measured."""
    from ..invocation import command_line
    from .render import clock, stderr_console

    src, run = report.source, report.runs[0]
    end, size = src.get("end_byte"), src.get("size")
    if file == "-" or not end or not size or end >= size or not run.result.seconds:
        return
    tokens = run.result.tokens * size / end  # this run's tokens per byte, over the whole file
    rate = run.result.tokens / run.result.seconds
    method = "xl" if any(r.method == "xl" for r in report.runs) else run.method
    if method != run.method:
        rate = next(r.result.tokens / r.result.seconds for r in report.runs if r.method == method)
    flags = [x for k in ("model", "dtype", "device", "threads", "segment") if common.get(k) is not None
             for x in (f"--{k}", str(common[k]))]
    stderr_console().print(f"next, the whole document (~{tokens:,.0f} tokens, ~{clock(tokens / rate)} at {method}'s "
                           f"{rate:,.0f} tok/s here):\n  {command_line('ppl', file, '--method', method, *flags)}",
                           highlight=False)


def _report_save_errors(runs) -> None:
    """The result above is complete; the memory was not saved: say so and exit 1 (docs/errors.md)."""
    from ..errors import EXIT_RUNTIME
    from .render import stderr_console

    failed = [r.save_error for r in runs if r.save_error]
    for message in failed:
        stderr_console().print(f"[bold red]error:[/] {message} (the result above is complete)", highlight=False)
    if failed:
        raise typer.Exit(EXIT_RUNTIME)


def _warn_untrained_start(common: dict[str, Any]) -> None:
    from .render import stderr_console

    if common.get("allow_untrained"):
        stderr_console().print("[yellow]warning:[/] --allow-untrained: trainable methods without an adapter run "
                               "with random memory parameters; their numbers say nothing about the method")


def _warn_untrained(runs) -> None:
    from .render import stderr_console

    for r in runs:
        if "UNTRAINED" in r.protocol:
            stderr_console().print(f"[yellow]warning:[/] {r.method} ran UNTRAINED (no adapter): its result is "
                                   "not the method's")


def _ppl_many(docs: list[str], method: str | None, overrides: dict[str, dict[str, Any]], common: dict[str, Any],
              json_out: bool, jsonl: bool, progress: bool, log: str | None) -> None:
    """Several documents through `perplexity_many()`; Ctrl-C stops at once (--run-log keeps finished files)."""
    from ..sharding import is_main_process
    from ..tasks.corpus import perplexity_many
    from .render import ProgressView, event_json, print_corpus, print_json, stderr_console, stdout_console

    main = is_main_process()  # under accelerate launch / torchrun only rank 0 shows progress and prints
    jsonl = jsonl and main
    err, show = stderr_console(), progress and not json_out and main
    views: list[ProgressView] = []

    def on_start(i: int, path: str) -> None:
        for v in views:
            v.close()
        views[:] = [ProgressView(err, total=os.path.getsize(path), unit="bytes", enabled=show)]
        views[0].start_method(f"[{i + 1}/{len(docs)}] {path}", method or "xl")

    def on_segment(ev) -> None:
        views[0].update(ev)
        if jsonl:
            print_json(event_json(ev))

    def on_file(i: int, result) -> None:
        if result.from_log and show:
            err.print(f"[{i + 1}/{len(docs)}] {result.path}: done in run log {log}, skipped", highlight=False)
        if jsonl:
            print_json({"schema_version": 1, "event": "file", **result.to_dict()})

    try:
        report = perplexity_many(docs, method, **common, options=overrides, log=log, on_start=on_start,
                                 on_file=on_file, on_segment=on_segment)
    finally:
        for v in views:
            v.close()
    if not main:
        return
    if json_out or jsonl:
        print_json({"event": "result", **report.to_dict()} if jsonl else report.to_dict())
    else:
        print_corpus(report, stdout_console())
