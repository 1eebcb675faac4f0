"""`bench`: `--suite` (every part at once), `passkey`, `needle` and `retention`, every method on the same items."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..errors import UsageError
from . import bench_app
from .exits import _errors_to_exit
from .options import (
    DeviceOpt,
    DtypeOpt,
    MethodsOptionOpt,
    ModelOpt,
    ThreadsOpt,
    UntrainedOpt,
    _counts,
    _fractions,
    _parse_overrides,
)

# tune on one set, report on the other (bench/splits.py): the report set's seeds start at 1000, and for
# passkey it states the key in other words; the filler stays the positional argument
SetOpt = Annotated[str, typer.Option("--set", help="tuning (seeds < 1000, Landmark key wording; the set methods are designed on) or report (seeds >= 1000, a second wording; use another novel as filler).")]
NeedleSetOpt = Annotated[str, typer.Option("--set", help="tuning (seeds < 1000; the set methods are designed on) or report (seeds >= 1000; use another novel as filler).")]


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

    from ..bench.report import suite_markdown, suite_plots
    from ..bench.suite import run_suite
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
    method: Annotated[list[str] | None, typer.Option("--method", "-m", help="Method, preset or rag (repeatable). Default: infllm, memorizing, sinks, window.")] = None,
    lengths: Annotated[str, typer.Option(help="Prompt lengths in tokens, comma-separated (16k = 16384).")] = "16k,32k",
    depths: Annotated[str, typer.Option(help="Depths of the key in the haystack, cycled over the trials.")] = "0.1,0.3,0.5,0.7,0.9",
    trials: Annotated[int, typer.Option(help="Prompts per length (the same for every method).")] = 20,
    seed: Annotated[int | None, typer.Option(help="Seed for keys, depths order and haystack offsets (default: the set's first: 0 tuning, 1000 report).")] = None,
    eval_set: SetOpt = "tuning",
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per answer.")] = 8,
    segment: Annotated[int, typer.Option(help="Tokens per forward.")] = 512,
    option: MethodsOptionOpt = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full result (every trial) as JSON.")] = False,
    allow_untrained: UntrainedOpt = False,
) -> None:
    """Passkey retrieval past the window: accuracy per method and length, with why the misses missed.

    Every method answers the same prompts (Landmark wording, 5-digit key, book filler) by greedy decoding;
    a trial is correct when the first integer of the answer is the key. Failures are split into "not held"
    (the key left memory), "not retrieved" (stored, but no head read it, or for rag no retrieved chunk held it)
    and "copy error".
    """
    from ..bench.passkey import PasskeyConfig, passkey_bench
    from .render import print_passkey, stderr_console

    names = method or ["infllm", "memorizing", "sinks", "window"]
    config = PasskeyConfig(lengths=_counts(lengths, "--lengths"), depths=_fractions(depths, "--depths"), trials=trials,
                           seed=seed, segment=segment, max_new_tokens=max_new_tokens, chat=chat, eval_set=eval_set)
    err = stderr_console()

    def on_result(r) -> None:
        mark = "[green]ok[/]" if r.correct else f"[red]{r.failure}[/]"
        err.print(f"{r.method:>12} {r.length:>7} depth {r.depth:.2f} key {r.key} -> {r.answer[:24]!r} {mark} "
                  f"({r.seconds:.1f}s)", highlight=False)

    result = passkey_bench(filler, names, config, model=model, dtype=dtype, device=device, threads=threads,
                           options=_parse_overrides(option or [], names), allow_untrained=allow_untrained,
                           on_result=on_result)
    _emit(result, json_out, print_passkey)


JsonItemsOpt = Annotated[bool, typer.Option("--json", help="Print the full result (every item) as JSON.")]
InstructionOpt = Annotated[str | None, typer.Option(help="The line read before each question (default: ask's).")]
AnswerTokensOpt = Annotated[int, typer.Option(help="Longest answer, in tokens (greedy).")]


WIDTHS = {"method": 12, "length": 7, "distance": 7, "kind": 6}  # columns of the per-item progress lines


def _answer_printer(*fields: str):
    """The stderr line each answered item gets: its `fields`, the answer's start and ok/wrong."""
    from .render import stderr_console

    err = stderr_console()

    def on_item(r) -> None:
        mark = "[green]ok[/]" if r.correct else "[red]wrong[/]"
        head = " ".join(f"{getattr(r, f)!s:>{WIDTHS.get(f, 10)}}" for f in fields)
        err.print(f"{head} -> {r.answer[:48]!r} {mark}", highlight=False)

    return on_item


def _emit(result: dict, json_out: bool, printer) -> None:
    """A benchmark's result: JSON on request, else its table."""
    from .render import print_json, stdout_console

    print_json(result) if json_out else printer(result, stdout_console())


@bench_app.command("needle")
@_errors_to_exit
def bench_needle(
    filler: Annotated[str, typer.Argument(help="Book to cut haystacks from (public-domain text, UTF-8).")],
    method: Annotated[list[str] | None, typer.Option("--method", "-m", help="Method, preset or rag (repeatable). Default: infllm-qa, memorizing-fast, sinks, rag.")] = None,
    lengths: Annotated[str, typer.Option(help="Document lengths in tokens, comma-separated (8k = 8192).")] = "8k,32k",
    trials: Annotated[int, typer.Option(help="Documents per length (the same for every method).")] = 2,
    needles: Annotated[int, typer.Option(help="Facts per document, one question each (1 = single needle); plus one absent-fact question.")] = 4,
    seed: Annotated[int | None, typer.Option(help="Seed for facts, depths and haystack offsets (default: the set's first: 0 tuning, 1000 report).")] = None,
    eval_set: NeedleSetOpt = "tuning",
    max_new_tokens: AnswerTokensOpt = 48,
    instruction: InstructionOpt = None,
    option: MethodsOptionOpt = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonItemsOpt = False,
    allow_untrained: UntrainedOpt = False,
) -> None:
    """Needle QA past the window: invented facts in book filler, questions in natural words, via `ask`.

    Every method reads each document once and answers every question over its own copy of the memory:
    one per fact (normalized match) and one about a fact the document does not hold (correct when the
    answer says it is not there).
    """
    from ..bench.needle import NeedleConfig, needle_bench
    from .render import print_needle

    names = method or ["infllm-qa", "memorizing-fast", "sinks", "rag"]
    config = NeedleConfig(lengths=_counts(lengths, "--lengths"), trials=trials, needles=needles, seed=seed,
                          max_new_tokens=max_new_tokens, instruction=instruction, eval_set=eval_set)
    result = needle_bench(filler, names, config, model=model, dtype=dtype, device=device, threads=threads,
                          options=_parse_overrides(option or [], names), allow_untrained=allow_untrained,
                          on_item=_answer_printer("method", "length", "kind", "fact"))
    _emit(result, json_out, print_needle)


@bench_app.command("retention")
@_errors_to_exit
def bench_retention(
    filler: Annotated[str, typer.Argument(help="Book whose text follows the facts (public-domain text, UTF-8).")],
    method: Annotated[list[str] | None, typer.Option("--method", "-m", help="Method or preset (repeatable). Default: mplus, memoryllm, memorizing, sinks.")] = None,
    distances: Annotated[str, typer.Option(help="Tokens of book read between the facts and the questions, comma-separated (8k = 8192).")] = "2k,8k,32k,128k",
    trials: Annotated[int, typer.Option(help="Streams (fact sets and book offsets) per method.")] = 1,
    facts: Annotated[int, typer.Option(help="Facts read together at the start of each stream, one question each.")] = 4,
    seed: Annotated[int | None, typer.Option(help="Seed for facts and book offsets (default: the set's first: 0 tuning, 1000 report).")] = None,
    eval_set: NeedleSetOpt = "tuning",
    max_new_tokens: AnswerTokensOpt = 24,
    instruction: InstructionOpt = None,
    option: MethodsOptionOpt = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonItemsOpt = False,
    allow_untrained: UntrainedOpt = False,
) -> None:
    """Knowledge retention (MemoryLLM / M+): facts first, then book text, then a question per fact at each distance.

    Each method reads one stream per trial; at every distance each question is answered over its own copy
    of the memory and reading goes on, so all distances cost one reading of the longest.
    """
    from ..bench.retention import RetentionConfig, retention_bench
    from .render import print_retention

    names = method or ["mplus", "memoryllm", "memorizing", "sinks"]
    config = RetentionConfig(distances=_counts(distances, "--distances"), trials=trials, facts=facts, seed=seed,
                             max_new_tokens=max_new_tokens, instruction=instruction, eval_set=eval_set)
    result = retention_bench(filler, names, config, model=model, dtype=dtype, device=device, threads=threads,
                             options=_parse_overrides(option or [], names), allow_untrained=allow_untrained,
                             on_item=_answer_printer("method", "distance", "fact"))
    _emit(result, json_out, print_retention)

