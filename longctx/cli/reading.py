"""Reading a document through a method: `ppl` (perplexity), `ask` (questions over its memory), `generate`."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer

from ..errors import UsageError
from ..text.textio import check_input
from . import app
from .exits import _errors_to_exit
from .options import (
    AdapterOpt,
    DeviceOpt,
    DtypeOpt,
    MethodsOptionOpt,
    ModelOpt,
    OptionOpt,
    ProgressOpt,
    SegmentOpt,
    ThreadsOpt,
    UntrainedOpt,
    _counts,
    _method_list,
    _parse_overrides,
    _preset_key,
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


DEFAULT_ASK_METHOD = "infllm-qa"  # = longctx.qa.DEFAULT_METHOD (not imported here: the CLI starts fast)
SAMPLING_HELP = "0 = greedy (default, reproducible); > 0 samples from softmax(logits / T)."
# Options that ask and generate share, declared once.
TemperatureOpt = Annotated[float, typer.Option(help=SAMPLING_HELP)]
TopKOpt = Annotated[int, typer.Option(help="Sample among the K most likely tokens (0 = all).")]
TopPOpt = Annotated[float, typer.Option(help="Sample from the smallest set holding this much probability.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of sampling.")]
ReuseOpt = Annotated[bool, typer.Option("--reuse/--no-reuse", help="Reuse the stored memory of this document, model and method (ingest once).")]


def _sampling(temperature: float, top_k: int, top_p: float, seed: int):
    from ..tasks.sampling import Sampling

    return Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def _read_questions(question: str | None, questions_file: str | None) -> list[str]:
    """The positional question, then one per line of --questions FILE ('#' lines and blank lines skipped)."""
    qs = [question] if question is not None else []
    if questions_file:
        from ..text.textio import open_source

        with open_source(questions_file) as src:
            text = "".join(b.text for b in src.blocks())
        qs += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return qs


def _reading_view(file: str, enabled: bool):
    """A progress view for reading a document into memory, and the on_segment callback feeding it (the
    rate appears from the second segment on: the first one alone says nothing about speed)."""
    from ..text.documents import text_path
    from .render import ProgressView, stderr_console

    # a document's progress counts bytes of its extracted text (what is read), not of the file
    size = os.path.getsize(text_path(file)) if file != "-" and os.path.isfile(file) else None
    view = ProgressView(stderr_console(), total=size, unit="bytes", enabled=enabled)
    started: list[bool] = []

    def on_segment(seg) -> None:
        if not started:
            started.append(True)
            view.start_method("reading", file)
        view.reading(seg.start + len(seg), int(seg.next_byte))

    return view, on_segment


def _age(saved_at: float) -> str:
    """'40 s', '12 min', '3 h', '2 days': how long ago a stored memory was saved."""
    import time

    s = max(0.0, time.time() - saved_at)
    for size, unit in ((86400, "day"), (3600, "h"), (60, "min")):
        if s >= size:
            n = round(s / size)
            return f"{n} {unit}s" if unit == "day" and n != 1 else f"{n} {unit}"
    return f"{s:.0f} s"


def _memory_line(memory: dict[str, Any]) -> str:
    if memory.get("note"):
        from .render import stderr_console

        stderr_console().print(f"[yellow]warning:[/] {memory['note']}", highlight=False)
    if memory.get("reused"):
        age = f", saved {_age(memory['saved_at'])} ago" if memory.get("saved_at") else ""
        return f"memory: reused {memory['snapshot']}{age} (loaded in {memory['load_seconds']:.2f} s)"
    rate = memory.get("ingest_tokens_per_s")
    where = f", saved as {memory['snapshot']}" if memory.get("snapshot") else ""
    what = f"{memory.get('document_tokens', memory.get('chunks', 0)):,} {'tokens' if 'document_tokens' in memory else 'chunks'}"
    return f"memory: read {what} in {memory['ingest_seconds']:.1f} s" + (f" ({rate:,.0f} tok/s)" if rate else "") + where


@app.command()
@_errors_to_exit
def ask(
    file: Annotated[str, typer.Argument(help="The document (a text file, PDF, HTML page or gzip/bz2/xz text; '-' reads standard input, which is not reused).")],
    question: Annotated[str | None, typer.Argument(help="The question (or use --questions FILE).")] = None,
    questions_file: Annotated[str | None, typer.Option("--questions", metavar="FILE", help="Questions, one per line ('#' lines skipped), all answered over one reading.")] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Memory method or preset, or rag (the retrieval-augmented baseline). Default: infllm-qa.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option override key=value (repeatable); for rag: topk, chunk_tokens, embedder.")] = None,
    cite: Annotated[bool, typer.Option("--cite", help="Print the source spans that support each answer (byte offsets, a PDF's page, relevance share, excerpts).")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 128,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="Use the model's chat template (default: when it has one).", show_default=False)] = None,
    instruction: Annotated[str | None, typer.Option(help="The line read before each question (default: answer in a few words).")] = None,
    reuse: ReuseOpt = True,
    segment: SegmentOpt = None,
    adapter: AdapterOpt = None,
    allow_untrained: UntrainedOpt = False,
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (answers, citations, timings, protocol) at the end.")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Answer questions about a long document from its memory, streaming each answer to stdout.

    The document is read into the method's memory once and saved; asking again (same document, model,
    method, options) reuses that memory. Each question continues its own copy of it.
    """
    from ..tasks.qa import ask as ask_fn
    from .render import print_json, stderr_console

    check_input(file)
    qs = _read_questions(question, questions_file)
    name = method or DEFAULT_ASK_METHOD
    err, out = stderr_console(), sys.stdout
    view, on_segment = _reading_view(file, progress and not json_out)
    shown = [-1]

    def on_text(i: int, piece: str) -> None:
        if json_out:
            return
        if i != shown[0]:
            if len(qs) > 1:
                out.write(("\n" if i else "") + f"Q{i + 1}: {qs[i]}\nA{i + 1}: ")
            shown[0] = i
        out.write(piece)
        out.flush()

    def on_memory(memory: dict[str, Any]) -> None:
        view.close()
        if progress and not json_out:
            err.print(_memory_line(memory), highlight=False)

    try:
        report = ask_fn(file, qs, method=name, model=model, dtype=dtype, device=device, threads=threads, segment=segment,
                        options=_parse_overrides(option or [], [name]).get(_preset_key(name)), adapter=adapter,
                        allow_untrained=allow_untrained, chat=chat, instruction=instruction,
                        max_new_tokens=max_new_tokens,
                        sampling=_sampling(temperature, top_k, top_p, seed), cite=cite, reuse=reuse,
                        on_text=on_text, on_segment=on_segment, on_memory=on_memory)
    finally:
        view.close()
    if json_out:
        print_json(_with_pages(report.to_dict()))
        return
    out.write("\n")
    if cite:
        _print_citations(report.answers, report.document.get("path"))
    if progress:
        err.print(f"{report.protocol}; first answer token {report.first_token_s:.2f} s after start", highlight=False)


def _print_citations(answers, path: str | None) -> None:
    from ..text.documents import location

    for i, a in enumerate(answers):
        label = f" (Q{i + 1})" if len(answers) > 1 else ""
        if a.cite_note:
            print(f"[note{label}] {a.cite_note}")
        for c in a.citations[:8]:
            page = location(path, c.byte_start, c.byte_end)  # 'p. 12' for a PDF, '' for text
            print(f"[{c.kind}{label}] {page + ', ' if page else ''}bytes {c.byte_start}-{c.byte_end}{_weight(c)}: "
                  f"{c.excerpt or ''}")


def _weight(c) -> str:
    """A memory's citation: its relevance share and share of reads; a RAG chunk: its cosine similarity."""
    if c.weight is None:
        return ""
    if c.reads is None:
        return f" similarity {c.weight:.2f}"
    return f" relevance {100 * c.weight:.0f}% ({100 * c.reads:.0f}% of reads)"


def _with_pages(report: dict[str, Any]) -> dict[str, Any]:
    """`ask --json`: each citation of a PDF also carries its page label ('p. 12')."""
    from ..text.documents import location

    path = report.get("document", {}).get("path")
    for answer in report.get("answers", []):
        for c in answer.get("citations", []):
            page = location(path, c["byte_start"], c["byte_end"])
            if page:
                c["page"] = page
    return report


@app.command()
@_errors_to_exit
def generate(
    file: Annotated[str, typer.Argument(help="The text to continue (a text file, PDF, HTML page or gzip/bz2/xz text; '-' reads standard input, which is not reused).")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 200,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Memory method or preset. Default: xl.")] = None,
    option: OptionOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    stop: Annotated[bool, typer.Option("--stop/--no-stop", help="Stop at the model's end-of-text token.")] = True,
    reuse: ReuseOpt = True,
    segment: SegmentOpt = None,
    adapter: AdapterOpt = None,
    allow_untrained: UntrainedOpt = False,
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (text, timings, protocol) at the end.")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Continue a long text after its end with the whole document in memory, streaming the tokens.

    The generated text is read into memory as it grows, so memory-token methods write it to memory at
    every segment boundary, exactly as if it had been part of the document.
    """
    from ..tasks.generation import generate as generate_fn
    from .render import print_json, stderr_console

    check_input(file)
    name = method or "xl"
    err = stderr_console()
    view, on_segment = _reading_view(file, progress and not json_out)

    def on_text(piece: str) -> None:
        if not json_out:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def on_memory(mem) -> None:
        view.close()
        if progress and not json_out:
            err.print(_memory_line(mem.to_dict()), highlight=False)

    try:
        report = generate_fn(file, method=name, max_new_tokens=max_new_tokens,
                             sampling=_sampling(temperature, top_k, top_p, seed), stop_at_eos=stop, model=model,
                             dtype=dtype, device=device, threads=threads, segment=segment,
                             options=_parse_overrides(option or [], [name]).get(_preset_key(name)), adapter=adapter,
                             allow_untrained=allow_untrained, reuse=reuse, on_text=on_text, on_segment=on_segment,
                             on_memory=on_memory)
    finally:
        view.close()
    if json_out:
        print_json(report.to_dict())
        return
    sys.stdout.write("\n")
    if progress:
        rate = report.tokens / report.decode_seconds if report.decode_seconds else 0.0
        err.print(f"{report.protocol}: {report.tokens} tokens ({report.stopped}) at {rate:.1f} tok/s", highlight=False)

