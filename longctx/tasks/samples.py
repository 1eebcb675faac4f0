"""Where training samples come from: a `SampleSource` draws `n` segments of `segment` tokens each.

`TokenCorpus` draws random windows of whole documents (`longctx train --task lm`); the synthetic recall
task (`tasks/recall.py`, `--task recall`) is another source. `window_segments` cuts ids into segments with
next-token targets, the shape every source and validation hands the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import UsageError
from ..storage.hashing import file_sha256
from ..text.segments import Segment
from ..text.textio import open_source
from ..text.tokens import iter_tokens


class SampleSource(Protocol):
    """Draws training samples: `n` segments of `segment` tokens each (targets -1 where not scored)."""

    def draw(self, n: int, segment: int, gen: torch.Generator) -> list[Segment]: ...


@dataclass
class TokenCorpus:
    """Whole documents as token ids; samples are random windows, files chosen in proportion to length."""

    docs: list[torch.Tensor]
    files: list[dict[str, Any]]

    @classmethod
    def from_files(cls, paths: Sequence[str], tokenizer) -> TokenCorpus:
        docs, files = [], []
        for path in paths:
            with open_source(path) as src:
                ids = torch.cat([torch.from_numpy(c.ids.astype("int64")) for c in iter_tokens(tokenizer, src.blocks())])
            docs.append(ids)
            files.append({"path": str(Path(path).resolve()), "sha256": file_sha256(path), "tokens": len(ids)})
        return cls(docs, files)

    @property
    def tokens(self) -> int:
        return sum(len(d) for d in self.docs)

    def draw(self, n: int, segment: int, gen: torch.Generator) -> list[Segment]:
        need = n * segment + 1
        weights = torch.tensor([max(len(d) - need, 0) + 1e-9 for d in self.docs], dtype=torch.float64)
        if all(len(d) < need for d in self.docs):
            raise UsageError(f"no training document has {need} tokens ({n} segments of {segment} + 1)")
        doc = self.docs[int(torch.multinomial(weights, 1, generator=gen))]
        start = int(torch.randint(0, len(doc) - need + 1, (1,), generator=gen))
        return window_segments(doc[start : start + need], segment)


def window_segments(ids: torch.Tensor, segment: int, scored: torch.Tensor | None = None) -> list[Segment]:
    """`ids` (one more than the tokens read) cut into segments with next-token targets; `scored` (bool per
    target) masks the loss, as tasks with answer spans need."""
    out = []
    for s in range(0, len(ids) - 1, segment):
        part = ids[s : min(s + segment, len(ids) - 1)]
        q = len(part)
        targets = ids[s + 1 : s + 1 + q].clone()
        if scored is not None:
            targets[~scored[s : s + q]] = -1
        out.append(Segment(s, part, torch.full((q,), -1), targets, torch.ones(q, dtype=torch.long), next_byte=-1))
    return out
