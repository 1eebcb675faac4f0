"""M+'s long-term store: slots dropped from the pool, kept on the CPU, pruned by recall frequency.

The large parts of a slot (its hidden states at every layer and its retrieval keys) live in a preallocated
`Room` whose rows are written in place: an update writes only its new slots, into the rows of the slots it
pruned or past the last row, instead of concatenating and selecting the whole store (~283 MB of bf16 for
8,192 slots of the default model, twice per update). Rows are therefore in no particular order; `seq`
numbers slots in insertion order, and every choice that depended on the old row order (ties when pruning,
the order retrieved slots are laid out in, the snapshot's rows) uses it instead, so results are unchanged.
Only the newest store of a room writes into it; an older one (or a fork) copies first.

With `store: disk` the hidden states live in page files instead (pagefile.py; one slot a page, so a layer's
retrieved rows are read one by one, 2 bytes × d each in bf16), and RAM keeps the retrieval keys and the
per-slot counters: 7.7 KB a slot on the default model instead of 42 KB. A disk store never compacts: a
pruned slot's row is simply reused, and a copy (a fork, a reloaded snapshot continuing) shares the files
until it writes (copy on write, one segment file at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .memoryllm import UPDATE
from .pagefile import PageFile, PageLayout
from .storecodec import QUANTISED, SCALE_DTYPE, dequantise, quantise

FILE_PAGES = 2048  # slots a segment file of a disk store (~70 MB in bf16 on the default model)
COPY_ROWS = 1024  # rows read at once when a disk store is compacted


@dataclass
class Room:
    """Preallocated rows behind `LongTerm` views; `epoch` is bumped whenever rows some view holds are
    overwritten (those views are stale from then on)."""

    hidden: torch.Tensor  # [size, layers, d] (a disk store: [0, layers, d], the dtype and shape only)
    keys: torch.Tensor  # [size, layers, r]
    end: int = 0  # rows the newest store of this room holds (only that store writes here)
    epoch: int = 0
    pages: PageFile | None = None  # a disk store's hidden states
    scale: torch.Tensor | None = None  # [size, layers]: an int8 RAM store's scales

    def put(self, rows: torch.Tensor, hidden: torch.Tensor) -> None:
        """Write `hidden [j, layers, d]` at `rows` (encoded to int8 when the store is)."""
        if self.pages is not None:
            self.pages.write(rows, hidden.transpose(0, 1).unsqueeze(1))  # [layers, 1, j, d]
        elif self.scale is not None:
            self.hidden[rows], self.scale[rows] = quantise(hidden)
        else:
            self.hidden[rows] = hidden.to(self.hidden.dtype)

    def view(self, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden states (and int8 scales) of the first `size` rows (a disk store: its placeholder)."""
        if self.pages is not None:
            return self.hidden, None
        return self.hidden[:size], self.scale[:size] if self.scale is not None else None


@dataclass
class LongTerm:
    """The long-term store (CPU), one row per slot: `hidden [m, layers, d]`, `keys [m, layers, r]` (f_k at
    insertion, fp32), `origin [m, 6]` (as the pool's; column UPDATE is the age), `freq [m, layers]` recall
    frequencies and `seq [m]` insertion order (None: the rows are in insertion order); counters: LTM
    updates (merges) and slots pruned. With `pages` the hidden states are on disk (`hidden` is then
    `[0, layers, d]`, the dtype and shape only); an int8 store in RAM has `scale [m, layers]` beside its
    codes. Read them through `rows_at`, which decodes."""

    hidden: torch.Tensor
    keys: torch.Tensor
    origin: torch.Tensor
    freq: torch.Tensor
    merges: int = 0
    pruned: int = 0
    seq: torch.Tensor = field(default=None)  # type: ignore[assignment]  # filled in __post_init__
    room: Room | None = field(default=None, repr=False, compare=False)
    epoch: int = 0
    pages: PageFile | None = field(default=None, repr=False, compare=False)
    scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.seq is None:
            self.seq = torch.arange(len(self))

    def __len__(self) -> int:
        return int(self.origin.shape[0])

    @classmethod
    def empty(cls, layers: int, d: int, r: int, dtype: torch.dtype, *, disk: bool = False) -> LongTerm:
        """A store with no slots, its hidden states in `dtype` (a float dtype, or int8 codes with a scale per
        slot and layer), in RAM or (`disk`) in page files."""
        pages = PageFile(PageLayout(layers, 1, d, dtype, page=1, parts=1, file_pages=FILE_PAGES)) if disk else None
        scale = torch.zeros(0, layers, dtype=SCALE_DTYPE) if dtype == QUANTISED and not disk else None
        return cls(torch.zeros(0, layers, d, dtype=dtype), torch.zeros(0, layers, r), torch.zeros(0, 6, dtype=torch.long),
                   torch.zeros(0, layers, dtype=torch.long), pages=pages, scale=scale)

    @property
    def read_dtype(self) -> torch.dtype:
        """The dtype reads return: the stored one, or fp32 for int8 codes."""
        return torch.float32 if self.hidden.dtype == QUANTISED else self.hidden.dtype

    def rows_at(self, rows: torch.Tensor | None, layer: int) -> torch.Tensor:
        """Hidden states `[k, d]` of `rows` (None: every row) at `layer`, decoded."""
        index = (slice(None) if rows is None else rows, layer)
        if self.pages is None:
            return self._decoded(index)
        slots = slice(0, len(self)) if rows is None else rows
        return self.pages.read(0, (layer, slice(None), slots), self.read_dtype)[0]

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Hidden states `[k, layers, d]` of `rows`, every layer, decoded."""
        if self.pages is None:
            return self._decoded((rows,))
        return self.pages.read(0, (slice(None), slice(None), rows), self.read_dtype)[:, 0].transpose(0, 1)

    def _decoded(self, index: tuple) -> torch.Tensor:
        """`hidden[index]` of a RAM store, int8 codes decoded by their scales."""
        return self.hidden[index] if self.scale is None else dequantise(self.hidden[index], self.scale[index], torch.float32)

    def check_current(self) -> None:
        """Refuse to read a store a newer one overwrote (continued twice without a copy)."""
        if self.room is not None and self.room.epoch != self.epoch:
            raise RuntimeError("this long-term store was continued by a newer one, which overwrote it; "
                               "fork (copy) a memory before continuing it twice")

    def select(self, rows: torch.Tensor) -> LongTerm:
        """A copy holding `rows` (in that order); a disk store copies them into new page files."""
        self.check_current()
        pages = None
        if self.pages is not None:
            pages = PageFile(self.pages.layout)
            for at in range(0, len(rows), COPY_ROWS):
                part = rows[at : at + COPY_ROWS]
                pages.write(torch.arange(at, at + len(part)), self._rows(part).transpose(0, 1).unsqueeze(1))
        return replace(self, hidden=self.hidden if pages is not None else self.hidden[rows], keys=self.keys[rows],
                       origin=self.origin[rows], freq=self.freq[rows], seq=self.seq[rows], room=None, epoch=0,
                       pages=pages, scale=self.scale[rows] if self.scale is not None else None)

    def fork(self) -> LongTerm:
        """An independent copy: in RAM through its tensors; on disk sharing the files until either side writes."""
        if self.pages is None:
            return LongTerm.from_tensors({k: v.clone() for k, v in self.tensors().items()})
        self.check_current()
        return replace(self, keys=self.keys.clone(), origin=self.origin.clone(), freq=self.freq.clone(),
                       seq=self.seq.clone(), room=None, epoch=0, pages=self.pages.fork())

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
        """Snapshot tensors, rows in insertion order (the format of a store without a room). A disk store keeps
        its row order (its files are linked as they are: `files`) and lists `seq` and its page layout instead
        of the hidden states."""
        self.check_current()
        counters = torch.tensor([self.merges, self.pruned])
        if self.pages is not None:
            pages = {f"ltm.pages.{k}": v for k, v in self.pages.tensors().items()}
            return {"ltm.keys": self.keys, "ltm.origin": self.origin, "ltm.freq": self.freq, "ltm.seq": self.seq,
                    "ltm.counters": counters, **pages}
        order = self.in_order()
        scale = {"ltm.hidden_scale": self.scale[order]} if self.scale is not None else {}
        return {"ltm.hidden": self.hidden[order], "ltm.keys": self.keys[order], "ltm.origin": self.origin[order],
                "ltm.freq": self.freq[order], "ltm.counters": counters, **scale}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> LongTerm:
        """The store `tensors()` saved (on disk when it lists pages, whose files the snapshot being loaded links:
        `pagefile.snapshot_files`)."""
        merges, pruned = (int(x) for x in t["ltm.counters"].tolist())
        keys, origin, freq = (t[f"ltm.{k}"].cpu() for k in ("keys", "origin", "freq"))
        if "ltm.pages.layout" not in t:
            scale = t["ltm.hidden_scale"].cpu() if "ltm.hidden_scale" in t else None
            if (t["ltm.hidden"].dtype == QUANTISED) != (scale is not None):
                raise ValueError("an int8 long-term store needs ltm.hidden_scale, and only an int8 store has it")
            return cls(t["ltm.hidden"].cpu(), keys, origin, freq, merges, pruned, scale=scale)
        pages = PageFile.from_tensors({k[len("ltm.pages."):]: v for k, v in t.items() if k.startswith("ltm.pages.")})
        lay = pages.layout
        hidden = torch.zeros(0, lay.layers, lay.dim, dtype=lay.dtype)
        return cls(hidden, keys, origin, freq, merges, pruned, t["ltm.seq"].cpu(), pages=pages)

    def files(self) -> dict[str, Path]:
        """The files a snapshot links (a disk store's segments, frozen from then on); none in RAM."""
        return self.pages.link_names() if self.pages is not None else {}

    def disk_bytes(self) -> int:
        """Bytes a disk store's segment files occupy; 0 in RAM."""
        return self.pages.disk_bytes() if self.pages is not None else 0

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
            grown = self._grown(hidden, keys, origin, freq, seq)
            return replace(grown.select(torch.nonzero(keep).flatten()), merges=self.merges + 1,
                           pruned=self.pruned + n + j - int(keep.sum()))
        rows = torch.cat((holes, n + torch.arange(len(fresh) - len(holes), dtype=torch.long)))
        room, size = self._room_for(n + len(fresh) - len(holes), capacity)
        room.put(rows, hidden[fresh])
        room.keys[rows] = keys[fresh].to(room.keys.dtype)
        if len(holes):
            room.epoch += 1  # rows older stores held were overwritten
        kept_old = torch.ones(n, dtype=torch.bool)
        kept_old[holes] = False
        out_origin, out_freq, out_seq = (torch.cat((t[:n], t[:0].new_empty(size - n, *t.shape[1:])))
                                         for t in (self.origin, freq, seq))
        for t, src in ((out_origin, origin), (out_freq, freq[n:]), (out_seq, seq[n:])):
            t[rows] = src[fresh]
        hidden_view, scale_view = room.view(size)
        return LongTerm(hidden_view, room.keys[:size], out_origin, out_freq, self.merges + 1,
                        self.pruned + n + j - int(keep.sum()), out_seq, room, room.epoch, room.pages, scale_view)

    def _grown(self, hidden: torch.Tensor, keys: torch.Tensor, origin: torch.Tensor, freq: torch.Tensor,
               seq: torch.Tensor) -> LongTerm:
        """A copy with the new slots appended as rows past the last (before pruning)."""
        n, j = len(self), hidden.shape[0]
        room = self._copied_room(n + j, n + j)
        room.put(n + torch.arange(j), hidden)
        room.keys[n:] = keys.to(room.keys.dtype)
        grown_hidden, scale = room.view(n + j)
        return LongTerm(grown_hidden, room.keys, torch.cat((self.origin, origin)), freq, self.merges, self.pruned, seq,
                        pages=room.pages, scale=scale)

    def _room_for(self, size: int, capacity: int) -> tuple[Room, int]:
        """This store's room if it may write there and has `size` rows, else a new one holding a copy."""
        room = self.room
        if room is not None and room.epoch == self.epoch and room.end == len(self) and room.keys.shape[0] >= size:
            room.end = size
            return room, size
        return self._copied_room(size, min(max(2 * size, 64), max(capacity, size))), size

    def _copied_room(self, size: int, rows: int) -> Room:
        """A new room of `rows` rows holding a copy of this store, for a store of `size` rows (a disk store's
        files are shared with this one until one of them writes)."""
        n = len(self)
        keys = self.keys.new_empty(rows, *self.keys.shape[1:])
        keys[:n] = self.keys
        if self.pages is not None:
            return Room(self.hidden, keys, end=size, pages=self.pages.fork())
        hidden = self.hidden.new_empty(rows, *self.hidden.shape[1:])
        hidden[:n] = self.hidden
        scale = None
        if self.scale is not None:
            scale = self.scale.new_empty(rows, *self.scale.shape[1:])
            scale[:n] = self.scale
        return Room(hidden, keys, end=size, scale=scale)
