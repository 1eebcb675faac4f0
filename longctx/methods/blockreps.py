"""Representative keys of a block memory (InfLLM): per stored block, the few tokens its readers attended most.

When a block leaves the window, each of its tokens is scored by the sum of its pre-rotation q·k with the
newest queries (the tokens that read it last, as InfLLM scores a token by the attention it received in the
local window); the `r` best per key/value head represent the block. Choosing blocks then scores n/block·r
keys instead of all n, in the model's dtype. The representatives live in a ring aligned with the store's
blocks (block b of the store = row b here) and grow with it, so adding blocks writes only the new rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockReps:
    """keys `[layers, kv_heads, blocks, r, head_dim]`; slots `[layers, kv_heads, blocks, r]`: the store slot of
    each representative key. Rows past those the store has filled are allocated but unused."""

    keys: torch.Tensor
    slots: torch.Tensor

    @classmethod
    def empty(cls, layers: int, kv_heads: int, r: int, head_dim: int, *, dtype: torch.dtype,
              device: torch.device) -> BlockReps:
        return cls(torch.zeros(layers, kv_heads, 0, r, head_dim, dtype=dtype, device=device),
                   torch.zeros(layers, kv_heads, 0, r, dtype=torch.long, device=device))

    def put(self, first: int, keys: torch.Tensor, slots: torch.Tensor, capacity: int) -> None:
        """Write the representatives of consecutive blocks from block row `first` (mod `capacity` rows),
        growing the rows (doubling, up to `capacity`) when needed. In place."""
        nb = keys.shape[2]
        rows = (first + torch.arange(nb, device=keys.device)) % capacity
        have = self.keys.shape[2]
        need = int(rows.max()) + 1
        if need > have:
            size = min(capacity, max(need, 2 * have, 16))
            self.keys = _grown(self.keys, size)
            self.slots = _grown(self.slots, size)
        self.keys[:, :, rows] = keys.to(self.keys.dtype)
        self.slots[:, :, rows] = slots

    def clone(self) -> BlockReps:
        return BlockReps(self.keys.clone(), self.slots.clone())

    def tensors(self, blocks: int) -> dict[str, torch.Tensor]:
        return {"keys": self.keys[:, :, :blocks], "slots": self.slots[:, :, :blocks]}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> BlockReps:
        return cls(t["keys"].clone(), t["slots"].clone())


def _grown(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], t.shape[1], rows, *t.shape[3:])
    out[:, :, : t.shape[2]] = t
    return out


def representatives(keys: torch.Tensor, queries: torch.Tensor, block: int, r: int,
                    first_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `r` tokens of each block of `keys [layers, kv_heads, e, d]` (e a multiple of `block`) with the
    largest summed q·k from `queries [layers, heads, s, d]` (every query head of the KV group), as keys
    `[layers, kv_heads, e/block, r, d]` and store slots (`first_slot` + offset). Without queries: evenly
    spaced tokens."""
    layers, kv_heads, e, dim = keys.shape
    nb = e // block
    if queries.shape[2]:
        q = queries.to(keys.dtype).reshape(layers, kv_heads, -1, dim)
        score = (q @ keys.transpose(-1, -2)).float().sum(2)  # [layers, kv_heads, e]
        pick = score.view(layers, kv_heads, nb, block).topk(r, dim=-1).indices.sort(-1).values
    else:
        even = torch.linspace(0, block - 1, r, device=keys.device).long()
        pick = even.expand(layers, kv_heads, nb, r)
    offsets = pick + torch.arange(nb, device=keys.device).view(1, 1, -1, 1) * block
    gathered = keys.gather(2, offsets.flatten(2).unsqueeze(-1).expand(-1, -1, -1, dim))
    return gathered.view(layers, kv_heads, nb, r, dim), first_slot + offsets
