"""Key/value memory content: per-layer pre-rotation keys and values at key/value-head granularity.

This is memory *state* (what a document put into memory), kept apart from any `nn.Module` parameters.
Every entry remembers the token it came from (index in the document, id, byte offset) so positions can be
re-assigned without drift, a window can be recomputed, and `memory dump` can show provenance.

A state is a contiguous view of a preallocated `Room` (entries in document order), so the attention reads
the memory without a copy, and a step moves only what is new: appending writes past the newest entry,
evicting the oldest entries advances the view's start (the few sink entries in front of them move forward
with it). The room is re-allocated, copying the live entries once, only when it is full: an amortised
O(1) cost per token whatever the window size, where concatenating and selecting copied all of it twice
per step. Only the newest state of a room writes into it; an older one (or a fork) copies first.

A room may also keep its keys *rotated* (`Room.rotated`, allocated on the first read that asks for it):
slot j holds its key rotated at position `rot_pos[j]` (`UNROTATED` when it holds nothing valid), so a read
whose positions are those plus one shift for the whole memory rotates only what is new (model/roomread.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.attention import ForwardPlan
from ..model.roomread import UNROTATED, RoomRead

MIN_ROOM = 64  # entries of the smallest room


@dataclass
class Room:
    """Storage behind `KVState` views: keys/values `[layers, kv_heads, size, head_dim]`, `index [3, size]`
    (token_index, token_ids, byte_start). `end`: the slot after the newest entry any view holds (only the view
    ending there may append in place). `epoch`: bumped whenever slots a view holds are overwritten, which
    makes every view of an earlier epoch stale. `rotated` (same shape as keys, or None until a read asks for
    it) holds slot j's key rotated at position `rot_pos[j]` (int64 `[size]`, `UNROTATED` where not valid)."""

    keys: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    end: int = 0
    epoch: int = 0
    rotated: torch.Tensor | None = None
    rot_pos: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.index.shape[1])

    def rotation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated keys and their positions, allocated (every slot `UNROTATED`) on first use: only reads
        that rotate from the room (inference) pay for the buffer."""
        if self.rotated is None or self.rot_pos is None:
            self.rotated = torch.empty_like(self.keys)
            self.rot_pos = torch.full((self.size,), UNROTATED, dtype=torch.long, device=self.keys.device)
        return self.rotated, self.rot_pos

    def forget_rotation(self, a: int, b: int) -> None:
        """Slots a..b-1 got new pre-rotation keys: their rotated keys are no longer valid."""
        if self.rot_pos is not None:
            self.rot_pos[a:b] = UNROTATED


def rotation_shift(offset: int, span: int) -> int:
    """The shift a room read adds to every plan position, from `offset`, the current tokens' document index
    minus their plan position (for cache-relative positions: the tokens evicted so far; 0 for absolute
    ones), and `span`, the keys the plan holds. It is `offset` modulo the power of two >= `span` (at least
    64): a window entry's rotated position (its document index minus a multiple of that power) then stays
    put until the offset crosses the next multiple, once per that many evicted tokens, and stays below
    three times the span. It depends only on what memory holds, never on where it lies in the room, so a
    fork, a resumed snapshot and an uninterrupted run compute the same numbers."""
    period = 1 << max(span - 1, MIN_ROOM - 1).bit_length()
    return offset % period


@dataclass
class KVState:
    """Entries in document order. keys/values: `[layers, kv_heads, n, head_dim]`; the rest: `[n]`."""

    keys: torch.Tensor
    values: torch.Tensor
    token_index: torch.Tensor  # int64: position of the source token in the document
    token_ids: torch.Tensor  # int64: the source token (lets `full` recompute its window)
    byte_start: torch.Tensor  # int64: byte offset of the source token in the document
    room: Room | None = field(default=None, repr=False, compare=False)  # None: the tensors own their storage
    start: int = 0  # slot of the first entry in `room`
    epoch: int = 0  # the room's epoch when this view was made

    @classmethod
    def empty(cls, layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device) -> KVState:
        """A memory holding nothing."""
        kv = torch.zeros(layers, kv_heads, 0, head_dim, dtype=dtype, device=device)
        idx = torch.zeros(0, dtype=torch.long, device=device)
        return cls(kv, kv.clone(), idx, idx.clone(), idx.clone())

    @classmethod
    def _view(cls, room: Room, start: int, n: int) -> KVState:
        end = start + n
        return cls(room.keys[:, :, start:end], room.values[:, :, start:end], room.index[0, start:end],
                   room.index[1, start:end], room.index[2, start:end], room, start, room.epoch)

    def __len__(self) -> int:
        return int(self.token_index.numel())

    @property
    def stale(self) -> bool:
        """Whether a newer state of the same room has overwritten slots this view holds."""
        return self.room is not None and self.room.epoch != self.epoch

    def check_current(self) -> None:
        """Refuse to read a stale view (a state continued from twice without `clone()`)."""
        if self.stale:
            raise RuntimeError("this key/value memory was continued by a newer state, which overwrote it; "
                               "fork (clone) a memory before continuing it twice")

    def _is_tip(self) -> bool:
        room = self.room
        return room is not None and not self.stale and self.start + len(self) == room.end

    def _new_room(self, extra: int) -> Room:
        """A room holding a copy of these entries, with space for `extra` more (and as many again)."""
        n = len(self)
        layers, heads, _, dim = self.keys.shape
        size = max(2 * (n + extra), MIN_ROOM)
        keys = self.keys.new_empty(layers, heads, size, dim)
        values = self.values.new_empty(layers, heads, size, dim)
        index = self.token_index.new_empty(3, size)
        keys[:, :, :n], values[:, :, :n] = self.keys, self.values
        index[0, :n], index[1, :n], index[2, :n] = self.token_index, self.token_ids, self.byte_start
        room = Room(keys, values, index, end=n)
        old = self.room
        if old is not None and old.rotated is not None and old.rot_pos is not None:  # still valid where they move
            rotated, rot_pos = room.rotation()
            rotated[:, :, :n] = old.rotated[:, :, self.start : self.start + n]
            rot_pos[:n] = old.rot_pos[self.start : self.start + n]
        return room

    def reserve(self, extra: int) -> KVState:
        """This state with space for `extra` more entries written in place after it: itself when it is the
        newest state of a room with space left, else a copy in a new room (what `append` would make)."""
        self.check_current()
        room = self.room
        if room is not None and self._is_tip() and room.end + extra <= room.size:
            return self
        room = self._new_room(extra)
        return KVState._view(room, 0, len(self))

    def room_read(self, plan: ForwardPlan, first_token: int) -> RoomRead:
        """A read of this memory from its room for `plan` (whose first `len(self)` keys are these entries), the
        current tokens (document index `first_token` onwards) going to the slots after it: this state must
        have room for them (`reserve`). Memory slots not rotated at their plan position plus the shift
        (`rotation_shift`) are rotated again by the forward, and marked unrotated until it commits."""
        room = self.room
        if room is None or not self._is_tip():
            raise RuntimeError("a room read needs the newest state of a room (reserve first)")
        rotated, rot_pos = room.rotation()
        m, end = len(self), self.start + len(self)
        key_pos = plan.key_pos.to(torch.long)
        shift = rotation_shift(first_token - int(key_pos[m]), int(key_pos.numel()))
        need = key_pos[:m] + shift
        moved = torch.nonzero(rot_pos[self.start : end] != need).flatten()
        stale = moved + self.start
        rot_pos[stale] = UNROTATED
        return RoomRead(room.keys, room.values, rotated, rot_pos, self.start, end, shift, stale, need[moved],
                        key_pos[m:] + shift, plan.memory_keys, plan.memory_values, plan.query_pos, plan.key_pos)

    def holds_appended(self, read: RoomRead, count: int) -> bool:
        """Whether this state (just appended `count` entries) wrote them where `read` rotated them."""
        return self.room is not None and self.room.rotated is read.rotated and self.start + len(self) == read.end + count

    def append(self, keys: torch.Tensor, values: torch.Tensor, token_index: torch.Tensor,
               token_ids: torch.Tensor, byte_start: torch.Tensor) -> KVState:
        """Add entries at the end (new tokens are always the newest). Writes only the new entries when this is
        the newest state of a room with space left; otherwise copies into a new room twice the size."""
        self.check_current()
        e = int(token_index.numel())
        room, start = self.room, self.start
        if room is None or not self._is_tip() or room.end + e > room.size:
            room, start = self._new_room(e), 0
        at = room.end
        room.forget_rotation(at, at + e)  # a read may have rotated these slots already: its commit comes after
        room.keys[:, :, at : at + e] = keys
        room.values[:, :, at : at + e] = values
        room.index[0, at : at + e], room.index[1, at : at + e], room.index[2, at : at + e] = token_index, token_ids, byte_start
        room.end = at + e
        return KVState._view(room, start, len(self) + e)

    def select(self, keep: torch.Tensor) -> KVState:
        """Keep the entries at integer indices `keep` (in that order), as a copy."""
        self.check_current()
        keep = keep.to(self.token_index.device)
        return KVState(self.keys[:, :, keep], self.values[:, :, keep], self.token_index[keep],
                       self.token_ids[keep], self.byte_start[keep])

    def span(self, a: int, b: int) -> KVState:
        """A copy of entries `a..b-1`."""
        self.check_current()
        return KVState(self.keys[:, :, a:b].clone(), self.values[:, :, a:b].clone(), self.token_index[a:b].clone(),
                       self.token_ids[a:b].clone(), self.byte_start[a:b].clone())

    def non_sinks(self, sinks: int) -> int:
        """Entries that are not sinks (document tokens >= `sinks`)."""
        return int((self.token_index >= sinks).sum())

    def fifo_split(self, sinks: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices kept (sinks + newest `capacity` others, in order) and evicted (oldest first) by `fifo`."""
        is_sink = self.token_index < sinks
        others = torch.nonzero(~is_sink).flatten()
        cut = max(others.numel() - capacity, 0)
        return torch.cat((torch.nonzero(is_sink).flatten(), others[cut:])), others[:cut]

    def _sink_prefix(self, sinks: int) -> int | None:
        """How many leading entries are sinks, when every sink entry leads (the usual layout); else None."""
        is_sink = self.token_index < sinks
        ns = int(is_sink.sum())
        return ns if bool(is_sink[:ns].all()) else None

    def drop_oldest(self, sinks: int, count: int) -> KVState:
        """Without the `count` oldest non-sink entries. In place for the newest state of a room whose sinks
        lead: the view starts `count` slots later and the sink entries move up to meet it."""
        self.check_current()
        ns = self._sink_prefix(sinks)
        if count <= 0:
            return self
        if ns is None or self.room is None or not self._is_tip():
            keep, _ = self.fifo_split(sinks, self.non_sinks(sinks) - count)
            return self.select(keep)
        room, a = self.room, self.start
        if ns:  # a handful of entries; cloned first because source and target may overlap
            b = a + count
            room.keys[:, :, b : b + ns] = room.keys[:, :, a : a + ns].clone()
            room.values[:, :, b : b + ns] = room.values[:, :, a : a + ns].clone()
            room.index[:, b : b + ns] = room.index[:, a : a + ns].clone()
            room.forget_rotation(b, b + ns)
            room.epoch += 1  # views of this room that held the overwritten slots are now stale
        return KVState._view(room, a + count, len(self) - count)

    def fifo(self, sinks: int, capacity: int) -> KVState:
        """Keep the sink entries (document tokens < `sinks`) and the newest `capacity` others."""
        return self.drop_oldest(sinks, self.non_sinks(sinks) - capacity)

    def evict(self, sinks: int, capacity: int) -> tuple[KVState, KVState | None]:
        """`fifo(sinks, capacity)` and a copy of what it evicted (oldest first; None if nothing)."""
        over = self.non_sinks(sinks) - capacity
        if over <= 0:
            return self, None
        ns = self._sink_prefix(sinks)
        if ns is None:
            keep, evicted = self.fifo_split(sinks, capacity)
            return self.select(keep), self.select(evicted)
        gone = self.span(ns, ns + over)  # copied before the sinks move over those slots
        return self.drop_oldest(sinks, over), gone

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors of the state (for snapshots and `memory dump`)."""
        self.check_current()
        return {"keys": self.keys, "values": self.values, "token_index": self.token_index,
                "token_ids": self.token_ids, "byte_start": self.byte_start}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> KVState:
        """Inverse of `tensors()`."""
        return cls(t["keys"], t["values"], t["token_index"], t["token_ids"], t["byte_start"])

    def clone(self) -> KVState:
        """An independent copy (its own storage): continuing it never touches this state, nor the reverse."""
        return KVState.from_tensors({k: v.clone() for k, v in self.tensors().items()})
