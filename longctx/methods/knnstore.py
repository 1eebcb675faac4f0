"""A large FIFO store of past keys/values at a few layers, searched exactly by q·k, block by block.

The store is a ring buffer allocated lazily up to its capacity, so a 10^6-token memory costs nothing until
a document fills it and appending never copies what is already there. Slot `i % capacity` holds the i-th
entry ever written; the oldest is overwritten first (FIFO). Keys are pre-rotation (positions are assigned
at read time) and may be kept in a narrower dtype than the model's, or as int8 codes with a scale per
token and head (storecodec.py): each scored block or gathered entry is widened (decoded) first, the rest stays
compact. With `disk`, keys/values live in page files (pagefile.py) and only the token indices stay in RAM,
plus, when asked (`keep_keys_in_ram`), a copy of a few layers' keys: those a method scores at every step, so
that scoring reads no file (infllm's choosing layers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .pagefile import PageFile, PageLayout
from .storecodec import QUANTISED, SCALE_DTYPE, dequantise, quantise

Index = tuple[int | slice | torch.Tensor, ...]  # into `[layers, kv_heads, slots]` (a head vector's position)
GROW_MIN = 4096  # first allocation, in entries


@dataclass
class KNNStore:
    """keys/values `[layers, kv_heads, slots, head_dim]`; token_index/token_ids/byte_start `[slots]`. An int8
    store also has key_scale/value_scale `[layers, kv_heads, slots]` (fp16); read it through `keys_at`/`values_at`."""

    capacity: int
    keys: torch.Tensor
    values: torch.Tensor
    token_index: torch.Tensor
    token_ids: torch.Tensor
    byte_start: torch.Tensor
    written: int = 0  # entries ever added (slot of the next one: written % capacity)
    key_scale: torch.Tensor | None = None  # int8 stores only
    value_scale: torch.Tensor | None = None
    # block means per layer: (block, entries written when computed, means); an add leaves them, and the next
    # `centroids` call recomputes only the blocks the add wrote to
    _centroids: dict[int, tuple[int, int, torch.Tensor]] | None = None
    _shared: bool = False  # buffers shared with a fork: copied before the first write (copy on write)
    # keys/values (and scales) on disk; then `keys`/`values`/scales are empty and give only shape and dtype
    pages: PageFile | None = None
    # a disk store's keys of these layers, also in RAM (`[len(ram_layers), kv_heads, slots, head_dim]`, as stored)
    ram_layers: tuple[int, ...] = ()
    ram_keys: torch.Tensor | None = None
    ram_key_scale: torch.Tensor | None = None
    _scores: torch.Tensor | None = None  # fp32 scratch for scores over the stored keys (`score_buffer`), never saved

    @classmethod
    def empty(cls, capacity: int, layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype,
              device: torch.device, disk: bool = False) -> KNNStore:
        """A store of `capacity` entries in `dtype` (a float dtype, or torch.int8 for scaled int8 codes), its
        keys/values in RAM or, with `disk`, in page files."""
        kv = torch.zeros(layers, kv_heads, 0, head_dim, dtype=dtype, device=device)
        idx = torch.zeros(0, dtype=torch.long, device=device)
        scale = torch.zeros(layers, kv_heads, 0, dtype=SCALE_DTYPE, device=device) if dtype == QUANTISED else None
        pages = PageFile(PageLayout(layers, kv_heads, head_dim, dtype)) if disk else None
        return cls(capacity, kv, kv.clone(), idx, idx.clone(), idx.clone(), 0, scale,
                   scale.clone() if scale is not None else None, pages=pages)

    def __len__(self) -> int:
        return min(self.written, self.capacity)

    @property
    def quantised(self) -> bool:
        """Whether keys/values are int8 codes with per-token-per-head scales."""
        return self.key_scale is not None

    @property
    def allocated(self) -> int:
        return int(self.token_index.numel())

    def fork(self) -> KNNStore:
        """A store with the same entries whose writes never reach this one (nor this one's writes it): the
        buffers are shared until either side adds, and that side copies them first."""
        self._shared = True
        return replace(self, _centroids=dict(self._centroids) if self._centroids else None, _shared=True)  # means cloned before update

    def _buffers(self) -> tuple[str, ...]:
        """The names of the buffers held in RAM (a ring of slots each)."""
        index = ("token_index", "token_ids", "byte_start")
        if self.pages is not None:
            copy = ("ram_keys", "ram_key_scale") if self.quantised else ("ram_keys",)
            return (*index, *copy) if self.ram_layers else index
        scales = ("key_scale", "value_scale") if self.quantised else ()
        return ("keys", "values", *index, *scales)

    def _own(self) -> None:
        for name in self._buffers():
            setattr(self, name, getattr(self, name).clone())
        if self.pages is not None:
            self.pages = self.pages.fork()
        self._shared = False

    def keys_at(self, index: Index, dtype: torch.dtype) -> torch.Tensor:
        """`keys[index]` (index into `[layers, kv_heads, slots]`) in `dtype`, decoded if int8."""
        return self._read(0, index, dtype)

    def values_at(self, index: Index, dtype: torch.dtype) -> torch.Tensor:
        """`values[index]` (index into `[layers, kv_heads, slots]`) in `dtype`, decoded if int8."""
        return self._read(1, index, dtype)

    def _read(self, part: int, index: Index, dtype: torch.dtype) -> torch.Tensor:
        """Keys (part 0) or values (1) at `index`, from RAM or from the page files."""
        layer = index[0]
        if part == 0 and isinstance(layer, int) and layer in self.ram_layers:
            assert self.ram_keys is not None
            return _decoded(self.ram_keys, self.ram_key_scale, (self.ram_layers.index(layer), *index[1:]), dtype)
        if self.pages is not None:
            return self.pages.read(part, index, dtype).to(self.token_index.device)
        data, scale = (self.keys, self.key_scale) if part == 0 else (self.values, self.value_scale)
        return _decoded(data, scale, index, dtype)

    def add(self, keys: torch.Tensor, values: torch.Tensor, token_index: torch.Tensor, token_ids: torch.Tensor,
            byte_start: torch.Tensor) -> None:
        """Append entries (newest last), overwriting the oldest once full. Mutates the store in place."""
        e = int(token_index.numel())
        if self.capacity == 0 or e == 0:
            return
        if self._shared:
            self._own()
        if e > self.capacity:  # only the newest `capacity` of a huge batch could survive anyway
            skip = e - self.capacity
            keys, values = keys[:, :, skip:], values[:, :, skip:]
            token_index, token_ids, byte_start = token_index[skip:], token_ids[skip:], byte_start[skip:]
            self.written += skip
            e = self.capacity
        self._reserve(min(self.capacity, self.written + e))
        slots = (self.written + torch.arange(e, device=self.token_index.device)) % self.capacity
        if self.pages is not None:
            self.pages.write(slots, keys, values)
            if self.ram_layers:
                assert self.ram_keys is not None
                _put(self.ram_keys, self.ram_key_scale, slots, keys[list(self.ram_layers)])
        else:
            _put(self.keys, self.key_scale, slots, keys)
            _put(self.values, self.value_scale, slots, values)
        self.token_index.index_copy_(0, slots, token_index)
        self.token_ids.index_copy_(0, slots, token_ids)
        self.byte_start.index_copy_(0, slots, byte_start)
        self.written += e

    def _reserve(self, needed: int) -> None:
        """Grow the RAM buffers (doubling, capped at capacity) so that `needed` slots exist."""
        have = self.allocated
        if needed <= have:
            return
        size = min(self.capacity, max(needed, 2 * have, GROW_MIN))
        for name in self._buffers():
            t = getattr(self, name)
            dim = _slot_dim(t)
            out = t.new_zeros(*t.shape[:dim], size, *t.shape[dim + 1:])
            _first_slots(out, have).copy_(t)
            setattr(self, name, out)

    def keep_keys_in_ram(self, layers: tuple[int, ...]) -> None:
        """Keep a copy of `layers`' keys in RAM as well (a disk store; in RAM they are there already), filled
        from the page files for what the store holds, so that reading those keys reads no file."""
        if self.pages is None or not layers or layers == self.ram_layers:
            return
        _, kv_heads, _, dim = self.keys.shape
        n, size = len(self), self.allocated
        self.ram_keys = self.keys.new_zeros(len(layers), kv_heads, size, dim)
        self.ram_key_scale = self.key_scale.new_zeros(len(layers), kv_heads, size) if self.key_scale is not None else None
        for i, layer in enumerate(layers if n else ()):
            codes, scales = self.pages.read_stored(0, layer, n)
            self.ram_keys[i, :, :n] = codes
            if self.ram_key_scale is not None and scales is not None:
                self.ram_key_scale[i, :, :n] = scales
        self.ram_layers = tuple(layers)

    def score_buffer(self, rows: int, n: int) -> torch.Tensor:
        """A reused fp32 buffer `[rows, n]` for scores over `n` stored keys, its contents undefined. At a million
        keys it is hundreds of MB, and a fresh buffer that size is page-faulted in (system time) at every use;
        this one grows by doubling, up to `rows x capacity`. A fork shares it (neither keeps scores in it)."""
        buf, numel = self._scores, rows * n
        if buf is None or buf.numel() < numel:
            grown = min(2 * buf.numel(), rows * self.capacity) if buf is not None else 0
            buf = self._scores = torch.empty(max(numel, grown), device=self.token_index.device)
        return buf[:numel].view(rows, n)

    def order(self) -> torch.Tensor:
        """Slot indices from the oldest entry to the newest."""
        n = len(self)
        first = self.written % self.capacity if self.written > self.capacity else 0
        return (first + torch.arange(n, device=self.token_index.device)) % max(n, 1)

    def search(self, layer: int, queries: torch.Tensor, k: int, block: int) -> torch.Tensor:
        """Slots of the top-`k` keys by dot product for every query: `queries [kv_heads, r, d]` -> `[kv_heads, r, k]`.

        Exact: scores are computed `block` keys at a time and merged, so memory is O(r · block), not O(r · n).
        """
        n = len(self)  # slots past n are allocated but empty
        best_s: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for s in range(0, n, block):
            scores = queries @ self.keys_at((layer, slice(None), slice(s, min(s + block, n))), queries.dtype).transpose(1, 2)
            v, i = scores.topk(min(k, scores.shape[-1]), dim=-1)
            i += s
            if best_s is not None and best_i is not None:
                v, i = torch.cat((best_s, v), -1), torch.cat((best_i, i), -1)
                v, j = v.topk(min(k, v.shape[-1]), dim=-1)
                i = i.gather(-1, j)
            best_s, best_i = v, i
        if best_i is None:
            raise ValueError("search of an empty store (callers search only a store that holds entries)")
        return best_i

    def search_blocks(self, layer: int, queries: torch.Tensor, k: int, *, block: int, probes: int,
                      candidates: int, voters: torch.Tensor | None) -> torch.Tensor:
        """Approximate top-`k` slots: score block centroids, let every voter (`[h, v, d]` queries) vote for its
        `probes` best blocks, keep the `candidates` blocks with most votes (per KV head, shared by all
        `queries`), then score their keys exactly for each query. Without voters the newest blocks are the
        candidates. Cost: O(v · n/block + r · candidates·block) instead of O(r · n).

        The voters are the caller's choice of what may decide for everyone: queries read before `queries`
        keep each query's result independent of the queries after it."""
        n = len(self)
        cent = self.centroids(layer, block)  # [kv_heads, nb, d]
        nb = cent.shape[1]
        if nb <= candidates:
            return self.search(layer, queries, k, block=max(n, 1))
        if voters is None or voters.shape[1] == 0:
            chosen = self._newest_blocks(block, candidates, cent.shape[0], queries.device)
        else:
            best = (voters @ cent.to(voters.dtype).transpose(1, 2)).topk(min(probes, nb), dim=-1).indices
            votes = torch.zeros(cent.shape[0], nb, device=queries.device)
            votes.scatter_add_(1, best.flatten(1), torch.ones(best.flatten(1).shape, device=queries.device))
            chosen = votes.topk(candidates, dim=-1).indices  # [h, c]
        slots = (chosen.unsqueeze(-1) * block + torch.arange(block, device=chosen.device)).flatten(1)
        valid = slots < n
        slots = slots.clamp(max=n - 1)
        heads = torch.arange(slots.shape[0], device=slots.device).view(-1, 1)
        keys = self.keys_at((layer, heads, slots), queries.dtype)  # [h, c*block, d]
        scores = queries @ keys.transpose(1, 2)
        filled = int(valid.sum(-1).min())  # the fewest filled candidate slots of any head
        if filled < valid.shape[-1]:  # only a partly filled last block has empty slots to hide
            scores.masked_fill_(~valid.unsqueeze(1), float("-inf"))
        top = scores.topk(min(k, filled), dim=-1).indices
        return slots.gather(1, top.flatten(1)).view_as(top)

    def _newest_blocks(self, block: int, count: int, heads: int, device: torch.device) -> torch.Tensor:
        """`[heads, count]` indices of the blocks holding the most recently added entries."""
        last = (self.written - 1) % self.capacity // block  # the block of the slot written last
        nb = -(-len(self) // block)
        idx = (last - torch.arange(count, device=device)) % nb
        return idx.view(1, -1).expand(heads, -1)

    def with_neighbours(self, slots: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each hit plus the `span` entries on either side (consecutive text, except across the ring's seam),
        each slot once per query: `[..., k]` -> slots and a validity mask `[..., k * (2 * span + 1)]`."""
        n = len(self)
        off = torch.arange(-span, span + 1, device=slots.device)
        wide = (slots.unsqueeze(-1) + off).flatten(-2)
        wide = wide.masked_fill((wide < 0) | (wide >= n), -1).sort(dim=-1).values
        valid = wide >= 0
        valid[..., 1:] &= wide[..., 1:] != wide[..., :-1]  # the same slot from two hits counts once
        return wide.clamp(min=0), valid

    def centroids(self, layer: int, block: int) -> torch.Tensor:
        """Mean key of each run of `block` slots `[kv_heads, nb, d]` (the last run may be partial), in fp32.
        Kept between calls: after adds, only the blocks they wrote to are averaged again."""
        if self._centroids is None:
            self._centroids = {}
        n, nb = len(self), -(-len(self) // block)
        cached = self._centroids.get(layer)
        if cached is None or cached[0] != block or self.written - cached[1] >= self.capacity:
            dirty = torch.arange(nb, device=self.keys.device)
            means = self.keys.new_zeros(self.keys.shape[1], nb, self.keys.shape[3], dtype=torch.float)
        else:
            since = cached[1] + torch.arange(self.written - cached[1], device=self.keys.device)
            dirty = torch.unique((since % self.capacity) // block)
            means = cached[2]
            if means.shape[1] < nb:  # the store grew: room for the new blocks (a copy of the means only)
                means = torch.cat((means, means.new_zeros(means.shape[0], nb - means.shape[1], means.shape[2])), 1)
            else:
                means = means.clone()  # a fork may share the cached means
        if dirty.numel():
            means[:, dirty] = self._block_means(layer, block, dirty, n)
        self._centroids[layer] = (block, self.written, means)
        return means

    def _block_means(self, layer: int, block: int, blocks: torch.Tensor, n: int) -> torch.Tensor:
        """`[kv_heads, len(blocks), d]` fp32 means of the filled slots of the given runs of `block` slots."""
        slots = blocks.view(-1, 1) * block + torch.arange(block, device=blocks.device)
        filled = slots < n
        keys = self.keys_at((layer, slice(None), slots.clamp(max=n - 1)), torch.float) * filled.unsqueeze(-1)
        return keys.sum(2) / filled.sum(1).view(1, -1, 1)

    def gather(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[kv_heads, r, k, d]` at `slots [kv_heads, r, k]` of one layer, in `dtype`."""
        heads = torch.arange(slots.shape[0], device=slots.device).view(-1, 1, 1)
        return self.keys_at((layer, heads, slots), dtype), self.values_at((layer, heads, slots), dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The filled slots as stored (ring layout kept, so a reload searches identically) + the counter. A disk
        store lists its segments instead of keys/values (their files are linked: `files`)."""
        n = len(self)  # a disk store's RAM copy of some keys is not saved: its files hold them
        out = {name: _first_slots(getattr(self, name), n) for name in self._buffers() if not name.startswith("ram_")}
        if self.pages is not None:
            out.update({f"pages.{k}": v for k, v in self.pages.tensors().items()})
        return {**out, "written": torch.tensor([self.written], dtype=torch.long)}

    def files(self) -> dict[str, Path]:
        """The files a snapshot of this store links (a disk store's segments, then frozen); none in RAM."""
        return self.pages.link_names() if self.pages is not None else {}

    @classmethod
    def from_tensors(cls, capacity: int, t: dict[str, torch.Tensor]) -> KNNStore:
        """The store `tensors()` saved (int8 when it has scales; on disk when it lists segments, whose files
        the snapshot being loaded links: `pagefile.snapshot_files`)."""
        if "pages.layout" in t:
            pages = PageFile.from_tensors({k[6:]: v for k, v in t.items() if k.startswith("pages.")})
            lay = pages.layout
            store = cls.empty(capacity, lay.layers, lay.heads, lay.dim, dtype=lay.dtype, device=t["token_index"].device)
            store.pages = pages
            store.token_index, store.token_ids, store.byte_start = (t[k].clone() for k in ("token_index", "token_ids", "byte_start"))
            store.written = int(t["written"][0])
            return store
        ks, vs = (t[k].clone() if k in t else None for k in ("key_scale", "value_scale"))
        store = cls(capacity, t["keys"].clone(), t["values"].clone(), t["token_index"].clone(), t["token_ids"].clone(),
                    t["byte_start"].clone(), int(t["written"][0]), key_scale=ks, value_scale=vs)
        if (store.keys.dtype == QUANTISED) != (store.key_scale is not None and store.value_scale is not None):
            raise ValueError("an int8 store needs key_scale and value_scale, and only an int8 store has them")
        return store

    def nbytes(self) -> int:
        """Bytes held by the allocated buffers in RAM (including slots allocated but not yet filled)."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self._buffers())

    def disk_bytes(self) -> int:
        """Bytes a disk store's segment files occupy on disk; 0 in RAM."""
        return self.pages.disk_bytes() if self.pages is not None else 0


def _slot_dim(t: torch.Tensor) -> int:
    """The slot dimension of a buffer: `[layers, kv_heads, slots(, head_dim)]` or `[slots]`."""
    return 2 if t.dim() >= 3 else 0


def _first_slots(t: torch.Tensor, n: int) -> torch.Tensor:
    """A view of a buffer's first `n` slots."""
    return t.narrow(_slot_dim(t), 0, n)


def _decoded(data: torch.Tensor, scale: torch.Tensor | None, index: Index, dtype: torch.dtype) -> torch.Tensor:
    """`data[index]` in `dtype`; with a scale, int8 codes decoded by their per-vector scales."""
    if scale is None:
        return data[index].to(dtype)
    return dequantise(data[index], scale[index], dtype)


def _put(data: torch.Tensor, scale: torch.Tensor | None, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Write `x [layers, kv_heads, e, d]` at `slots` along dim 2, encoded to int8 when the store has scales."""
    if scale is None:
        data.index_copy_(2, slots, x.to(data.dtype))
        return
    codes, scales = quantise(x)
    data.index_copy_(2, slots, codes)
    scale.index_copy_(2, slots, scales)
