"""`longctx ask`: answer questions about a long document from a memory method's memory, or by RAG.

Memory methods: the prompt head (chat template opening) and the document are read into memory once (and
reused from the store afterwards, `ingestion`); each question then continues an independent copy of that
memory with the question and the template's hand-over to the assistant, and the answer is generated from
there. Nothing of one question leaks into the next.

`rag` is the baseline users would otherwise pick: the document is cut into chunks embedded with MiniLM
(`rag`), the chunks most similar to the question are put into an ordinary prompt in document order, and
the model answers with full attention over that short prompt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..methods.base import Method, MethodOptions, option
from ..model.backbone import Backbone
from ..run import environment, prepare_run
from ..storage.paths import longctx_home
from ..storage.snapshot import SnapshotError, SnapshotStore
from ..text.documents import text_path
from ..text.prompts import QAFrame, check_question, qa_frame
from ..text.segments import Segment
from .citations import (
    BASELINE_QUESTION,
    Citation,
    Evidence,
    RetrievalTally,
    heading_bytes,
    held_citations,
    retrieved_citations,
    structural_mask,
)
from .decode import Ingested, continue_streamed, extend, fork, ingest, plain_segments
from .ingestion import DocumentMemory, read_document
from .sampling import Sampling, stop_ids

# The memory method that reaches past its window best (passkey 90-95 % at 16k-32k, docs/benchmarks.md), reads
# 2-3x faster than memorizing-fast, and cites the blocks it read; on needle QA with the 135M default model it
# ties `rag` (one flag away) and neither reaches 80 %.
DEFAULT_METHOD = "infllm-qa"


@dataclass
class Answer:
    """One question's answer, its timing and what it cited."""

    question: str
    text: str
    tokens: int
    stopped: str  # "stop" (end of turn; in a plain frame also the next turn's marker line) or "length"
    first_token_s: float  # from the question to its first answer token
    seconds: float
    citations: list[Citation] = field(default_factory=list)
    cite_note: str | None = None
    # what the citations were ranked from (benchmarks re-rank it); None without --cite or for RAG
    evidence: Evidence | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        plain = {k: getattr(self, k) for k in ("question", "text", "tokens", "stopped", "first_token_s", "seconds")}
        return {**plain, "citations": [c.to_dict() for c in self.citations], "cite_note": self.cite_note}


@dataclass
class AskReport:
    """Every answer over one reading of the document, with the protocol."""

    document: dict[str, Any]
    method: str
    protocol: str
    segment: int | None
    chat: bool
    instruction: str
    memory: dict[str, Any]
    answers: list[Answer]
    sampling: Sampling
    max_new_tokens: int
    model: dict[str, Any]
    backbone_load_s: float
    first_token_s: float  # from the call to the first answer's first token (model and memory loading included)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "task": "ask", "document": self.document, "method": self.method,
                "protocol": self.protocol, "segment": self.segment, "chat": self.chat,
                "instruction": self.instruction, "memory": self.memory,
                "sampling": asdict(self.sampling), "max_new_tokens": self.max_new_tokens,
                "backbone_load_s": self.backbone_load_s, "first_token_s": self.first_token_s,
                "answers": [a.to_dict() for a in self.answers], "model": self.model, "environment": environment()}


@dataclass(frozen=True)
class RagOptions(MethodOptions):
    """`-o key=value` for `--method rag`."""

    topk: int = option(6, "chunks put into the prompt (most similar to the question, shown in document order)")
    chunk_tokens: int = option(128, "model tokens per chunk")
    embedder: str | None = option(None, "sentence-embedding model directory; null = the packaged all-MiniLM-L6-v2")

    def __post_init__(self):
        self.check(self.topk >= 1, "topk", "must be >= 1")
        self.check(self.chunk_tokens >= 8, "chunk_tokens", "must be >= 8")


@dataclass
class _Session:
    """What every question of one call shares."""

    backbone: Backbone
    frame: QAFrame
    sampling: Sampling
    max_new_tokens: int
    cite: bool
    stops: set[int]
    on_text: Callable[[int, str], None] | None

    def encode(self, text: str, *, head: bool = False) -> list[int]:
        """Token ids of prompt text; special-token markup (chat template) is parsed, and a plain prompt's
        head gets the tokenizer's own BOS."""
        return self.backbone.tokenizer(text, add_special_tokens=head and not self.frame.chat)["input_ids"]


def ask(path: str, questions: Sequence[str], *, method: str | None = None, model: str | None = None,
        dtype: str | None = None, device: str | None = None, threads: int | None = None,
        segment: int | None = None, options: dict[str, Any] | None = None, adapter: str | None = None,
        allow_untrained: bool = False, chat: bool | None = None, instruction: str | None = None,
        max_new_tokens: int = 128, sampling: Sampling | None = None, cite: bool = False, reuse: bool = True,
        save: bool = True, backbone: Backbone | None = None, on_text: Callable[[int, str], None] | None = None,
        on_segment: Callable[[Segment], None] | None = None,
        on_memory: Callable[[dict[str, Any]], None] | None = None) -> AskReport:
    """Answer `questions` about the document at `path` ("-" = stdin).

    `method`: a memory method or preset (default: `DEFAULT_METHOD`), or "rag". `chat` None = the chat template
    when the model has one; `instruction` replaces the default line read before each question. `on_text(i,
    piece)` streams answer i as it is generated. With `cite`, each answer lists the source spans its memory
    retrieved, most relevant to it first (`citations.rank_weights`), or, for position-reading methods, held. `reuse`/`save`: load the document's stored memory when
    there is one / store it after reading (benchmarks turn saving off)."""
    qs = [check_question(q) for q in questions]
    if not qs:
        raise UsageError("give a question (an argument, or --questions FILE)")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    t0 = time.perf_counter()
    name = method or DEFAULT_METHOD
    run_name = "full" if name == "rag" else name
    rag_opts = RagOptions.from_mapping(options or {}, where="rag option") if name == "rag" else None
    if rag_opts is not None and adapter:
        raise UsageError("--adapter belongs to a memory method; rag reads with the plain model")
    backbone, spec, load_s = prepare_run(run_name, model=model, dtype=dtype, device=device, threads=threads,
                                         segment=segment, options=None if rag_opts else options, adapter=adapter,
                                         allow_untrained=allow_untrained, backbone=backbone)
    session = _Session(backbone, qa_frame(backbone.tokenizer, chat, instruction), sampling or Sampling(),
                       max_new_tokens, cite, stop_ids(backbone.tokenizer, backbone.model), on_text)
    if rag_opts is not None:
        return _ask_rag(path, qs, session, spec.method, rag_opts, reuse, save, load_s, t0, on_memory)
    mem = read_document(backbone, spec, path, session.encode(session.frame.head, head=True), kind="ask",
                        reuse=reuse, save=save, on_segment=on_segment)
    memory = {**mem.to_dict(), "entries": spec.method.memory_size(mem.done.state)}
    if on_memory is not None:
        on_memory(memory)
    start = time.perf_counter() - t0
    answered = [_answer(session, spec.method, mem, q, i) for i, q in enumerate(qs)]
    answers = [a for a, _ in answered]
    if cite:  # after every answer: a span that every question of the call reads is no answer's own
        _Citing(session, spec.method, mem).cite(answered)
    return AskReport(mem.document, spec.preset, spec.method.describe(), spec.segment, session.frame.chat,
                     session.frame.instruction, memory, answers, session.sampling, max_new_tokens,
                     dict(backbone.fingerprint), load_s, start + answers[0].first_token_s)


def _generate(session: _Session, method: Method, done: Ingested, index: int,
              tally: RetrievalTally | None) -> tuple[str, Any]:
    """The answer's text (streamed through `on_text`) and the continuation."""
    on_text = None
    if session.on_text is not None:
        session.on_text(index, "")  # the answer starts (even one that turns out empty)
        on_text = functools.partial(session.on_text, index)
    text, cont = continue_streamed(session.backbone, method, done, session.max_new_tokens, sampling=session.sampling,
                                   stop=session.stops, stop_text=session.frame.stops, on_text=on_text,
                                   on_plan=tally.add if tally is not None else None)
    return text.strip(), cont


class _Citing:
    """Ranks every answer's picks against what the others read: the picks of a question-independent probe
    (read only when some answer retrieved anything, so position-reading methods never pay for it), the
    document's structural tokens (heading lines, attention sinks) and the picks of the other questions."""

    def __init__(self, session: _Session, method: Method, mem: DocumentMemory):
        self.session, self.method, self.mem = session, method, mem

    def cite(self, answered: list[tuple[Answer, list[dict[str, Any]]]]) -> None:
        """Fill each answer's citations (retrieved spans by relevance, else what its memory held)."""
        retrieved = [a.evidence for a, _ in answered if a.evidence is not None and a.evidence.tally.counts.sum() > 0]
        if retrieved:
            baseline, structural = _baseline(self.session, self.method, self.mem)
            for e in retrieved:
                e.baseline, e.structural = baseline, structural
        for answer, held in answered:
            _cite(answer, self.method, self.mem, held, retrieved)


def _read_question(session: _Session, method: Method, mem: DocumentMemory, question: str) -> Ingested:
    """A copy of the document's memory with the question (and the hand-over to the answer) read."""
    return extend(session.backbone, method, fork(method, mem.done), torch.tensor(session.encode(
        session.frame.tail(question)), dtype=torch.long))


def _baseline(session: _Session, method: Method, mem: DocumentMemory) -> tuple[RetrievalTally, torch.Tensor]:
    """Read the baseline probe (what its first answer token retrieves is what any question would) and find
    the structural tokens in the source."""
    baseline = RetrievalTally(mem.head_tokens, mem.done.tokens)
    baseline.add(_read_question(session, method, mem, BASELINE_QUESTION).last_plan)
    path = mem.document.get("path")
    headings = heading_bytes(Path(text_path(path)).read_bytes()) if path and Path(path).is_file() else []  # the text read
    sinks = int(getattr(method.options, "sinks", 0) or 0)
    return baseline, structural_mask(mem.byte_start, mem.head_tokens, mem.done.tokens, headings, sinks)


def _answer(session: _Session, method: Method, mem: DocumentMemory, question: str,
            index: int) -> tuple[Answer, list[dict[str, Any]]]:
    """Continue a copy of the document's memory with the question, then answer it; with --cite, the answer
    carries its picks (`evidence`) and the spans its memory held when the question had been read."""
    t0 = time.perf_counter()
    done = _read_question(session, method, mem, question)
    doc_end = mem.done.tokens  # document tokens are [head_tokens, doc_end)
    tally = RetrievalTally(mem.head_tokens, doc_end) if session.cite else None
    held = method.dump(done.state) if session.cite else []  # what the answer's first token can see
    prompt_s = time.perf_counter() - t0
    text, cont = _generate(session, method, done, index, tally)
    answer = Answer(question, text, len(cont.tokens), cont.stopped, prompt_s + cont.first_token_s,
                    time.perf_counter() - t0)
    if tally is not None:
        answer.evidence = Evidence(tally, mem.byte_start, int(mem.document.get("size") or 0))
    return answer, held


def _cite(answer: Answer, method: Method, mem: DocumentMemory, held: list[dict[str, Any]],
          retrieved: list[Evidence]) -> None:
    """Retrieved spans ranked by relevance (`citations.DEFAULT_RANKING`, against every question's picks in
    `retrieved`) if similarity reading picked document tokens, else what the memory held when the question
    had been read."""
    path, size = mem.document.get("path"), int(mem.document.get("size") or 0)
    if answer.evidence is not None and answer.evidence.tally.counts.sum() > 0:
        answer.citations = retrieved_citations(answer.evidence, path, others=retrieved)
        if not answer.citations:
            answer.cite_note = ("this answer read only what the other questions or a question-independent probe "
                                "read, and headings: no span stands out for it")
        return
    answer.citations = held_citations(held, mem.head_tokens, mem.done.tokens, mem.byte_start, size, path)
    why = f"{method.name} retrieved nothing for this answer (it reads memory by position, or its store was empty)"
    answer.cite_note = why + ("; the citations are the document spans its memory held when the question had been "
                              "read" if answer.citations else "; its memory held no document tokens by then")


# ---- the RAG baseline ---------------------------------------------------------------------------------------

def _ask_rag(path: str, questions: list[str], session: _Session, full: Method, opts: RagOptions, reuse: bool,
             save: bool, load_s: float, t0: float, on_memory: Callable[[dict[str, Any]], None] | None) -> AskReport:
    from . import rag

    if path == "-" or not Path(path).is_file():
        raise UsageError("--method rag needs a file (its chunk index is stored under the file's sha256); "
                         "save standard input to a file first")
    embedder = rag.Embedder.load(opts.embedder)
    index, memory = _rag_index(path, session.backbone, embedder, opts.chunk_tokens, reuse, save)
    if on_memory is not None:
        on_memory(memory)
    start = time.perf_counter() - t0
    answers = [_rag_answer(session, full, embedder, index, opts, q, i) for i, q in enumerate(questions)]
    size = Path(text_path(path)).stat().st_size  # offsets are into the text read (a document's extracted text)
    doc = {"path": str(Path(path).resolve()), "size": size, "sha256": memory["document_sha256"]}
    protocol = (f"rag(topk={opts.topk}, chunk_tokens={opts.chunk_tokens}, embedder={embedder.fingerprint['model']}, "
                f"reader={full.describe()})")
    return AskReport(doc, "rag", protocol, None, session.frame.chat, session.frame.instruction, memory, answers,
                     session.sampling, session.max_new_tokens, dict(session.backbone.fingerprint), load_s,
                     start + answers[0].first_token_s)


def _rag_answer(session: _Session, full: Method, embedder, index, opts: RagOptions, question: str,
                i: int) -> Answer:
    """Retrieve the chunks, put them in a prompt in document order, answer with full attention over it."""
    from . import rag

    t0 = time.perf_counter()
    hits = rag.in_document_order(rag.search(index, embedder, question, opts.topk))
    context = rag.prompt_text(hits)
    ids = (session.encode(session.frame.head, head=True) + session.encode(context)
           + session.encode(session.frame.tail(question)))
    limit = session.backbone.max_positions - session.max_new_tokens
    if len(ids) > limit:
        raise UsageError(f"the RAG prompt has {len(ids)} tokens, more than the model's window allows with "
                         f"{session.max_new_tokens} new ones ({limit}); lower -o topk or -o chunk_tokens")
    done = ingest(session.backbone, full, plain_segments(torch.tensor(ids, dtype=torch.long), 512))
    prompt_s = time.perf_counter() - t0
    text, cont = _generate(session, full, done, i, None)
    best_first = sorted(hits, key=lambda hit: -hit[1])  # the prompt keeps document order; citations rank
    citations = [Citation("retrieved", (c.token_start, c.token_end), c.byte_start, c.byte_end, round(score, 4),
                          " ".join(c.text.split())[:400]) for c, score in best_first]
    return Answer(question, text, len(cont.tokens), cont.stopped, prompt_s + cont.first_token_s,
                  time.perf_counter() - t0, citations if session.cite else [])


def _rag_index(path: str, backbone: Backbone, embedder, chunk_tokens: int, reuse: bool, save: bool):
    """The document's chunk index: loaded from LONGCTX_HOME/rag when built before for this exact document,
    tokenizer, chunking and embedder, else built and saved there."""
    from ..storage.hashing import file_sha256
    from . import rag

    t0 = time.perf_counter()
    sha = file_sha256(text_path(path))  # the text the chunks come from: another extractor gives another index
    key = {"document": sha, "tokenizer": backbone.fingerprint["tokenizer_sha256"], "chunk_tokens": chunk_tokens,
           "embedder": embedder.fingerprint}
    name = f"rag-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"
    store = SnapshotStore(longctx_home() / "rag", what="RAG index")
    info = {"snapshot": name, "document_sha256": sha, "embedder": embedder.fingerprint, "chunk_tokens": chunk_tokens}
    if reuse and name in store.names():
        try:
            snap = store.load(name)
            index = rag.ChunkIndex.from_tensors(snap.tensors, embedder=embedder.fingerprint, chunk_tokens=chunk_tokens)
            return index, {**info, "reused": True, "chunks": len(index.chunks), "ingest_seconds": 0.0,
                           "load_seconds": time.perf_counter() - t0}
        except SnapshotError:
            pass  # damaged: rebuild below (a new version replaces it)
    index = rag.build_index(path, backbone.tokenizer, embedder, chunk_tokens=chunk_tokens)
    seconds = time.perf_counter() - t0
    if save:
        store.save(name, index.to_tensors(), {"kind": "rag-index", "key": key, "seconds": seconds,
                                               "document": {"path": str(Path(path).resolve())}})
    return index, {**info, "reused": False, "chunks": len(index.chunks), "ingest_seconds": seconds, "load_seconds": 0.0}
