"""Passkey retrieval far past the window (Mohtashami & Jaggi's wording, public-domain book filler).

The prompt is: the task line, book text, the information line with a 5-digit key at a chosen depth (moved
back to the nearest sentence end), more book text, and the question. Every named method reads the same
prompt in one process and continues it greedily; a trial is correct when the first integer generated is
the key. Each trial also records where the key was when the question came (in a method's window, in its
store, gone) and, for similarity methods, whether any retrieval layer's head read it, so failures split
into "not held", "not retrieved" and "copy errors".
"""

from __future__ import annotations

import random
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, UsageError
from ..methods.base import Method
from ..model.backbone import Backbone
from ..resources import release_memory
from ..tasks.decode import extend, greedy, ingest, plain_segments
from ..text.prompts import chat_halves
from ..text.textio import open_source
from .splits import LANDMARK, KeyWording, eval_set

if TYPE_CHECKING:  # the RAG baseline's modules load only when a run names it
    from ..tasks.qa import RagOptions
    from ..tasks.rag import Embedder

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.\n")
INFO = LANDMARK.info
QUESTION = f"\n{LANDMARK.question} {LANDMARK.prime}"


@dataclass(frozen=True)
class PasskeyTrial:
    """One prompt: its tokens, the key, and where the information line sits."""

    length: int
    depth: float
    key: int
    ids: torch.Tensor
    needle: tuple[int, int]  # token span of the information line
    question: int = 0  # tokens of the question at the end (read as the prompt, after the haystack)
    head: int = 0  # tokens of the task line before the haystack


@dataclass
class Filler:
    """Book tokens to cut haystacks from, with the positions where a sentence ends."""

    ids: torch.Tensor
    sentence_end: torch.Tensor  # bool per token

    @classmethod
    def from_file(cls, path: str, tokenizer) -> Filler:
        with open_source(path) as src:
            text = "".join(block.text for block in src.blocks())
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 1000:
            raise InputError(f"filler '{path}' has {len(ids)} tokens; passkey haystacks need a book (>= 1000 tokens)")
        pieces = tokenizer.convert_ids_to_tokens(ids)
        ends = torch.tensor([p.rstrip().endswith((".", "!", "?")) for p in pieces])
        return cls(torch.tensor(ids), ends)

    def take(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` tokens from `start`, wrapping around the book when it is shorter than the haystack."""
        idx = (start + torch.arange(n)) % len(self.ids)
        return self.ids[idx], self.sentence_end[idx]


def prompt_frame(tokenizer, chat: bool, wording: KeyWording = LANDMARK) -> tuple[str, str]:
    """Text before the haystack and after it. With `chat`, the model's chat template wraps the task as the
    user's message and the answer is primed as the assistant's (the wording's prime, "The pass key is")."""
    if not chat:
        return TASK, f"\n{wording.question} {wording.prime}"
    before, after = chat_halves(tokenizer)
    return before + TASK, f"\n{wording.question}" + after + wording.prime


def make_trial(tokenizer, filler: Filler, length: int, depth: float, rng: random.Random,
               frame: tuple[str, str] = (TASK, QUESTION), wording: KeyWording = LANDMARK) -> PasskeyTrial:
    """A prompt of `length` tokens with the key's line (in `wording`) at `depth` of the haystack
    (deterministic from rng)."""
    key = rng.randint(10000, 99999)
    enc = lambda s: torch.tensor(tokenizer(s, add_special_tokens=False)["input_ids"], dtype=torch.long)  # noqa: E731
    head, info, question = enc(frame[0]), enc(wording.info_line(key)), enc(frame[1])
    n_fill = length - len(head) - len(info) - len(question)
    if n_fill < 16:
        raise UsageError(f"passkey length {length} is too short for the prompt's own {length - n_fill} tokens")
    hay, ends = filler.take(rng.randrange(len(filler.ids)), n_fill)
    cut = int(depth * n_fill)
    before = torch.nonzero(ends[:cut]).flatten()
    cut = int(before[-1]) + 1 if len(before) else cut  # the needle starts a sentence
    ids = torch.cat((head, hay[:cut], info, hay[cut:], question))
    start = len(head) + cut
    return PasskeyTrial(length, depth, key, ids, (start, start + len(info)), len(question), len(head))


@dataclass
class TrialResult:
    """One method on one prompt."""

    method: str
    length: int
    depth: float
    key: int
    answer: str
    correct: bool
    held: str  # where the key's line was when the question came: window, store, partly, gone
    retrieved: float | None  # share of (layer, head) pairs whose top-k at the last prompt token hit the line
    seconds: float

    @property
    def failure(self) -> str | None:
        """Why a wrong answer was wrong: the key was not held, held but not read, or read but miscopied."""
        if self.correct:
            return None
        if self.held == "gone":
            return "not held"
        if self.held == "store" and not self.retrieved:
            return "not retrieved"
        return "copy error"


def where_held(method: Method, state: Any, span: tuple[int, int]) -> str:
    """Where the needle's tokens are in the method's memory, from `dump()`'s runs."""
    kinds = set()
    covered = 0
    for run in method.dump(state):
        a, b = max(run["tokens"][0], span[0]), min(run["tokens"][1], span[1])
        if b > a:
            kinds.add("store" if run["kind"] == "store" else "window")
            covered += b - a
    if not kinds:
        return "gone"
    if covered < span[1] - span[0]:
        return "partly"
    return "window" if "window" in kinds else "store"


def retrieval_hits(retrieved: dict[int, torch.Tensor], span: tuple[int, int]) -> float | None:
    """Share of (layer, head) pairs whose top-k, for the last query, includes a token of `span`."""
    if not retrieved:
        return None
    hits = [((r[:, -1] >= span[0]) & (r[:, -1] < span[1])).any(dim=-1) for r in retrieved.values()]
    return float(torch.cat(hits).float().mean())


def first_integer(text: str) -> str:
    found = re.search(r"\d+", text)
    return found.group(0) if found else ""


def run_trial(backbone: Backbone, method: Method, trial: PasskeyTrial, segment: int,
              max_new_tokens: int, label: str | None = None) -> TrialResult:
    """Read the haystack into a fresh memory, then the question as the prompt (as `ask` does), then answer
    greedily; the result is named `label` (default: the method's name)."""
    t0 = time.perf_counter()
    cut = len(trial.ids) - trial.question
    done = extend(backbone, method, ingest(backbone, method, plain_segments(trial.ids[:cut], segment)), trial.ids[cut:])
    held = where_held(method, done.state, trial.needle)
    assert done.last_plan is not None  # the question was just read
    hits = retrieval_hits(done.last_plan.out.retrieved, trial.needle)
    tokens, _ = greedy(backbone, method, done, max_new_tokens)
    answer = backbone.tokenizer.decode(tokens, skip_special_tokens=True)
    return TrialResult(label or method.name, trial.length, trial.depth, trial.key, answer.strip(),
                       first_integer(answer) == str(trial.key), held, hits, time.perf_counter() - t0)


@dataclass
class RagReader:
    """`rag` on a passkey prompt, as `ask --method rag` answers: the haystack is cut into chunks and embedded,
    the chunks most similar to the question go into the prompt in document order between the task line and
    the question, and the plain model reads that prompt with full attention."""

    full: Method
    embedder: Embedder
    options: RagOptions
    name: str = "rag"

    @classmethod
    def build(cls, backbone: Backbone, options: dict[str, Any] | None) -> RagReader:
        from ..run import build_method
        from ..tasks.qa import RagOptions
        from ..tasks.rag import Embedder

        opts = RagOptions.from_mapping(options or {}, where="rag option")
        return cls(build_method("full", backbone)[0], Embedder.load(opts.embedder), opts)

    def check_segment(self, segment: int) -> None:
        self.full.check_segment(segment)

    def describe(self) -> str:
        o = self.options
        return (f"rag(topk={o.topk}, chunk_tokens={o.chunk_tokens}, embedder={self.embedder.fingerprint['model']}, "
                f"reader={self.full.describe()})")

    def context(self, backbone: Backbone, haystack: torch.Tensor, question: str) -> str:
        """The retrieved chunks of the haystack's text, in document order."""
        from ..tasks import rag

        with tempfile.TemporaryDirectory(prefix="longctx-passkey-") as tmp:
            path = Path(tmp) / "haystack.txt"
            path.write_text(backbone.tokenizer.decode(haystack), encoding="utf-8")
            index = rag.build_index(str(path), backbone.tokenizer, self.embedder, chunk_tokens=self.options.chunk_tokens)
        return rag.prompt_text(rag.search(index, self.embedder, question, self.options.topk))


def run_rag_trial(backbone: Backbone, reader: RagReader, trial: PasskeyTrial, question: str, segment: int,
                  max_new_tokens: int, label: str | None = None) -> TrialResult:
    """`rag` on one prompt: the task line, the chunks retrieved for `question`, then the prompt's question.
    The key is "retrieved" when a retrieved chunk holds it, and held in the store (the index) always."""
    t0 = time.perf_counter()
    cut = len(trial.ids) - trial.question
    context = reader.context(backbone, trial.ids[trial.head : cut], question)
    encoded = torch.tensor(backbone.tokenizer(context, add_special_tokens=False)["input_ids"], dtype=torch.long)
    ids = torch.cat((trial.ids[: trial.head], encoded, trial.ids[cut:]))
    tokens, _ = greedy(backbone, reader.full, ingest(backbone, reader.full, plain_segments(ids, segment)), max_new_tokens)
    answer = backbone.tokenizer.decode(tokens, skip_special_tokens=True)
    return TrialResult(label or reader.name, trial.length, trial.depth, trial.key, answer.strip(),
                       first_integer(answer) == str(trial.key), "store", float(str(trial.key) in context),
                       time.perf_counter() - t0)


@dataclass
class PasskeyConfig:
    lengths: Sequence[int]
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)
    trials: int = 20
    seed: int | None = None  # None: the set's first seed (0 tuning, 1000 report)
    segment: int = 512
    max_new_tokens: int = 8
    chat: bool = False  # wrap the prompt in the model's chat template
    eval_set: str = "tuning"  # tuning or report (splits.py): seeds and key wording

    def __post_init__(self):
        if self.trials < 1 or not self.lengths or not self.depths:
            raise UsageError("passkey needs >= 1 trial, a length and a depth")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise UsageError("passkey depths are fractions within 0..1")
        self.seed = eval_set(self.eval_set).seed(self.seed)


@dataclass
class PasskeyReport:
    config: PasskeyConfig
    methods: dict[str, str]  # name -> protocol string
    results: list[TrialResult] = field(default_factory=list)

    def cells(self) -> list[dict[str, Any]]:
        """Accuracy per (method, length), with the failure breakdown and mean seconds per trial."""
        out = []
        for name in self.methods:
            for length in self.config.lengths:
                rs = [r for r in self.results if r.method == name and r.length == length]
                if not rs:
                    continue
                fails = [r.failure for r in rs if r.failure]
                out.append({"method": name, "length": length, "trials": len(rs),
                            "correct": sum(r.correct for r in rs), "accuracy": sum(r.correct for r in rs) / len(rs),
                            "failures": {k: fails.count(k) for k in sorted(set(fails))},
                            "seconds_per_trial": sum(r.seconds for r in rs) / len(rs)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": "passkey", "config": asdict(self.config), "set": eval_set(self.config.eval_set).describe(),
                "methods": self.methods,
                "cells": self.cells(), "trials": [{**asdict(r), "failure": r.failure} for r in self.results]}


def passkey(backbone: Backbone, methods: Sequence[Method | RagReader], filler_path: str, config: PasskeyConfig,
            on_result: Callable[[TrialResult], None] | None = None,
            labels: Sequence[str] | None = None) -> PasskeyReport:
    """Every method on the same prompts: for each length, `trials` prompts cycling through the depths.
    `labels` name the methods in the results (e.g. preset names, so two presets of one method stay apart)."""
    for m in methods:
        m.check_segment(config.segment)
    labels = list(labels) if labels is not None else [m.name for m in methods]
    split = eval_set(config.eval_set)
    split.check_filler(filler_path)
    filler = Filler.from_file(filler_path, backbone.tokenizer)
    report = PasskeyReport(config, {label: m.describe() for label, m in zip(labels, methods)})
    rng = random.Random(config.seed)
    frame = prompt_frame(backbone.tokenizer, config.chat, split.wording)
    for length in config.lengths:
        for t in range(config.trials):
            depth = config.depths[t % len(config.depths)]
            trial = make_trial(backbone.tokenizer, filler, length, depth, rng, frame, split.wording)
            for label, m in zip(labels, methods):
                if isinstance(m, RagReader):
                    result = run_rag_trial(backbone, m, trial, split.wording.question, config.segment,
                                           config.max_new_tokens, label)
                else:
                    result = run_trial(backbone, m, trial, config.segment, config.max_new_tokens, label)
                release_memory()
                report.results.append(result)
                if on_result is not None:
                    on_result(result)
    return report


def passkey_bench(filler_path: str, methods: Sequence[str], config: PasskeyConfig, *, model: str | None = None,
                  dtype: str | None = None, device: str | None = None, threads: int | None = None,
                  options: dict[str, dict[str, Any]] | None = None, backbone: Backbone | None = None,
                  allow_untrained: bool = False,
                  on_result: Callable[[TrialResult], None] | None = None) -> dict[str, Any]:
    """`longctx bench passkey` as a library call: load the model, build the methods, run, describe the run.
    Trainable methods load their presets' adapters (or refuse, unless `allow_untrained`); "rag" is the
    retrieval baseline (`RagReader`, its options as `ask --method rag` takes them)."""
    from ..run import build_method
    from .record import bench_backbone, described

    backbone = bench_backbone(backbone, model=model, dtype=dtype, device=device, threads=threads)
    built = [RagReader.build(backbone, (options or {}).get(name)) if name == "rag" else
             build_method(name, backbone, (options or {}).get(name), allow_untrained=allow_untrained)[0]
             for name in methods]
    if len({m.name for m in built}) < len(built):
        raise UsageError("name each method once (presets of one method are not told apart in the results)")
    report = passkey(backbone, built, filler_path, config, on_result=on_result)
    return described(report.to_dict(), filler_path, backbone)
