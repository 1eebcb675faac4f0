"""Reading a key/value memory straight from its room, with its keys kept rotated between steps.

The exact path (attention.py) concatenates `[memory; current]` and rotates every memory key at the plan's
positions, at every layer, for every segment and every generated token. RoPE scores depend only on the
difference of the query's and the key's positions, so when the plan's key positions are the positions the
room's keys were rotated at minus one shift `s` for the whole memory, rotating the queries (and the current
keys) at their positions plus `s` gives the same scores: only the current tokens' keys and the few memory
keys whose position moved by something else (sinks that slid forward, anything never rotated) are rotated.
The current tokens' rotated keys and values are written into the room's slots right after the memory,
where the method's write will append them, so attention reads one view of the room instead of a concat.

The shift depends only on what memory holds (kvstate.rotation_shift): the tokens evicted so far modulo a
power of two at least as long as the plan. For the cache-relative policies (`xl`, `sinks`, `full`) a
window key then keeps its rotated position until that count crosses the next multiple (once per that many
evicted tokens, when the whole memory is rotated again), positions stay below three times the plan's
length, and a fork, a resumed snapshot and an uninterrupted run compute bit for bit the same. Absolute
positions have shift 0.

The rotated keys of the current tokens and re-rotated memory keys become valid for later reads only when
the method appends the captured keys (`commit`, after every layer has written them); until then the re-
rotated slots are marked unrotated, so a read that is never written (or a forward that fails) leaves the
room consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNROTATED = torch.iinfo(torch.long).min  # kvstate.UNROTATED: rot_pos of a slot with no valid rotated key


@dataclass
class RoomRead:
    """One forward's read of memory slots `start..end-1` of a room, the current tokens going to `end..`.

    `keys`/`values`/`rotated`: the room's buffers `[layers, kv_heads, size, head_dim]`; `rot_pos [size]` the
    position each rotated key was rotated at. `shift`: added to every plan position before rotating. `stale`:
    memory slots to rotate again this forward (absolute slot numbers) at positions `stale_pos`; `current_pos`
    the (shifted) positions of the current tokens. `memory_keys`/`memory_values`/`query_pos`/`key_pos`: the
    plan objects this read was made for, so a plan that a method changed afterwards takes the exact path.
    """

    keys: torch.Tensor
    values: torch.Tensor
    rotated: torch.Tensor
    rot_pos: torch.Tensor
    start: int
    end: int
    shift: int
    stale: torch.Tensor
    stale_pos: torch.Tensor
    current_pos: torch.Tensor
    memory_keys: list[torch.Tensor | None] | None
    memory_values: list[torch.Tensor | None] | None
    query_pos: torch.Tensor
    key_pos: torch.Tensor
    layers_done: int = 0

    @property
    def rotate_positions(self) -> torch.Tensor:
        """Positions of the keys this forward rotates: the stale memory slots, then the current tokens."""
        return torch.cat((self.stale_pos, self.current_pos))

    def fits(self, memory_keys: list[torch.Tensor | None] | None, memory_values: list[torch.Tensor | None] | None,
             query_pos: torch.Tensor, key_pos: torch.Tensor) -> bool:
        """Whether a plan still reads what this read was made for: the same positions, and at every layer
        the room's view of memory or nothing."""
        if query_pos is not self.query_pos or key_pos is not self.key_pos:
            return False
        return _same_or_none(memory_keys, self.memory_keys) and _same_or_none(memory_values, self.memory_values)

    def layer_kv(self, layer: int, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 with_memory: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values `[1, kv_heads, n, head_dim]` of layer `layer`: `[memory; current]` when
        `with_memory`, else the current tokens only; views of the room. `key`/`value [1, kv_heads, q, D]`
        are the current tokens' pre-rotation keys and values, `cos`/`sin` the tables at `rotate_positions`."""
        from .attention import apply_rope  # attention imports this module

        s, q, end = self.stale.numel(), key.shape[2], self.end
        rotated = self.rotated[layer]
        if s:  # a handful of keys (the sinks that slid forward), or all of them once per new room
            rotated[:, self.stale] = apply_rope(self.keys[layer][:, self.stale], cos[:s], sin[:s])
        rotated[:, end : end + q] = apply_rope(key[0], cos[s:], sin[s:])
        self.values[layer][:, end : end + q] = value[0]
        self.layers_done += 1
        a = self.start if with_memory else end
        return rotated[:, a : end + q].unsqueeze(0), self.values[layer][:, a : end + q].unsqueeze(0)

    def commit(self, layers: int) -> None:
        """After the method appended the current tokens at `end..`: record the positions their keys (and the
        stale slots') were rotated at, when every layer of the forward rotated them."""
        if self.layers_done != layers:
            return
        q = self.current_pos.numel()
        self.rot_pos[self.stale] = self.stale_pos
        self.rot_pos[self.end : self.end + q] = self.current_pos


def _same_or_none(got: list[torch.Tensor | None] | None, made: list[torch.Tensor | None] | None) -> bool:
    if got is None:
        return True
    if made is None:
        return all(t is None for t in got)
    return len(got) == len(made) and all(g is None or g is m for g, m in zip(got, made))
