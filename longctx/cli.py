"""The `longctx` command line: each command parses, calls one library function, renders.

stdout carries results only (tables, --json, --jsonl); progress, warnings and errors go to stderr.
Exit codes: 0 ok, 1 runtime failure, 2 usage or bad input, 130 interrupted (docs/errors.md).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Any

import typer
import yaml

from . import __version__
from .errors import EXIT_INTERRUPTED, EXIT_RUNTIME, LongctxError, UsageError

app = typer.Typer(name="longctx", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False, rich_markup_mode="rich",
                  help="Stream text of any length through a causal LM, segment by segment, with a memory method.")
presets_app = typer.Typer(no_args_is_help=True, help="List and show the YAML presets (a method, segment and options).")
app.add_typer(presets_app, name="presets")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: every named method on the same items, in one process.")
app.add_typer(bench_app, name="bench")
memory_app = typer.Typer(no_args_is_help=True, help="Inspect and manage saved memory snapshots (LONGCTX_HOME/snapshots).")
app.add_typer(memory_app, name="memory")


def _errors_to_exit(fn):
    """Turn library errors into a message on stderr and the documented exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .render import stderr_console

        try:
            return fn(*args, **kwargs)
        except LongctxError as e:
            console = stderr_console()
            label = "[bold yellow]interrupted:[/]" if e.exit_code == EXIT_INTERRUPTED else "[bold red]error:[/]"
            console.print(f"{label} {e.message}", highlight=False)
            if e.hint:
                console.print(f"hint: {e.hint}", highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            stderr_console().print("interrupted", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (MemoryError, RuntimeError) as e:
            if not _is_out_of_memory(e):
                raise
            stderr_console().print(f"[bold red]error:[/] out of memory; {_smaller_segment_hint(kwargs.get('segment'))}",
                                   highlight=False)
            raise typer.Exit(EXIT_RUNTIME) from None

    return wrapper


def _smaller_segment_hint(segment: int | None) -> str:
    """The next thing to try: half the segment (attention memory grows with it), or a smaller memory."""
    if segment and segment > 1:
        return f"try a smaller segment (--segment {segment // 2}) or memory size"
    return "try a smaller --segment or memory size"


def _is_out_of_memory(e: BaseException) -> bool:
    """torch reports allocation failures as RuntimeError (CPU) or OutOfMemoryError (CUDA)."""
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _version(value: bool) -> None:
    if value:
        typer.echo(f"longctx {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """longctx: perplexity, memory and long-document tools over pretrained causal LMs."""


def _parse_overrides(pairs: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """`-o key=value` applies to every named method or preset; `-o method.key=value` to one."""
    if pairs and not methods:
        raise UsageError("with --resume alone, use -o method.key=value (or name --method)")
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option expects key=value or method.key=value (got {pair!r})")
        value = yaml.safe_load(raw) if raw else None
        target, _, name = key.rpartition(".")
        for m in ([target] if target else methods):
            out.setdefault(_preset_key(m), {})[name] = value
    return out


def _preset_key(method: str) -> str:
    """Overrides are looked up by preset name; a preset given as a .yaml path is named by its file stem."""
    from pathlib import Path

    return Path(method).stem if method.endswith((".yaml", ".yml")) else method


def _method_list(method: str | None, compare: str | None) -> list[str]:
    names = [m.strip() for m in compare.split(",") if m.strip()] if compare else []
    if method and method not in names:
        names.insert(0, method)
    return names or ["xl"]


@app.command()
@_errors_to_exit
def ppl(
    files: Annotated[list[str] | None, typer.Argument(help="Text file(s) to score ('-' reads standard input, alone). Several files: per-file results and micro/macro averages.", show_default=False)] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Method or preset name, or a preset .yaml path. Default: xl.")] = None,
    compare: Annotated[str | None, typer.Option(help="Comma-separated methods to run on the same tokens in this process; deltas are against the first.")] = None,
    segment: Annotated[int | None, typer.Option(help="Tokens per forward (default: the preset's). [env: LONGCTX_SEGMENT]")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Read only the first N tokens of the document (of each document).")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option override: key=value or method.key=value (repeatable).")] = None,
    model: Annotated[str | None, typer.Option(help="HF model id or local directory (default: the embedded SmolLM2-135M-Instruct). [env: LONGCTX_MODEL]")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (default: bf16 on GPUs and CPUs with AMX/AVX512-BF16, else fp32), bf16, fp32 or fp16. [env: LONGCTX_DTYPE]")] = None,
    device: Annotated[str | None, typer.Option(help="cpu (default), cuda, cuda:N or auto. [env: LONGCTX_DEVICE]")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads; on a busy 2-core machine 1 beats 2. [env: LONGCTX_THREADS]")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object with all results (schema_version 1).")] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON line per segment (and per file), then the result object.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress on stderr.")] = True,
    save_memory: Annotated[str | None, typer.Option(help="Save the memory as snapshot NAME at the end (with --compare: NAME-METHOD).")] = None,
    save_every: Annotated[int | None, typer.Option(help="Also checkpoint the snapshot every N segments (needs --save-memory).")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue the run saved in snapshot NAME (same file, model, method, options).")] = None,
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
    from .corpus import read_file_list

    docs = [*(files or []), *(read_file_list(files_from) if files_from else [])]
    if not docs:
        raise UsageError("give a document to score (a file, or '-' for standard input), several files, or --files LIST")
    common = {"model": model, "dtype": dtype, "device": device, "threads": threads, "segment": segment,
              "max_tokens": max_tokens, "adapter": adapter, "allow_untrained": allow_untrained}
    if len(docs) == 1 and not files_from and not log:
        _ppl_one(docs[0], method, compare, option or [], common, json_out, jsonl, progress, save_memory, save_every,
                 resume)
        return
    if compare or save_memory or save_every or resume:
        raise UsageError("--compare, --save-memory, --save-every and --resume work on one document; "
                         "score several documents with one --method")
    _warn_untrained_start(common)
    _ppl_many(docs, method, _parse_overrides(option or [], [method or "xl"]), common, json_out, jsonl, progress, log)


def _ppl_one(file: str, method: str | None, compare: str | None, option: list[str], common: dict[str, Any],
             json_out: bool, jsonl: bool, progress: bool, save_memory: str | None, save_every: int | None,
             resume: str | None) -> None:
    """One document: the `perplexity()` report, with snapshots, --compare and graceful Ctrl-C."""
    from .interrupts import GracefulInterrupt
    from .perplexity import perplexity
    from .render import ProgressView, event_json, print_json, print_ppl, stderr_console, stdout_console

    names = _method_list(method, compare) if (method or compare or not resume) else []
    overrides = _parse_overrides(option, names)
    size = os.path.getsize(file) if file != "-" and os.path.isfile(file) else None
    max_tokens = common["max_tokens"]
    view = ProgressView(stderr_console(), total=max_tokens or size, unit="tokens" if max_tokens else "bytes",
                        enabled=progress and not json_out)

    def on_segment(ev):
        view.update(ev)
        if jsonl:
            print_json(event_json(ev))

    try:
        _warn_untrained_start(common)
        with GracefulInterrupt() as stop:
            report = perplexity(file, names, **common, options=overrides, save_memory=save_memory,
                                save_every=save_every, resume=resume, stop=stop, on_segment=on_segment,
                                on_method=lambda name, m, info: view.start_method(name, f"{m.describe()}, segment {info['segment']}"))
    finally:
        view.close()
    if json_out or jsonl:
        print_json({"event": "result", **report.to_dict()} if jsonl else report.to_dict())
    else:
        print_ppl(report, stdout_console())
    _warn_untrained(report.runs)


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
    from .corpus import perplexity_many
    from .render import ProgressView, event_json, print_corpus, print_json, stderr_console, stdout_console
    from .sharding import is_main_process

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


DEFAULT_ASK_METHOD = "memorizing-fast"  # = longctx.qa.DEFAULT_METHOD (not imported here: the CLI starts fast)
SAMPLING_HELP = "0 = greedy (default, reproducible); > 0 samples from softmax(logits / T)."
# Options that ask and generate share, declared once.
ModelOpt = Annotated[str | None, typer.Option(help="HF model id or local directory (default: the embedded model). [env: LONGCTX_MODEL]")]
DtypeOpt = Annotated[str | None, typer.Option(help="auto, bf16, fp32 or fp16. [env: LONGCTX_DTYPE]")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto. [env: LONGCTX_DEVICE]")]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch threads. [env: LONGCTX_THREADS]")]
SegmentOpt = Annotated[int | None, typer.Option(help="Tokens per forward (default: the preset's). [env: LONGCTX_SEGMENT]")]
OptionOpt = Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option override key=value (repeatable).")]
AdapterOpt = Annotated[str | None, typer.Option(help="Trained parameters for the method (default: the preset's).")]
UntrainedOpt = Annotated[bool, typer.Option("--allow-untrained", help="Run a trainable method without an adapter (its output then says nothing about the method).")]
TemperatureOpt = Annotated[float, typer.Option(help=SAMPLING_HELP)]
TopKOpt = Annotated[int, typer.Option(help="Sample among the K most likely tokens (0 = all).")]
TopPOpt = Annotated[float, typer.Option(help="Sample from the smallest set holding this much probability.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of sampling.")]
ReuseOpt = Annotated[bool, typer.Option("--reuse/--no-reuse", help="Reuse the stored memory of this document, model and method (ingest once).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress on stderr.")]


def _sampling(temperature: float, top_k: int, top_p: float, seed: int):
    from .sampling import Sampling

    return Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def _read_questions(question: str | None, questions_file: str | None) -> list[str]:
    """The positional question, then one per line of --questions FILE ('#' lines and blank lines skipped)."""
    qs = [question] if question is not None else []
    if questions_file:
        from .textio import open_source

        with open_source(questions_file) as src:
            text = "".join(b.text for b in src.blocks())
        qs += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return qs


def _reading_view(file: str, enabled: bool):
    """A progress view for reading a document into memory, and the on_segment callback feeding it."""
    import time as _time

    from .render import ProgressView, stderr_console

    size = os.path.getsize(file) if file != "-" and os.path.isfile(file) else None
    view = ProgressView(stderr_console(), total=size, unit="bytes", enabled=enabled)
    t0 = [None]

    def on_segment(seg) -> None:
        if t0[0] is None:
            t0[0] = _time.perf_counter()
            view.start_method("reading", file)
        view.reading(seg.start + len(seg), int(seg.next_byte), _time.perf_counter() - t0[0])

    return view, on_segment


def _memory_line(memory: dict[str, Any]) -> str:
    if memory.get("note"):
        from .render import stderr_console

        stderr_console().print(f"[yellow]warning:[/] {memory['note']}", highlight=False)
    if memory.get("reused"):
        return f"memory: reused {memory['snapshot']} (loaded in {memory['load_seconds']:.2f} s)"
    rate = memory.get("ingest_tokens_per_s")
    where = f", saved as {memory['snapshot']}" if memory.get("snapshot") else ""
    what = f"{memory.get('document_tokens', memory.get('chunks', 0)):,} {'tokens' if 'document_tokens' in memory else 'chunks'}"
    return f"memory: read {what} in {memory['ingest_seconds']:.1f} s" + (f" ({rate:,.0f} tok/s)" if rate else "") + where


@app.command()
@_errors_to_exit
def ask(
    file: Annotated[str, typer.Argument(help="The document (a text file; '-' reads standard input, which is not reused).")],
    question: Annotated[str | None, typer.Argument(help="The question (or use --questions FILE).")] = None,
    questions_file: Annotated[str | None, typer.Option("--questions", metavar="FILE", help="Questions, one per line ('#' lines skipped), all answered over one reading.")] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Memory method or preset, or rag (the retrieval-augmented baseline). Default: memorizing-fast.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option override key=value (repeatable); for rag: topk, chunk_tokens, embedder.")] = None,
    cite: Annotated[bool, typer.Option("--cite", help="Print the source spans (byte offsets, excerpts) the memory retrieved for each answer.")] = False,
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
    from .qa import ask as ask_fn
    from .render import print_json, stderr_console

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
        print_json(report.to_dict())
        return
    out.write("\n")
    if cite:
        _print_citations(report.answers)
    if progress:
        err.print(f"{report.protocol}; first answer token {report.first_token_s:.2f} s after start", highlight=False)


def _print_citations(answers) -> None:
    for i, a in enumerate(answers):
        label = f" (Q{i + 1})" if len(answers) > 1 else ""
        if a.cite_note:
            print(f"[note{label}] {a.cite_note}")
        for c in a.citations[:8]:
            share = f" {100 * c.weight:.0f}% of reads" if c.weight is not None else ""
            print(f"[{c.kind}{label}] bytes {c.byte_start}-{c.byte_end}{share}: {c.excerpt or ''}")


@app.command()
@_errors_to_exit
def generate(
    file: Annotated[str, typer.Argument(help="The text to continue ('-' reads standard input, which is not reused).")],
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
    from .generation import generate as generate_fn
    from .render import print_json, stderr_console

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


@app.command()
@_errors_to_exit
def methods() -> None:
    """List the memory methods, their UniMem form and options."""
    from rich.table import Table

    from .methods import METHODS
    from .render import stdout_console

    table = Table(title="Methods")
    for col in ("method", "what it does", "options (default)"):
        table.add_column(col)
    for name, cls in sorted(METHODS.items()):
        opts = ", ".join(f"{n}={d!r}" for n, _, d, _ in cls.Options.describe_fields()) or "—"
        table.add_row(name, cls.summary, opts)
    stdout_console().print(table)


@presets_app.command("list")
@_errors_to_exit
def presets_list() -> None:
    """List the presets (packaged, and user presets under LONGCTX_HOME/presets)."""
    from rich.table import Table

    from .presets import available, load_preset
    from .render import stdout_console

    table = Table(title="Presets")
    for col in ("name", "method", "segment", "description"):
        table.add_column(col)
    for name in sorted(available()):
        p = load_preset(name)
        table.add_row(name, p.method, str(p.segment), p.description)
    stdout_console().print(table)


@presets_app.command("show")
@_errors_to_exit
def presets_show(name: Annotated[str, typer.Argument(help="Preset name or .yaml path.")]) -> None:
    """Print a preset's YAML, with its comments, after validating it."""
    from pathlib import Path

    from .presets import load_preset

    preset = load_preset(name)
    sys.stdout.write(Path(preset.path).read_text(encoding="utf-8") if preset.path else yaml.safe_dump(preset.__dict__))


@memory_app.command("ls")
@_errors_to_exit
def memory_ls(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List snapshots: name, method, model, document, tokens consumed, size, created."""
    import time

    from rich.table import Table

    from .memory import list_snapshots
    from .render import print_json, stdout_console

    rows = list_snapshots()
    if json_out:
        print_json({"schema_version": 1, "snapshots": rows})
        return
    table = Table(title="Snapshots")
    for col in ("name", "method", "model", "document", "tokens", "size", "created"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"] + (" *" if r["latest"] else ""), r["method"], r["model"], r["document"],
                      f"{r['tokens']:,}", f"{r['size_bytes'] / 2**20:,.1f} MiB",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])))
    stdout_console().print(table)


@memory_app.command("dump")
@_errors_to_exit
def memory_dump(name: Annotated[str | None, typer.Argument(help="Snapshot name (default: the latest).")] = None,
                json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """What a memory holds: tensors and shapes, entries in use, and the source span + excerpt of each group."""
    from .memory import dump_snapshot
    from .render import print_dump, print_json, stdout_console

    info = dump_snapshot(name)
    print_json({"schema_version": 1, **info}) if json_out else print_dump(info, stdout_console())


@memory_app.command("show")
@_errors_to_exit
def memory_show(name: Annotated[str | None, typer.Argument(help="Snapshot name (default: the latest).")] = None,
                json_out: Annotated[bool, typer.Option("--json", help="Print JSON (the manifest).")] = False) -> None:
    """The verified manifest of a snapshot (fingerprint, method, document, progress, files)."""
    from .memory import show_snapshot
    from .render import print_json

    info = show_snapshot(name)
    if json_out:
        print_json({"schema_version": 1, **info})
    else:
        sys.stdout.write(yaml.safe_dump(info, sort_keys=False, width=100))


@memory_app.command("rm")
@_errors_to_exit
def memory_rm(name: Annotated[str, typer.Argument(help="Snapshot name.")]) -> None:
    """Delete a snapshot (every version)."""
    from .memory import remove_snapshot

    remove_snapshot(name)
    typer.echo(f"removed {name}", err=True)


@memory_app.command("export")
@_errors_to_exit
def memory_export(name: Annotated[str, typer.Argument(help="Snapshot name.")],
                  directory: Annotated[str, typer.Argument(help="New directory to write (must not exist).")]) -> None:
    """Copy a snapshot's current version to a directory (verified)."""
    from .memory import export_snapshot

    typer.echo(str(export_snapshot(name, directory)))


@memory_app.command("import")
@_errors_to_exit
def memory_import(directory: Annotated[str, typer.Argument(help="An exported snapshot directory.")],
                  name: Annotated[str | None, typer.Option(help="Store under this name (default: its own).")] = None) -> None:
    """Verify an exported snapshot and add it to the store."""
    from .memory import import_snapshot

    typer.echo(import_snapshot(directory, name))


def _counts(text: str, what: str) -> list[int]:
    """'16k,32k,1000' -> [16384, 32768, 1000]."""
    out = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        scale = 1024 if item.endswith("k") else 1
        try:
            out.append(int(item.removesuffix("k")) * scale)
        except ValueError:
            raise UsageError(f"{what}: '{item}' is not a token count (e.g. 16k or 16384)") from None
    return out


def _fractions(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated fractions (got {text!r})") from None


@bench_app.callback(invoke_without_command=True)
@_errors_to_exit
def bench_suite(
    ctx: typer.Context,
    suite: Annotated[str | None, typer.Option(help="Run a whole suite: cpu-small (about 15 min on a 2-core CPU) or gpu.")] = None,
    book: Annotated[str | None, typer.Option(help="With --suite: the public-domain book to score and to cut haystacks from.")] = None,
    method: Annotated[list[str] | None, typer.Option("--method", "-m", help="With --suite: only these methods (repeatable; sinks, the reference, is always run).")] = None,
    part: Annotated[list[str] | None, typer.Option("--part", help="With --suite: only these parts (ppl, passkey, needle, retention, babi, throughput).")] = None,
    out: Annotated[str, typer.Option(help="With --suite: directory for suite-NAME.json, suite-NAME.md and the plots.")] = "bench-results",
    json_out: Annotated[bool, typer.Option("--json", help="With --suite: print the JSON result instead of the markdown.")] = False,
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Benchmarks: every named method on the same items, in one process. --suite runs them all."""
    if ctx.invoked_subcommand is not None:
        if suite:
            raise UsageError("--suite runs on its own; leave out the subcommand")
        return
    if not suite:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    if not book:
        raise UsageError("--suite needs --book PATH (a public-domain text, e.g. from scripts/fetch_book.py)")
    import json
    from pathlib import Path

    from .bench.report import suite_markdown, suite_plots
    from .bench.suite import run_suite
    from .render import print_json, stderr_console

    err = stderr_console()
    result = run_suite(suite, book, methods=method, parts=part, model=model, dtype=dtype, device=device,
                       threads=threads, on_part=lambda p, s: err.print(f"suite part {p}: {s:.0f} s", highlight=False))
    data = result.to_dict()
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"suite-{suite}.json").write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    markdown = suite_markdown(data, " ".join(["longctx", *sys.argv[1:]]))
    plots = suite_plots(data, outdir / f"plots-{suite}")
    if plots:
        markdown += "\n" + "\n".join(f"![{p.stem}]({p.relative_to(outdir)})" for p in plots) + "\n"
    else:
        err.print("no plots: install the plot extra (pip install -e '.[plot]') for PNGs", highlight=False)
    (outdir / f"suite-{suite}.md").write_text(markdown, encoding="utf-8")
    print_json(data) if json_out else sys.stdout.write(markdown + "\n")


@bench_app.command("passkey")
@_errors_to_exit
def bench_passkey(
    filler: Annotated[str, typer.Argument(help="Book to cut haystacks from (public-domain text, UTF-8).")],
    method: Annotated[list[str] | None, typer.Option("--method", "-m", help="Method or preset (repeatable). Default: memorizing, sinks, window.")] = None,
    lengths: Annotated[str, typer.Option(help="Prompt lengths in tokens, comma-separated (16k = 16384).")] = "16k,32k",
    depths: Annotated[str, typer.Option(help="Depths of the key in the haystack, cycled over the trials.")] = "0.1,0.3,0.5,0.7,0.9",
    trials: Annotated[int, typer.Option(help="Prompts per length (the same for every method).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed for keys, depths order and haystack offsets.")] = 0,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per answer.")] = 8,
    segment: Annotated[int, typer.Option(help="Tokens per forward.")] = 512,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option override: key=value or method.key=value (repeatable).")] = None,
    model: Annotated[str | None, typer.Option(help="HF model id or local directory (default: the embedded model).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, bf16, fp32 or fp16.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full result (every trial) as JSON.")] = False,
    allow_untrained: Annotated[bool, typer.Option("--allow-untrained", help="Run trainable methods without an adapter (answers then say nothing about the method).")] = False,
) -> None:
    """Passkey retrieval past the window: accuracy per method and length, with why the misses missed.

    Every method answers the same prompts (Landmark wording, 5-digit key, book filler) by greedy decoding;
    a trial is correct when the first integer of the answer is the key. Failures are split into "not held"
    (the key left memory), "not retrieved" (stored, but no head read it) and "copy error".
    """
    from .bench.passkey import PasskeyConfig, passkey_bench
    from .render import print_json, print_passkey, stderr_console, stdout_console

    names = method or ["memorizing", "sinks", "window"]
    config = PasskeyConfig(lengths=_counts(lengths, "--lengths"), depths=_fractions(depths, "--depths"), trials=trials,
                           seed=seed, segment=segment, max_new_tokens=max_new_tokens, chat=chat)
    err = stderr_console()

    def on_result(r) -> None:
        mark = "[green]ok[/]" if r.correct else f"[red]{r.failure}[/]"
        err.print(f"{r.method:>12} {r.length:>7} depth {r.depth:.2f} key {r.key} -> {r.answer[:24]!r} {mark} "
                  f"({r.seconds:.1f}s)", highlight=False)

    result = passkey_bench(filler, names, config, model=model, dtype=dtype, device=device, threads=threads,
                           options=_parse_overrides(option or [], names), allow_untrained=allow_untrained,
                           on_result=on_result)
    if json_out:
        print_json(result)
    else:
        print_passkey(result, stdout_console())


@bench_app.command("needle")
@_errors_to_exit
def bench_needle(
    filler: Annotated[str, typer.Argument(help="Book to cut haystacks from (public-domain text, UTF-8).")],
    method: Annotated[list[str] | None, typer.Option("--method", "-m", help="Method, preset or rag (repeatable). Default: memorizing-fast, sinks, rag.")] = None,
    lengths: Annotated[str, typer.Option(help="Document lengths in tokens, comma-separated (8k = 8192).")] = "8k,32k",
    trials: Annotated[int, typer.Option(help="Documents per length (the same for every method).")] = 2,
    needles: Annotated[int, typer.Option(help="Facts per document, one question each (1 = single needle); plus one absent-fact question.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for facts, depths and haystack offsets.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens (greedy).")] = 48,
    instruction: Annotated[str | None, typer.Option(help="The line read before each question (default: ask's).")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option override: key=value or method.key=value (repeatable).")] = None,
    model: Annotated[str | None, typer.Option(help="HF model id or local directory (default: the embedded model).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, bf16, fp32 or fp16.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full result (every item) as JSON.")] = False,
    allow_untrained: Annotated[bool, typer.Option("--allow-untrained", help="Run trainable methods without an adapter.")] = False,
) -> None:
    """Needle QA past the window: invented facts in book filler, questions in natural words, via `ask`.

    Every method reads each document once and answers every question over its own copy of the memory:
    one per fact (normalized match) and one about a fact the document does not hold (correct when the
    answer says it is not there).
    """
    from .bench.needle import NeedleConfig, needle_bench
    from .render import print_json, print_needle, stderr_console, stdout_console

    names = method or ["memorizing-fast", "sinks", "rag"]
    config = NeedleConfig(lengths=_counts(lengths, "--lengths"), trials=trials, needles=needles, seed=seed,
                          max_new_tokens=max_new_tokens, instruction=instruction)
    err = stderr_console()

    def on_item(r) -> None:
        mark = "[green]ok[/]" if r.correct else "[red]wrong[/]"
        err.print(f"{r.method:>12} {r.length:>7} {r.kind:>6} {r.fact:>10} -> {r.answer[:48]!r} {mark}", highlight=False)

    result = needle_bench(filler, names, config, model=model, dtype=dtype, device=device, threads=threads,
                          options=_parse_overrides(option or [], names), allow_untrained=allow_untrained,
                          on_item=on_item)
    if json_out:
        print_json(result)
    else:
        print_needle(result, stdout_console())


@bench_app.command("retention")
@_errors_to_exit
def bench_retention(
    filler: Annotated[str, typer.Argument(help="Book whose text follows the facts (public-domain text, UTF-8).")],
    method: Annotated[list[str] | None, typer.Option("--method", "-m", help="Method or preset (repeatable). Default: mplus, memoryllm, memorizing, sinks.")] = None,
    distances: Annotated[str, typer.Option(help="Tokens of book read between the facts and the questions, comma-separated (8k = 8192).")] = "2k,8k,32k,128k",
    trials: Annotated[int, typer.Option(help="Streams (fact sets and book offsets) per method.")] = 1,
    facts: Annotated[int, typer.Option(help="Facts read together at the start of each stream, one question each.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for facts and book offsets.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens (greedy).")] = 24,
    instruction: Annotated[str | None, typer.Option(help="The line read before each question (default: ask's).")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option override: key=value or method.key=value (repeatable).")] = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full result (every item) as JSON.")] = False,
    allow_untrained: UntrainedOpt = False,
) -> None:
    """Knowledge retention (MemoryLLM / M+): facts first, then book text, then a question per fact at each distance.

    Each method reads one stream per trial; at every distance each question is answered over its own copy
    of the memory and reading goes on, so all distances cost one reading of the longest.
    """
    from .bench.retention import RetentionConfig, retention_bench
    from .render import print_json, print_retention, stderr_console, stdout_console

    names = method or ["mplus", "memoryllm", "memorizing", "sinks"]
    config = RetentionConfig(distances=_counts(distances, "--distances"), trials=trials, facts=facts, seed=seed,
                             max_new_tokens=max_new_tokens, instruction=instruction)
    err = stderr_console()

    def on_item(r) -> None:
        mark = "[green]ok[/]" if r.correct else "[red]wrong[/]"
        err.print(f"{r.method:>12} {r.distance:>7} {r.fact:>10} -> {r.answer[:48]!r} {mark}", highlight=False)

    result = retention_bench(filler, names, config, model=model, dtype=dtype, device=device, threads=threads,
                             options=_parse_overrides(option or [], names), allow_untrained=allow_untrained,
                             on_item=on_item)
    if json_out:
        print_json(result)
    else:
        print_retention(result, stdout_console())


@app.command()
@_errors_to_exit
def train(
    files: Annotated[list[str], typer.Argument(help="Training text file(s).", show_default=False)],
    method: Annotated[str, typer.Option("--method", "-m", help="Trainable method or preset (rmt, hmt).")],
    out: Annotated[str, typer.Option(help="Adapter name (saved under LONGCTX_HOME/adapters) or a directory path with '/'.")],
    validation: Annotated[str | None, typer.Option(help="Held-out file: validation PPL before, during and after training.")] = None,
    task: Annotated[str, typer.Option(help="lm = next-token loss on the files; recall = the synthetic recall task with the files as filler.")] = "lm",
    segment: Annotated[int, typer.Option(help="Document tokens per segment.")] = 512,
    curriculum: Annotated[str, typer.Option(help="Stages SEGMENTS:STEPS, comma-separated: segments per sample grow as training goes.")] = "1:20,2:40",
    bptt: Annotated[int | None, typer.Option(help="Segments whose entering memory keeps its gradient (default: all, full BPTT).")] = None,
    loss: Annotated[str, typer.Option(help="all = every segment's tokens; last = the last segment only (HMT paper); answer = answer spans (--task recall).")] = "all",
    tune: Annotated[str, typer.Option(help="memory = the method's parameters only; lora = + LoRA on the backbone (peft); full = + every backbone weight.")] = "lora",
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the memory parameters.")] = 1e-3,
    backbone_lr: Annotated[float, typer.Option(help="Peak learning rate of LoRA / backbone weights.")] = 1e-4,
    warmup: Annotated[int, typer.Option(help="Warmup steps of the cosine schedule.")] = 10,
    clip: Annotated[float, typer.Option(help="Gradient-norm clipping (0 = off).")] = 1.0,
    accumulate: Annotated[int, typer.Option(help="Samples per optimizer step.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of sampling and initialisation.")] = 0,
    autocast: Annotated[bool, typer.Option("--autocast", help="bf16 autocast (for an fp32 backbone).")] = False,
    validate_every: Annotated[int, typer.Option(help="Validate every N steps (0 = at the start and end only).")] = 0,
    val_tokens: Annotated[int, typer.Option(help="Tokens of the validation file scored.")] = 4096,
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps (and at the end).")] = 10,
    init_adapter: Annotated[str | None, typer.Option(help="Start from this adapter (e.g. HMT stage 2 from a stage-1 adapter).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint of --out and start over.")] = False,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option override key=value (repeatable).")] = None,
    model: Annotated[str | None, typer.Option(help="HF model id or local directory (default: the embedded model).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, bf16, fp32 or fp16.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the adapter's manifest as JSON.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress on stderr.")] = True,
) -> None:
    """Train a method's memory parameters with truncated BPTT; save them as an adapter.

    The backbone stays frozen unless --tune lora/full. Checkpoints every --checkpoint-every steps: the same
    command continues where an interrupted run stopped. The adapter records the exact command, the data's
    sha256, the steps and the validation PPL.
    """
    from .lora import LoraSpec
    from .render import stderr_console
    from .sharding import is_main_process
    from .training import TrainConfig, parse_curriculum
    from .training import train as train_fn

    for key, value, allowed in (("task", task, ("lm", "recall")), ("loss", loss, ("all", "last", "answer")),
                                ("tune", tune, ("memory", "lora", "full"))):
        if value not in allowed:
            raise UsageError(f"--{key} must be one of {', '.join(allowed)} (got {value!r})")
    config = TrainConfig(segment=segment, curriculum=parse_curriculum(curriculum), bptt=bptt, loss=loss, tune=tune,
                         lora=LoraSpec(r=lora_r, alpha=lora_alpha), lr=lr, backbone_lr=backbone_lr, warmup=warmup,
                         clip=clip, accumulate=accumulate, seed=seed, autocast=autocast, validate_every=validate_every,
                         val_tokens=val_tokens, checkpoint_every=checkpoint_every)
    err = stderr_console()

    def on_step(p) -> None:
        if progress and is_main_process():
            val = f" | val ppl {p.validation['ppl']:.3f}" if p.validation else ""
            err.print(f"step {p.step}/{p.steps} segments {p.segments} loss {p.loss:.4f} lr {p.lr:.2e} "
                      f"{p.tokens / max(p.seconds, 1e-9):.0f} tok/s{val}", highlight=False)

    result = train_fn(files, method, out, config, validation=validation, task=task,
                      options=_parse_overrides(option or [], [method]).get(method), init_adapter=init_adapter,
                      model=model, dtype=dtype, device=device, threads=threads, fresh=fresh,
                      command=" ".join(["longctx", *sys.argv[1:]]), on_step=on_step)
    if not result:  # not rank 0 of a distributed run: rank 0 reports
        return
    if json_out:
        from .render import print_json

        print_json(result)
        return
    vals = result["validation_ppl"] or []
    val = f"; validation PPL {vals[0]['ppl']:.3f} -> {vals[-1]['ppl']:.3f}" if len(vals) >= 2 else ""
    print(f"adapter {out} saved at {result['path']}: {result['steps']} steps, {result['tokens']:,} tokens in "
          f"{result['seconds']:.0f} s{val}")


@app.command()
@_errors_to_exit
def adapters(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List trained adapters: yours (LONGCTX_HOME/adapters) and those shipped with longctx."""
    from .adapters import available, find_adapter
    from .render import print_json

    rows = []
    for name, where in sorted(available().items()):
        man = find_adapter(name, tensors=False).manifest  # the listing needs no weights
        tr = man.get("training", {})
        vals = tr.get("validation_ppl") or []
        rows.append({"name": name, "where": where, "method": man["method"]["name"], "tune": man.get("tune"),
                     "model": man["base"]["model"], "steps": tr.get("steps"), "tokens": tr.get("tokens"),
                     "validation_ppl": vals[-1]["ppl"] if vals else None})
    if json_out:
        print_json({"adapters": rows})
        return
    for r in rows:
        ppl = f"{r['validation_ppl']:.3f}" if r["validation_ppl"] else "-"
        print(f"{r['name']}\t{r['where']}\t{r['method']}\t{r['tune']}\t{r['model']}\tsteps {r['steps']}\t"
              f"tokens {r['tokens']}\tval ppl {ppl}")
    if not rows:
        print("no adapters yet: train one with `longctx train CORPUS --method hmt --out NAME`")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
