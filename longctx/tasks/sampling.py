"""Choosing each next token (greedy or sampled, seeded), when to stop, and turning tokens into text as they come."""

from __future__ import annotations

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
    trailing partial UTF-8 character (shown as U+FFFD by the tokenizer) until its next bytes arrive."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = 0  # characters already returned

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.text()
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown :], len(text)
        return new

    def flush(self) -> str:
        text = self.text()
        new, self.shown = text[self.shown :], len(text)
        return new

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)
