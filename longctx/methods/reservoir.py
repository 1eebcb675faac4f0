"""Reservoir sampling (Vitter's Algorithm R) over a stream of items, drawing from a torch.Generator.

After `n` offers the reservoir holds a uniformly random `min(n, size)`-subset of them: every item offered so
far is kept with probability `size / n`, however long ago it came. UIO-LLMs uses this to choose which
chunks' encoder graphs stay alive for back-propagation (docs/methods/uio.md): unlike a window of the last W
chunks, a distant chunk is as likely to be kept as a recent one.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class Reservoir(Generic[T]):
    """At most `size` items; `offer` returns the item that leaves (the evicted or the rejected one), if any."""

    def __init__(self, size: int, gen: torch.Generator | None = None):
        if size < 1:
            raise ValueError(f"a reservoir holds at least 1 item (got {size})")
        self.size = size
        self.gen = gen
        self.items: list[T] = []
        self.seen = 0  # items offered so far

    def offer(self, item: T) -> T | None:
        """Item number c (0-based) enters while c < size; later, j ~ U{0..c}: j < size replaces items[j]
        (returned), otherwise the new item itself is returned at once."""
        c, self.seen = self.seen, self.seen + 1
        if c < self.size:
            self.items.append(item)
            return None
        j = int(torch.randint(0, c + 1, (1,), generator=self.gen))
        if j >= self.size:
            return item
        out, self.items[j] = self.items[j], item
        return out

    def drain(self) -> list[T]:
        """Every item still held (in slot order), leaving the reservoir empty."""
        out, self.items = self.items, []
        return out
