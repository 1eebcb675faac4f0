"""A synthetic recall task: a fact in the first segment, recalled at the end of the last one.

Sample: [fact marker; key; filler ...] ... [filler ...; question marker] -> key. Everything between the key
and the question is filler (random ids, or book text), so only memory carried across segments can answer
once the key has left the window. Training scores only the answer (`loss: answer`); accuracy is the
share of samples whose greedy next token after the question is the key. Deterministic from a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..methods.base import Method
from ..model.backbone import Backbone
from ..stream import forward_segment
from ..text.segments import Segment
from .samples import window_segments


@dataclass
class RecallTask:
    """`fact`/`question` are token-id prefixes, `keys` the candidate answers, `filler` ids to draw from
    (None: uniform random ids in [filler_lo, filler_hi))."""

    fact: Sequence[int]
    question: Sequence[int]
    keys: Sequence[int]
    filler: torch.Tensor | None = None
    filler_lo: int = 3
    filler_hi: int = 256

    def sample(self, n: int, segment: int, gen: torch.Generator) -> tuple[torch.Tensor, int, int]:
        """Ids of `n * segment + 1` tokens, the key, and the index of the question's last token."""
        total = n * segment + 1
        key = self.keys[int(torch.randint(len(self.keys), (1,), generator=gen))]
        ids = self._filler(total, gen)
        head = torch.tensor([*self.fact, key])
        tail = torch.tensor([*self.question, key])
        ids[: len(head)] = head
        ids[total - len(tail) :] = tail
        return ids, int(key), total - 2

    def _filler(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self.filler is None:
            return torch.randint(self.filler_lo, self.filler_hi, (n,), generator=gen)
        start = int(torch.randint(0, len(self.filler) - n, (1,), generator=gen))
        return self.filler[start : start + n].clone()

    def draw(self, n: int, segment: int, gen: torch.Generator) -> list[Segment]:
        """A training sample (the trainer's SampleSource): only the answer is scored."""
        ids, _, q = self.sample(n, segment, gen)
        scored = torch.zeros(len(ids) - 1, dtype=torch.bool)
        scored[q] = True
        return window_segments(ids, segment, scored)


RECALL_KEYS = (" apple", " river", " candle", " silver", " garden", " window", " horse", " letter", " winter",
               " orange", " castle", " doctor", " forest", " mirror", " pencil", " violin")


def recall_task_for(tokenizer: Any, filler: torch.Tensor) -> RecallTask:
    """The synthetic recall task in words, with book filler: "The secret word is X." ... question -> X."""

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    keys = [enc(k)[0] for k in RECALL_KEYS if len(enc(k)) == 1]
    return RecallTask(fact=enc("The secret word is"), question=enc(". What was the secret word? The secret word is"),
                      keys=keys, filler=filler)


def recall_accuracy(backbone: Backbone, method: Method, task: RecallTask, *, segments: int, segment: int,
                    samples: int, seed: int = 1234) -> dict[str, Any]:
    """Share of `samples` fresh samples whose greedy token after the question is the key (`accuracy`), and
    whose logit is the highest among the candidate keys (`choice_accuracy`: a multiple choice, chance 1/keys)."""
    gen = torch.Generator().manual_seed(seed)
    correct = chosen = 0
    keys = torch.tensor(list(task.keys))
    with torch.inference_mode():
        for _ in range(samples):
            ids, key, q = task.sample(segments, segment, gen)
            state = method.init_state()
            for seg in window_segments(ids, segment):
                state, hidden, _ = forward_segment(backbone, method, state, seg)
            logits = backbone.model.lm_head(hidden[q - seg.start])
            correct += int(logits.argmax()) == key
            chosen += int(keys[logits[keys.to(logits.device)].argmax()]) == key
    return {"method": method.name, "segments": segments, "segment": segment, "samples": samples,
            "correct": correct, "accuracy": correct / samples, "chosen": chosen, "choice_accuracy": chosen / samples}
