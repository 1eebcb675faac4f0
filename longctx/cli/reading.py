"""Answering from and continuing a document through a method's memory: `ask` and `generate`."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer

from ..text.textio import check_input
from . import app
from .exits import _errors_to_exit
from .options import (
    AdapterOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OptionOpt,
    ProgressOpt,
    SegmentOpt,
    ThreadsOpt,
    UntrainedOpt,
    _parse_overrides,
    _preset_key,
)

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

