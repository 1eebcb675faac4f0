"""Reading token ids into a method's memory without scoring them, and greedy continuation from that memory.

Used where only what comes after the text matters (passkey and needle benchmarks, `ask`, `generate`):
no logits are computed for the ingested tokens, which saves the lm_head's share of every forward.

Generated tokens are written to memory as the method writes any text, so a continuation longer than a
segment is read back by the method as it grows:
- key/value methods (`xl`, `sinks`, `memorizing`, ...) write each new token at once (a one-token segment
  appends one entry);
- memory-token methods (`rmt`, `hmt`, `unimix` with RMT tokens) write memory once per *segment*: the
  text since the last write (the prompt's final partial segment, then the generated tokens) is held as a
  pending segment, and is written when it reaches the segment length, exactly as if it had been part of
  the document (tested against ingesting it). Until then each new token attends to the pending segment:
  where the rows before its tokens depend only on the memory (`Method.pending_cacheable`: `rmt`, `hmt`
  with the causal summary), their keys/values and the tokens' are kept (`PendingKV`) and a step runs the
  new token alone, as a key/value method's does; otherwise each step re-reads the whole pending segment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..methods.base import Method
from ..model import lora
from ..model.attention import ForwardPlan
from ..model.backbone import Backbone
from ..stream import forward_segment as step
from ..stream import read_forward
from ..text.segments import Segment
from .sampling import Sampling, TextStream


@dataclass(frozen=True)
class PendingKV:
    """Pre-rotation keys and values `[kv_heads, rows, head_dim]` per layer of a pending segment's forward up to
    its last token read (the memory rows before its tokens, then the tokens): what the next token attends to.
    Never written in place: a step makes a new one, so a fork may share it."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def rows(self) -> int:
        return int(self.keys[0].shape[1])

    @classmethod
    def of(cls, plan: ForwardPlan) -> PendingKV:
        """From a pending segment's full forward (captured): the rows up to its last token."""
        end = plan.token_rows.stop if plan.token_rows is not None else None
        layers = range(len(plan.out.captured))
        return cls([plan.out.captured[i][0][:, :end] for i in layers], [plan.out.captured[i][1][:, :end] for i in layers])

    def extended(self, plan: ForwardPlan) -> PendingKV:
        """These rows and the one the single-token forward `plan` captured."""
        layers = range(len(self.keys))
        return PendingKV([torch.cat((self.keys[i], plan.out.captured[i][0]), 1) for i in layers],
                         [torch.cat((self.values[i], plan.out.captured[i][1]), 1) for i in layers])


@dataclass
class Ingested:
    """Memory after reading some tokens, and the forward of the last one (its hidden state and plan).

    `pending` holds tokens read but not yet written to a segment-recurrent memory (else empty); `segment`
    is the segment length memory is written at; `pending_kv` the keys/values of the pending segment's
    forward when the method allows generation to continue from them. `last_plan` is None for a memory
    restored from a snapshot."""

    state: Any
    tokens: int  # tokens read so far (the next token's index)
    last_hidden: torch.Tensor  # [d]
    last_plan: ForwardPlan | None
    pending: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    segment: int = 0
    prompt: bool = False  # the last segment read was a prompt: its re-reads (generation) may choose with it
    pending_kv: PendingKV | None = None


def plain_segments(ids: torch.Tensor, segment: int, start: int = 0, *, prompt: bool = False) -> Iterator[Segment]:
    """Segments of `ids` with no targets (nothing is scored) and byte offsets unknown (-1); `prompt` marks
    them as the prompt the model answers next (methods that choose what to read may use its own queries)."""
    for s in range(0, len(ids), segment):
        part = ids[s : s + segment]
        yield _segment(start + s, part, prompt)


def _segment(start: int, ids: torch.Tensor, prompt: bool = False) -> Segment:
    n = len(ids)
    return Segment(start, ids, torch.full((n,), -1), torch.full((n,), -1), torch.zeros(n, dtype=torch.long),
                   prompt=prompt)


def ingest(backbone: Backbone, method: Method, segments: Iterable[Segment], state: Any = None, *,
           segment: int | None = None, on_segment: Callable[[Segment], None] | None = None) -> Ingested:
    """Read every segment into memory; keep only what the next token needs. For a memory-token method a
    final segment shorter than `segment` (default: the first one's length) is read but left pending."""
    state = method.init_state() if state is None else state
    hidden = plan = kv = None
    tokens, size, pending, prompt = 0, segment or 0, torch.zeros(0, dtype=torch.long), False
    with torch.inference_mode():
        for seg in segments:
            size = size or len(seg)
            if method.writes_per_segment and len(seg) < size:  # read, not written: pending
                pending, (hidden, plan, kv) = seg.ids, _read_pending(backbone, method, state, seg)
            else:
                state, hidden, plan = step(backbone, method, state, seg)
            tokens, prompt = seg.start + len(seg), seg.prompt
            if on_segment is not None:
                on_segment(seg)
    if hidden is None:
        raise InputError("nothing to read: the text has no tokens")
    return Ingested(state, tokens, hidden[-1], plan, pending, size, prompt, kv)


def extend(backbone: Backbone, method: Method, done: Ingested, ids: torch.Tensor) -> Ingested:
    """Read the prompt `ids` after what `done` holds (a question after its document). A memory-token method continues
    its pending segment, so this equals reading them as part of the text; a key/value method starts a new
    segment at the end of what it read, so with a bounded memory (what a segment evicts depends on where
    segments start) it equals reading the text with a segment boundary there."""
    if len(ids) == 0:
        return done
    ids = torch.cat((done.pending, ids))
    segments = plain_segments(ids, done.segment or len(ids), start=done.tokens - len(done.pending), prompt=True)
    return ingest(backbone, method, segments, done.state, segment=done.segment or len(ids))


def fork(method: Method, done: Ingested) -> Ingested:
    """An independent copy of `done`: reading a question into it leaves the original memory untouched (some
    methods update their stores in place)."""
    return Ingested(method.fork_state(done.state), done.tokens, done.last_hidden, done.last_plan,
                    done.pending.clone(), done.segment, done.prompt, done.pending_kv)


@dataclass
class Continuation:
    """Tokens generated after the ingested text, why generation stopped, and the memory after them."""

    tokens: list[int]
    stopped: str  # "stop" (an end-of-text/turn token, not included) or "length"
    done: Ingested
    first_token_s: float  # seconds until the first token was chosen
    seconds: float


def continue_text(backbone: Backbone, method: Method, done: Ingested, max_new_tokens: int, *,
                  sampling: Sampling | None = None, stop: Collection[int] = (),
                  on_token: Callable[[int], bool | None] | None = None,
                  on_plan: Callable[[ForwardPlan], None] | None = None) -> Continuation:
    """Continue the ingested text token by token; each token is read into memory before the next is chosen.
    A token in `stop` ends generation (it is neither kept nor read). `on_token` sees each kept token; when it
    returns True (the text now holds a stop string) generation stops after that token, which is kept but not
    read. `on_plan` sees every forward's plan (the last prompt forward first), e.g. to collect what similarity
    reading retrieved."""
    sampling = sampling or Sampling()
    out: list[int] = []
    gen, t0, first = sampling.generator(), time.perf_counter(), None
    if on_plan is not None and done.last_plan is not None:
        on_plan(done.last_plan)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = sampling.pick(backbone.model.lm_head(done.last_hidden), gen)
            first = first if first is not None else time.perf_counter() - t0
            if token in stop:
                return Continuation(out, "stop", done, first, time.perf_counter() - t0)
            out.append(token)
            if on_token is not None and on_token(token):
                return Continuation(out, "stop", done, first, time.perf_counter() - t0)
            done = _advance(backbone, method, done, token)
            if on_plan is not None and done.last_plan is not None:  # always set after a token is read
                on_plan(done.last_plan)
    return Continuation(out, "length", done, first or 0.0, time.perf_counter() - t0)


def continue_streamed(backbone: Backbone, method: Method, done: Ingested, max_new_tokens: int, *,
                      sampling: Sampling | None = None, stop: Collection[int] = (),
                      stop_text: Sequence[str] = (), on_text: Callable[[str], None] | None = None,
                      on_plan: Callable[[ForwardPlan], None] | None = None) -> tuple[str, Continuation]:
    """`continue_text` with the tokens turned into text as they come: `on_text` gets each new piece (never
    half a UTF-8 character). A string of `stop_text` appearing in the text ends generation ("stop"); the text
    is cut where it begins, and `on_text` never sees any of it (a piece that may be its beginning is held
    back until the next tokens tell). Returns the text and the continuation."""
    stream = TextStream(backbone.tokenizer, stop_text)

    def on_token(token: int) -> bool:
        piece = stream.push(token)
        if piece and on_text is not None:
            on_text(piece)
        return stream.stopped

    cont = continue_text(backbone, method, done, max_new_tokens, sampling=sampling, stop=stop, on_token=on_token,
                         on_plan=on_plan)
    rest = stream.flush()
    if rest and on_text is not None:
        on_text(rest)
    return stream.text(), cont


def greedy(backbone: Backbone, method: Method, done: Ingested, max_new_tokens: int) -> tuple[list[int], Ingested]:
    """Greedy continuation of the ingested text (no stop tokens): the tokens and the memory after them."""
    result = continue_text(backbone, method, done, max_new_tokens)
    return result.tokens, result.done


def _advance(backbone: Backbone, method: Method, done: Ingested, token: int) -> Ingested:
    """Read one more token: at once into a key/value memory; into the pending segment of a memory-token one
    (re-read as a prompt after a question: only the next token is predicted from it, so choosing what to
    read with all of its tokens looks at nothing ahead)."""
    if not method.writes_per_segment:
        state, hidden, plan = step(backbone, method, done.state, _segment(done.tokens, torch.tensor([token])))
        return Ingested(state, done.tokens + 1, hidden[-1], plan, done.pending, done.segment, done.prompt)
    pending = torch.cat((done.pending, torch.tensor([token])))
    seg = _segment(done.tokens + 1 - len(pending), pending, done.prompt)
    if len(pending) >= (done.segment or len(pending)):
        state, hidden, plan = step(backbone, method, done.state, seg)
        return Ingested(state, done.tokens + 1, hidden[-1], plan, torch.zeros(0, dtype=torch.long), done.segment,
                        done.prompt)
    kv: PendingKV | None
    if done.pending_kv is not None:
        hidden, plan, kv = _next_pending(backbone, method, done.pending_kv, token)
    else:
        hidden, plan, kv = _read_pending(backbone, method, done.state, seg)
    return Ingested(done.state, done.tokens + 1, hidden[-1], plan, pending, done.segment, done.prompt, kv)


def _read_pending(backbone: Backbone, method: Method, state: Any,
                  seg: Segment) -> tuple[torch.Tensor, ForwardPlan, PendingKV | None]:
    """A pending segment read in full (not written); its keys/values kept where the method allows."""
    cacheable = method.pending_cacheable()
    _, hidden, plan = read_forward(backbone, method, state, seg, capture=cacheable)
    return hidden, plan, PendingKV.of(plan) if cacheable else None


def _next_pending(backbone: Backbone, method: Method, kv: PendingKV,
                  token: int) -> tuple[torch.Tensor, ForwardPlan, PendingKV]:
    """The pending segment's next token, run alone after the rows of `kv` (the same attention as a full read
    of the segment gives its last token: the rows before it never see it)."""
    lora.activate(backbone, method.lora)
    dev, rows = backbone.device, kv.rows
    ids = torch.tensor([token], device=dev)
    embeds = backbone.model.get_input_embeddings()(ids)
    plan = ForwardPlan(query_pos=torch.tensor([rows], device=dev), key_pos=torch.arange(rows + 1, device=dev),
                       memory_keys=list(kv.keys), memory_values=list(kv.values), capture=True, embeds=embeds)
    hidden = backbone.forward(ids, plan, embeds=embeds)
    plan.out.hidden = hidden
    return hidden, plan, kv.extended(plan)
