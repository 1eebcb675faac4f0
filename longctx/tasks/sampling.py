"""Choosing each next token (greedy or sampled, seeded), when to stop, and turning tokens into text as they come."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (the default: answers are reproducible); otherwise softmax(logits / T) restricted
    to the `top_k` most likely tokens (0 = all) and the smallest set holding `top_p` of the mass, drawn from a
    generator seeded with `seed`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (got {self.top_k})")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1] (got {self.top_p})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        return None if self.greedy else torch.Generator().manual_seed(self.seed)

    def pick(self, logits: torch.Tensor, gen: torch.Generator | None) -> int:
        """The next token from `[vocab]` logits."""
        if self.greedy:
            return int(logits.argmax())
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            probs = _nucleus(probs, self.top_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest most-likely set whose mass reaches top_p (the best always stays)."""
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(0) - sorted_p  # mass of the strictly more likely tokens
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(0, order, sorted_p)


def stop_ids(tokenizer, model=None) -> set[int]:
    """End-of-turn and end-of-text ids: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return ids


class TextStream:
    """Decode a growing token list into text pieces: each `push` returns only the new text, and holds back a
    trailing partial UTF-8 character (shown as U+FFFD by the tokenizer) until its next bytes arrive.

    With `stops` (text-level stop strings, e.g. the next "Question:" line a base model writes after its
    answer), the text ends where the first stop string begins: `stopped` turns true, `text()` is cut there,
    and a trailing piece that could still grow into a stop string is held back while streaming, so no part
    of a stop string is ever returned by `push`."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.tokens: list[int] = []
        self.shown = 0  # characters already returned
        self.cut: int | None = None  # where the first stop string starts, once one has been generated

    @property
    def stopped(self) -> bool:
        """A stop string has been generated: nothing after it belongs to the text."""
        return self.cut is not None

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self._decoded()
        self.cut = first_stop(text, self.stops)
        if self.cut is None and text.endswith("\ufffd"):
            return ""
        end = self.cut if self.cut is not None else len(text) - held_back(text, self.stops)
        new, self.shown = text[self.shown : end], max(self.shown, end)
        return new

    def flush(self) -> str:
        """The rest of the text (a held-back beginning of a stop string that never completed included)."""
        text = self.text()
        new, self.shown = text[self.shown :], max(self.shown, len(text))
        return new

    def text(self) -> str:
        """Everything generated so far, cut before the first stop string."""
        return self._decoded()[: self.cut]

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins (None: none occurs)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string (it may still become one)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-n:])),
               default=0)
