"""The shared machinery of the key/value baselines (`full`, `window`, `sinks`, `xl`).

They differ only in a `KVPolicy`: how many first tokens stay as sinks, how many recent tokens are kept
(FIFO), whether each query sees a fixed band of previous tokens, how positions are assigned, and whether
an overflowing window is recomputed. Writing is direct (the segment's own pre-rotation K/V), reading is
position-based, injection is at every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from ..errors import UsageError
from ..model.attention import ForwardPlan
from ..text.segments import Segment
from .base import Method, MethodOptions, OptionsT, StateT
from .knnstore import KNNStore
from .kvstate import KVState
from .storecodec import StoreDtype, store_dtype

# option store_dtype; "model" = the model's own; int8 = codes with a scale per token and head (storecodec.py)
Positions = Literal["relative", "absolute"]
Overflow = Literal["fifo", "clear"]


@dataclass(frozen=True)
class KVPolicy:
    """How a K/V memory is managed and read.

    sinks: first document tokens kept forever. capacity: newest other tokens kept after each write (None:
    keep all). band: when set, each query sees exactly the `band` previous tokens plus the sinks
    (StreamingLLM's token-level window, computed a segment at a time). positions: "relative" numbers
    [memory; segment] 0, 1, 2, ... (cache-relative, bounded); "absolute" uses document indices (exact, but
    unbounded). context/keep: when memory + segment would exceed `context`, the window is re-prefilled from
    its newest `keep` tokens (recomputed K/V at fresh positions) instead of evicting blindly. stride: a query
    sees only every `stride`-th memory token counting back from itself (Longformer's dilation; the current
    segment and the sinks stay dense). overflow: "fifo" drops the oldest tokens; "clear" (UniMem's Longformer)
    forgets all but the sinks once memory overflows, keeping only the segment just written.
    """

    sinks: int = 0
    capacity: int | None = 0
    band: int | None = None
    positions: Positions = "relative"
    context: int | None = None
    keep: int = 0
    stride: int = 1
    overflow: Overflow = "fifo"

    @property
    def stores(self) -> bool:
        return self.capacity != 0


class KVMachinery(Method[OptionsT, StateT]):
    """The K/V cache machinery over a `KVState` governed by a `KVPolicy`, whatever the method's own state:
    `KVCacheMethod` holds just a KVState; `StoreMethod`s hold one as their window (`state.local`)."""

    def policy(self) -> KVPolicy:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def empty_kv(self) -> KVState:
        """An empty K/V cache on the backbone's device, in its dtype."""
        b = self.backbone
        return KVState.empty(b.num_layers, b.config.num_key_value_heads, b.head_dim, dtype=b.dtype, device=b.device)

    def kv_from_tensors(self, tensors: dict[str, torch.Tensor]) -> KVState:
        """A KVState from its snapshot tensors, on the backbone's device and in its dtype."""
        dev = self.backbone.device
        state = KVState.from_tensors({k: v.to(dev) for k, v in tensors.items()})
        state.keys, state.values = state.keys.to(self.backbone.dtype), state.values.to(self.backbone.dtype)
        return state

    def dump_kv(self, state: KVState) -> list[dict[str, Any]]:
        """Contiguous runs of document tokens held in memory (sinks, then the recent window)."""
        sinks = self.policy().sinks
        return token_runs(state.token_index, state.byte_start, lambda first: "sinks" if first < sinks else "window")

    def check_segment(self, segment: int) -> None:
        p, limit = self.policy(), self.backbone.max_positions
        if p.positions != "relative":
            return
        span = p.context if p.context is not None else p.sinks + (p.band or p.capacity or 0) + segment
        if span > limit:
            raise UsageError(
                f"{self.describe()} with segment {segment} spans {span} positions, past the model's trained "
                f"{limit}; use a smaller memory or segment"
            )
        if p.context is not None and segment > p.context:
            raise UsageError(f"segment {segment} is longer than the context window {p.context}")

    def read_kv(self, state: KVState, seg: Segment) -> tuple[KVState, ForwardPlan]:
        """The plan over [cache; segment] under the policy (re-prefilling the window first when it overflows)."""
        state.check_current()
        p = self.policy()
        if p.context is not None and len(state) + len(seg) > p.context:
            state = self._recompute(state, min(p.keep, p.context - len(seg)))
        # Inference reads the room in place (model/roomread.py); autograd needs the exact concat path.
        from_room = p.stores and len(seg) > 0 and torch.is_inference_mode_enabled()
        if from_room:
            state = state.reserve(len(seg))
        q_abs = seg.token_index.to(state.token_index.device)
        m = len(state)
        if p.positions == "absolute":
            key_pos, query_pos = torch.cat((state.token_index, q_abs)), q_abs
        else:
            key_pos = torch.arange(m + len(seg), device=q_abs.device)
            query_pos = key_pos[m:]
        memory_keys: list[torch.Tensor | None] | None = list(state.keys) if m else None
        memory_values: list[torch.Tensor | None] | None = list(state.values) if m else None
        plan = ForwardPlan(query_pos=query_pos, key_pos=key_pos, mask=self._mask(state, q_abs, p),
                           memory_keys=memory_keys, memory_values=memory_values, capture=p.stores)
        if from_room:
            plan.room_read = state.room_read(plan, int(q_abs[0]))
        return state, plan

    @staticmethod
    def _mask(state: KVState, q_abs: torch.Tensor, p: KVPolicy) -> torch.Tensor | None:
        """Bool [q, m+q]: causal over document indices, limited to the band plus sinks when banded."""
        m, q = len(state), q_abs.numel()
        if m == 0 and (p.band is None or q <= p.band + 1):
            return None  # plain causal attention: SDPA's fused path
        k_abs = torch.cat((state.token_index, q_abs))
        visible = k_abs[None, :] <= q_abs[:, None]
        if p.band is not None:
            near = (q_abs[:, None] - k_abs[None, :]) <= p.band
            visible &= near | (k_abs[None, :] < p.sinks)
        if p.stride > 1:
            dense = (torch.arange(m + q, device=k_abs.device) >= m) | (k_abs < p.sinks)
            visible &= ((q_abs[:, None] - k_abs[None, :]) % p.stride == 0) | dense[None, :]
        return visible

    def write_kv(self, state: KVState, seg: Segment, plan: ForwardPlan) -> KVState:
        """`state` plus what the forward captured, then the policy's overflow rule."""
        p = self.policy()
        if not p.stores:
            return state
        state = self.append_captured(state, seg, plan)
        if p.capacity is None:
            return state
        if p.overflow == "clear" and state.non_sinks(p.sinks) > p.capacity:
            return state.fifo(p.sinks, min(len(seg), p.capacity))
        return state.fifo(p.sinks, p.capacity)

    def append_captured(self, state: KVState, seg: Segment, plan: ForwardPlan) -> KVState:
        """`state` plus the segment's pre-rotation K/V, captured at every layer by the forward."""
        layers = range(self.backbone.num_layers)
        keys = torch.stack([plan.out.captured[i][0] for i in layers])
        values = torch.stack([plan.out.captured[i][1] for i in layers])
        dev = state.token_index.device
        grown = state.append(keys, values, seg.token_index.to(dev), seg.ids.to(dev), seg.byte_start.to(dev))
        read = plan.room_read
        if read is not None and grown.holds_appended(read, len(seg)):  # their rotated keys are valid from now on
            read.commit(self.backbone.num_layers)
        return grown

    def _recompute(self, state: KVState, keep: int) -> KVState:
        """Re-prefill the newest `keep` tokens at positions 0..keep-1 (their K/V as if the text began there)."""
        kept = state.select(torch.arange(len(state) - keep, len(state), device=state.token_index.device))
        if keep == 0:
            return kept
        pos = torch.arange(keep, device=kept.token_index.device)
        plan = ForwardPlan(query_pos=pos, key_pos=pos, capture=True)
        self.backbone.forward(kept.token_ids, plan)
        layers = range(self.backbone.num_layers)
        kept.keys = torch.stack([plan.out.captured[i][0] for i in layers])
        kept.values = torch.stack([plan.out.captured[i][1] for i in layers])
        return kept



class KVCacheMethod(KVMachinery[OptionsT, KVState]):
    """A method whose memory is just a `KVState` governed by a `KVPolicy`."""

    def init_state(self) -> KVState:
        return self.empty_kv()

    def read(self, state: KVState, seg: Segment) -> tuple[KVState, ForwardPlan]:
        return self.read_kv(state, seg)

    def write(self, state: KVState, seg: Segment, plan: ForwardPlan) -> KVState:
        return self.write_kv(state, seg, plan)

    def memory_size(self, state: KVState) -> int:
        return len(state)

    def state_tensors(self, state: KVState) -> dict[str, torch.Tensor]:
        return state.tensors()

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> KVState:
        return self.kv_from_tensors(tensors)

    def fork_state(self, state: KVState) -> KVState:
        """A copy: a state's room is written in place by whichever state continues it (kvstate.py)."""
        return state.clone()

    def dump(self, state: KVState) -> list[dict[str, Any]]:
        return self.dump_kv(state)


@dataclass
class StoreState:
    """A window (sinks + recent tokens, every layer) and a `KNNStore` of the tokens that left it."""

    local: KVState
    store: KNNStore


class StoreOptions(MethodOptions):
    """The options every `StoreMethod` declares (in its own dataclass, which fixes their order and help).
    Not a dataclass itself: annotations only, so it adds no fields."""

    memory: int
    store_dtype: StoreDtype
    store: Literal["ram", "disk"]


StoreOptionsT = TypeVar("StoreOptionsT", bound=StoreOptions)
StoreStateT = TypeVar("StoreStateT", bound=StoreState)


class StoreMethod(KVMachinery[StoreOptionsT, StoreStateT]):
    """A key/value method whose state has a window (`state.local`, a KVState) and a `KNNStore` of what left
    it (`state.store`): `memorizing`, `unimix`, `infllm`. Snapshots name their tensors `local.*`/`store.*`."""

    def new_store(self, layers: int) -> KNNStore:
        """An empty store of `options.memory` entries at `layers` layers, in `options.store_dtype`."""
        b = self.backbone
        dtype = store_dtype(self.options.store_dtype, b.dtype)
        return KNNStore.empty(self.options.memory, layers, int(b.config.num_key_value_heads), b.head_dim,
                              dtype=dtype, device=b.device, disk=self.options.store == "disk")

    def memory_size(self, state: StoreStateT) -> int:
        return len(state.local) + len(state.store)

    def state_tensors(self, state: StoreStateT) -> dict[str, torch.Tensor]:
        out = {f"local.{k}": v for k, v in state.local.tensors().items()}
        out.update({f"store.{k}": v for k, v in state.store.tensors().items()})
        return out

    def memory_disk_bytes(self, state: StoreStateT) -> int:
        return state.store.disk_bytes()

    def state_files(self, state: StoreStateT) -> dict[str, Path]:
        """A disk store's segment files (a snapshot links them; from then on they are never written)."""
        return state.store.files()

    def memory_bytes(self, state: StoreStateT) -> int:
        """The store's allocated buffers (a ring grows by doubling, so RAM may exceed what is filled, which is
        all a snapshot writes) plus the bytes of the rest of the state (a disk store's keys/values: none)."""
        rest = sum(t.numel() * t.element_size() for k, t in self.state_tensors(state).items() if not k.startswith("store."))
        return rest + state.store.nbytes()

    def split_tensors(self, tensors: dict[str, torch.Tensor], *extra: str) -> tuple[KVState, KNNStore, dict[str, dict[str, torch.Tensor]]]:
        """The window and the store from snapshot tensors (on the model's device), and the tensors of the
        `extra` prefixes, each without its prefix."""
        dev = self.backbone.device
        part = {p: {k.split(".", 1)[1]: v.to(dev) for k, v in tensors.items() if k.startswith(p + ".")}
                for p in ("local", "store", *extra)}
        local = self.kv_from_tensors(part["local"])
        return local, KNNStore.from_tensors(self.options.memory, part["store"]), part

    def fork_state(self, state: StoreStateT) -> StoreStateT:
        """The store is copied only if one side writes to it
        (a question and its answer usually stay within the window, so asking about a large store is cheap).
        The window is copied: its room is written in place by whichever state continues it (kvstate.py)."""
        return replace(state, local=state.local.clone(), store=state.store.fork())

    def dump(self, state: StoreStateT) -> list[dict[str, Any]]:
        """Sinks and window (every layer), then the store's runs of tokens, oldest first."""
        order = state.store.order()
        stored = token_runs(state.store.token_index[order], state.store.byte_start[order], lambda _: "store")
        return self.dump_kv(state.local) + stored


def token_runs(token_index: torch.Tensor, byte_start: torch.Tensor, kind: Callable[[int], str]) -> list[dict[str, Any]]:
    """Group entries (in the given order) into runs of consecutive document tokens, with their provenance."""
    idx, starts = token_index.cpu(), byte_start.cpu()
    if len(idx) == 0:
        return []
    breaks = torch.nonzero(idx[1:] != idx[:-1] + 1).flatten() + 1
    bounds = [0, *breaks.tolist(), len(idx)]
    return [{"kind": kind(int(idx[a])), "entries": b - a, "tokens": [int(idx[a]), int(idx[b - 1]) + 1],
             "byte_start": int(starts[a]), "byte_last_token": int(starts[b - 1])} for a, b in zip(bounds, bounds[1:])]
