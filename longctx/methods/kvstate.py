"""Key/value memory content: per-layer pre-rotation keys and values at key/value-head granularity.

This is memory *state* (what a document put into memory), kept apart from any `nn.Module` parameters.
Every entry remembers the token it came from (index in the document, id, byte offset) so positions can be
re-assigned without drift, a window can be recomputed, and `memory dump` can show provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class KVState:
    """Entries in document order. keys/values: `[layers, kv_heads, n, head_dim]`; the rest: `[n]`."""

    keys: torch.Tensor
    values: torch.Tensor
    token_index: torch.Tensor  # int64: position of the source token in the document
    token_ids: torch.Tensor  # int64: the source token (lets `full` recompute its window)
    byte_start: torch.Tensor  # int64: byte offset of the source token in the document

    @classmethod
    def empty(cls, layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device) -> KVState:
        """A memory holding nothing."""
        kv = torch.zeros(layers, kv_heads, 0, head_dim, dtype=dtype, device=device)
        idx = torch.zeros(0, dtype=torch.long, device=device)
        return cls(kv, kv.clone(), idx, idx.clone(), idx.clone())

    def __len__(self) -> int:
        return int(self.token_index.numel())

    def append(self, keys: torch.Tensor, values: torch.Tensor, token_index: torch.Tensor,
               token_ids: torch.Tensor, byte_start: torch.Tensor) -> KVState:
        """Add entries at the end (new tokens are always the newest)."""
        return KVState(
            torch.cat((self.keys, keys), dim=2),
            torch.cat((self.values, values), dim=2),
            torch.cat((self.token_index, token_index)),
            torch.cat((self.token_ids, token_ids)),
            torch.cat((self.byte_start, byte_start)),
        )

    def select(self, keep: torch.Tensor) -> KVState:
        """Keep the entries at integer indices `keep` (in that order)."""
        keep = keep.to(self.token_index.device)
        return KVState(self.keys[:, :, keep], self.values[:, :, keep], self.token_index[keep],
                       self.token_ids[keep], self.byte_start[keep])

    def non_sinks(self, sinks: int) -> int:
        """Entries that are not sinks (document tokens >= `sinks`)."""
        return int((self.token_index >= sinks).sum())

    def fifo_split(self, sinks: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices kept (sinks + newest `capacity` others, in order) and evicted (oldest first) by `fifo`."""
        is_sink = self.token_index < sinks
        others = torch.nonzero(~is_sink).flatten()
        cut = max(others.numel() - capacity, 0)
        return torch.cat((torch.nonzero(is_sink).flatten(), others[cut:])), others[:cut]

    def fifo(self, sinks: int, capacity: int) -> KVState:
        """Keep the sink entries (document tokens < `sinks`) and the newest `capacity` others."""
        if self.non_sinks(sinks) <= capacity:
            return self
        return self.select(self.fifo_split(sinks, capacity)[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors of the state (for snapshots and `memory dump`)."""
        return {"keys": self.keys, "values": self.values, "token_index": self.token_index,
                "token_ids": self.token_ids, "byte_start": self.byte_start}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> KVState:
        """Inverse of `tensors()`."""
        return cls(t["keys"], t["values"], t["token_index"], t["token_ids"], t["byte_start"])

    def clone(self) -> KVState:
        return replace(self, **{k: v.clone() for k, v in self.tensors().items()})
