"""`longctx generate`: continue a long text after its end, with the whole document read into memory.

The document is read (or its stored memory reused, `ingestion`), then tokens are chosen one by one and each
is read into memory before the next: key/value methods append it at once, memory-token methods hold the
text since their last write as a pending segment and write it when it reaches the segment length, so a
continuation longer than a segment is itself remembered (the HMT reference crashes there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import UsageError
from ..run import environment, prepare_run
from ..text.segments import Segment
from .decode import continue_streamed
from .ingestion import DocumentMemory, read_document
from .sampling import Sampling, stop_ids

DEFAULT_METHOD = "xl"  # training-free, works with any model; see docs/generate.md for the others


@dataclass
class GenerateReport:
    """The continuation and how it was produced."""

    document: dict[str, Any]
    method: str
    protocol: str
    segment: int
    text: str
    tokens: int
    stopped: str  # "stop" (end-of-text token) or "length"
    first_token_s: float  # from the call to the first token (model and memory loading included)
    decode_seconds: float
    memory: DocumentMemory
    entries_after: int  # memory entries once the continuation has been read
    sampling: Sampling
    model: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        rate = self.tokens / self.decode_seconds if self.decode_seconds else None
        return {"schema_version": 1, "task": "generate", "document": self.memory.document, "method": self.method,
                "protocol": self.protocol, "segment": self.segment, "text": self.text, "tokens": self.tokens,
                "stopped": self.stopped, "first_token_s": self.first_token_s, "decode_seconds": self.decode_seconds,
                "decode_tokens_per_s": rate, "memory": {**self.memory.to_dict(), "entries_after": self.entries_after},
                "sampling": asdict(self.sampling), "model": self.model, "environment": environment()}


def generate(path: str, *, method: str | None = None, max_new_tokens: int = 200, sampling: Sampling | None = None,
             stop_at_eos: bool = True, model: str | None = None, dtype: str | None = None,
             device: str | None = None, threads: int | None = None, segment: int | None = None,
             options: dict[str, Any] | None = None, adapter: str | None = None, allow_untrained: bool = False,
             reuse: bool = True, backbone=None, on_text: Callable[[str], None] | None = None,
             on_segment: Callable[[Segment], None] | None = None,
             on_memory: Callable[[DocumentMemory], None] | None = None) -> GenerateReport:
    """Continue the text of `path` ("-" = stdin) by `max_new_tokens` tokens; `on_text` receives the text
    as it is generated. The document's memory is reused from the store when this exact reading was saved."""
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    t0 = time.perf_counter()
    sampling = sampling or Sampling()
    backbone, spec, _ = prepare_run(method or DEFAULT_METHOD, model=model, dtype=dtype, device=device,
                                    threads=threads, segment=segment, options=options, adapter=adapter,
                                    allow_untrained=allow_untrained, backbone=backbone)
    mem = read_document(backbone, spec, path, [], kind="generate", reuse=reuse, on_segment=on_segment)
    if on_memory is not None:
        on_memory(mem)
    start = time.perf_counter() - t0
    stops = stop_ids(backbone.tokenizer, backbone.model) if stop_at_eos else set()
    text, cont = continue_streamed(backbone, spec.method, mem.done, max_new_tokens, sampling=sampling, stop=stops,
                                   on_text=on_text)
    m = spec.method
    return GenerateReport(mem.document, spec.preset, m.describe(), spec.segment, text, len(cont.tokens),
                          cont.stopped, start + cont.first_token_s, cont.seconds, mem,
                          m.memory_size(cont.done.state), sampling, dict(backbone.fingerprint))
