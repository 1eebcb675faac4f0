"""M+'s long-term store: slots dropped from the pool, kept on the CPU, pruned by recall frequency.

The large parts of a slot (its hidden states at every layer and its retrieval keys) live in a preallocated
`Room` whose rows are written in place: an update writes only its new slots, into the rows of the slots it
pruned or past the last row, instead of concatenating and selecting the whole store (~283 MB of bf16 for
8,192 slots of the default model, twice per update). Rows are therefore in no particular order; `seq`
numbers slots in insertion order, and every choice that depended on the old row order (ties when pruning,
the order retrieved slots are laid out in, the snapshot's rows) uses it instead, so results are unchanged.
Only the newest store of a room writes into it; an older one (or a fork) copies first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .memoryllm import UPDATE


@dataclass
class Room:
    """Preallocated rows behind `LongTerm` views; `epoch` is bumped whenever rows some view holds are
    overwritten (those views are stale from then on)."""

    hidden: torch.Tensor  # [size, layers, d]
    keys: torch.Tensor  # [size, layers, r]
    end: int = 0  # rows the newest store of this room holds (only that store writes here)
    epoch: int = 0


@dataclass
class LongTerm:
    """The long-term store (CPU), one row per slot: `hidden [m, layers, d]`, `keys [m, layers, r]` (f_k at
    insertion, fp32), `origin [m, 6]` (as the pool's; column UPDATE is the age), `freq [m, layers]` recall
    frequencies and `seq [m]` insertion order (None: the rows are in insertion order); counters: LTM
    updates (merges) and slots pruned."""

    hidden: torch.Tensor
    keys: torch.Tensor
    origin: torch.Tensor
    freq: torch.Tensor
    merges: int = 0
    pruned: int = 0
    seq: torch.Tensor = field(default=None)  # type: ignore[assignment]  # filled in __post_init__
    room: Room | None = field(default=None, repr=False, compare=False)
    epoch: int = 0

    def __post_init__(self) -> None:
        if self.seq is None:
            self.seq = torch.arange(len(self))

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def check_current(self) -> None:
        """Refuse to read a store a newer one overwrote (continued twice without a copy)."""
        if self.room is not None and self.room.epoch != self.epoch:
            raise RuntimeError("this long-term store was continued by a newer one, which overwrote it; "
                               "fork (copy) a memory before continuing it twice")

    def select(self, rows: torch.Tensor) -> LongTerm:
        """A copy holding `rows` (in that order)."""
        self.check_current()
        return replace(self, hidden=self.hidden[rows], keys=self.keys[rows], origin=self.origin[rows],
                       freq=self.freq[rows], seq=self.seq[rows], room=None, epoch=0)

    def in_order(self) -> torch.Tensor:
        """Row indices in insertion order."""
        return torch.argsort(self.seq)

    def newest(self, count: int) -> torch.Tensor:
        """Rows of the `count` newest slots."""
        return torch.topk(self.seq, count).indices

    def oldest_first(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` ordered by age (the update a slot was written at), then insertion order."""
        rows = rows[torch.argsort(self.seq[rows])]
        return rows[torch.sort(self.origin[rows, UPDATE], stable=True).indices]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Snapshot tensors, rows in insertion order (the format of a store without a room)."""
        self.check_current()
        order = self.in_order()
        return {"ltm.hidden": self.hidden[order], "ltm.keys": self.keys[order], "ltm.origin": self.origin[order],
                "ltm.freq": self.freq[order], "ltm.counters": torch.tensor([self.merges, self.pruned])}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> LongTerm:
        merges, pruned = (int(x) for x in t["ltm.counters"].tolist())
        return cls(t["ltm.hidden"].cpu(), t["ltm.keys"].cpu(), t["ltm.origin"].cpu(), t["ltm.freq"].cpu(), merges, pruned)

    def merged(self, hidden: torch.Tensor, keys: torch.Tensor, origin: torch.Tensor, recall_init: int,
               capacity: int) -> LongTerm:
        """One update: every frequency -1, the new slots (`hidden [j, layers, d]`, `keys [j, layers, r]`)
        added with `recall_init`, then the lowest summed frequencies pruned down to `capacity` slots (ties:
        the newer slot stays). New slots take the rows of pruned ones, then rows past the last."""
        self.check_current()
        n, j, layers = len(self), hidden.shape[0], self.freq.shape[1]
        new_freq = torch.full((j, layers), recall_init, dtype=self.freq.dtype)
        freq = torch.cat((self.freq - 1, new_freq))  # small: a few integers per slot
        seq = torch.cat((self.seq, int(self.seq.max()) + 1 + torch.arange(j) if n else torch.arange(j)))
        keep = torch.ones(n + j, dtype=torch.bool)
        if n + j > capacity:
            span = int(seq.max()) + 1  # frequency first, then insertion order
            keep[torch.topk(freq.sum(1) * span + seq, n + j - capacity, largest=False).indices] = False
        holes, fresh = torch.nonzero(~keep[:n]).flatten(), torch.nonzero(keep[n:]).flatten()
        if len(fresh) < len(holes):  # fewer slots than before (a smaller capacity): plain copy
            grown = LongTerm(torch.cat((self.hidden, hidden.to(self.hidden.dtype))), torch.cat((self.keys, keys)),
                             torch.cat((self.origin, origin)), freq, self.merges, self.pruned, seq)
            return replace(grown.select(torch.nonzero(keep).flatten()), merges=self.merges + 1,
                           pruned=self.pruned + n + j - int(keep.sum()))
        rows = torch.cat((holes, n + torch.arange(len(fresh) - len(holes), dtype=torch.long)))
        room, size = self._room_for(n + len(fresh) - len(holes), capacity)
        room.hidden[rows] = hidden[fresh].to(room.hidden.dtype)
        room.keys[rows] = keys[fresh].to(room.keys.dtype)
        if len(holes):
            room.epoch += 1  # rows older stores held were overwritten
        kept_old = torch.ones(n, dtype=torch.bool)
        kept_old[holes] = False
        out_origin, out_freq, out_seq = (torch.cat((t[:n], t[:0].new_empty(size - n, *t.shape[1:])))
                                         for t in (self.origin, freq, seq))
        for t, src in ((out_origin, origin), (out_freq, freq[n:]), (out_seq, seq[n:])):
            t[rows] = src[fresh]
        return LongTerm(room.hidden[:size], room.keys[:size], out_origin, out_freq, self.merges + 1,
                        self.pruned + n + j - int(keep.sum()), out_seq, room, room.epoch)

    def _room_for(self, size: int, capacity: int) -> tuple[Room, int]:
        """This store's room if it may write there and has `size` rows, else a new one holding a copy."""
        room = self.room
        n = len(self)
        if room is not None and room.epoch == self.epoch and room.end == n and room.hidden.shape[0] >= size:
            room.end = size
            return room, size
        rows = min(max(2 * size, 64), max(capacity, size))
        hidden = self.hidden.new_empty(rows, *self.hidden.shape[1:])
        keys = self.keys.new_empty(rows, *self.keys.shape[1:])
        hidden[:n], keys[:n] = self.hidden, self.keys
        return Room(hidden, keys, end=size), size
