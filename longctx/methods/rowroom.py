"""Preallocated storage for a FIFO memory whose tensors share one growing axis (UIO's memory: hidden states,
keys and values): appending writes only the new rows, dropping the oldest moves only a start index.

A memory is a view of rows `start..start+n` of a `RowRoom`. Only the view ending at the room's newest row
(its tip) appends in place; any other (a fork continued second, an older state) copies its rows into a new
room first, so no view ever sees its rows change. The room is re-allocated, copying the live rows once,
only when it is full: an amortised O(1) cost per row, where concatenating copied the whole memory at every
write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_ROWS = 64  # rows of the smallest room


@dataclass
class RowRoom:
    """Buffers with their rows along `axes[i]`; `end`: the row after the newest one any view holds."""

    buffers: list[torch.Tensor]
    axes: tuple[int, ...]
    end: int = 0

    @property
    def size(self) -> int:
        return int(self.buffers[0].shape[self.axes[0]])

    def views(self, start: int, n: int) -> list[torch.Tensor]:
        """Rows `start..start+n-1` of every buffer (views)."""
        return [b.narrow(axis, start, n) for b, axis in zip(self.buffers, self.axes)]


def _new_room(held: Sequence[torch.Tensor], axes: tuple[int, ...], extra: int) -> RowRoom:
    """A room holding a copy of `held` (rows along `axes`), with space for `extra` more and as many again."""
    n = int(held[0].shape[axes[0]])
    size = max(2 * (n + extra), MIN_ROWS)
    buffers = []
    for t, axis in zip(held, axes):
        shape = list(t.shape)
        shape[axis] = size
        buf = t.new_empty(shape)
        buf.narrow(axis, 0, n).copy_(t)
        buffers.append(buf)
    return RowRoom(buffers, axes, n)


def append_rows(held: Sequence[torch.Tensor], axes: tuple[int, ...], room: RowRoom | None, start: int,
                new: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], RowRoom, int]:
    """`held` (rows `start..` of `room`, or plain tensors when `room` is None) followed by `new`: the views,
    their room and their start. In place when `held` is the room's tip and the room has space."""
    n, e = int(held[0].shape[axes[0]]), int(new[0].shape[axes[0]])
    if room is None or start + n != room.end or room.end + e > room.size:
        room, start = _new_room(held, axes, e), 0
    for buf, axis, t in zip(room.buffers, axes, new):
        buf.narrow(axis, room.end, e).copy_(t)
    room.end += e
    return room.views(start, n + e), room, start
