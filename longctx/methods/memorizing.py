"""`memorizing` (Memorizing Transformer, Wu et al., 2022) and `unimix` (UniMem's UniMix, Fang et al., 2024).

Every layer attends to sinks + a recent window of keys/values, as `xl` does. Tokens leaving the window go
into a large FIFO store kept only at the retrieval layers. There each query, per head, reads its top-k
store entries by q·k (exact, scored block by block) and attends to them together with the local keys in
one softmax, or through the paper's gate. Retrieved keys carry no age: they are placed at one constant
distance from every query (InfLLM's choice, keeping positions inside the trained range) or left unrotated.
The store is searched before the current segment is added, so a token never retrieves its own segment.

With `index: blocks` the store's blocks are first voted on, and only the keys of the most-voted blocks are
scored. Document text votes with the queries of the segment read before it (kept in the state), never with
its own: a shared vote by the current segment's queries would let a token's neighbours depend on the tokens
after it. A prompt segment (a question) votes with its own queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal, TypeVar

import torch

from ..errors import UsageError
from ..model.attention import ForwardOutputs, ForwardPlan, Retrieved, apply_rope
from ..model.backbone import Backbone
from ..text.segments import Segment
from .base import OWN, Method, UniMem, option
from .knnstore import KNNStore
from .kvcache import KVPolicy, StoreMethod, StoreOptions, StoreState
from .layersets import resolve_layers
from .recurrent import Scale, TrainableMethod, gaussian, scale_param
from .registry import register
from .rmt import TokenMemory


@dataclass(frozen=True)
class MemorizingOptions(StoreOptions):
    memory: int = option(65536, "tokens in the kNN store at each retrieval layer, FIFO (0 = no store: exactly xl)")
    topk: int = option(32, "store entries each query reads, per head")
    span: int = option(0, "neighbours read on each side of every hit: the text around it, in order (0 = hits only)")
    layers: str = option("0.5-1", "retrieval layers as fractions of depth: '0.5-1' = upper half, '1' = last, 'all'")
    window: int = option(2048, "recent tokens attended directly; older ones move to the store")
    sinks: int = option(4, "first tokens of the document attended forever")
    local_layers: str = option("all", "layers that see sinks + window (the others see only the current segment)")
    positions: Literal["constant", "ordered", "none"] = option(
        "ordered", "constant: every retrieved key at one distance from the query; ordered: the newest retrieved at that "
        "distance, older ones further back by their gap in the document (order kept, capped in range); none: unrotated")
    distance: int | None = option(None, "the (nearest) retrieved key's distance; null = sinks + window, just beyond the local keys")
    combine: Literal["joint", "gate"] = option("joint", "joint: one softmax over [retrieved; local]; gate: g*retrieved + (1-g)*local")
    gate: float = option(0.5, "g of combine=gate, every head (untrained; 0 = local only)")
    store_dtype: Literal["model", "bf16", "fp16", "int8"] = option("int8", "dtype of stored keys/values: int8 = codes with a scale per token and head (a quarter of fp32), model, bf16 or fp16")
    store: Literal["ram", "disk"] = option("ram", "where the store's keys/values live: ram, or disk (page files under LONGCTX_HOME/stores that a saved memory links without a copy; RAM keeps token indices and summaries)")
    block: int = option(8192, "store keys scored at a time by the exact search (bounds the score buffer)")
    index: Literal["exact", "blocks"] = option(
        "exact", "exact: every store key scored; blocks: score block means, then the keys of the most-voted blocks")
    index_block: int = option(64, "blocks index: consecutive store entries per block")
    probes: int = option(4, "blocks index: blocks each query votes for")
    candidates: int = option(64, "blocks index: blocks (per KV head and segment) whose keys are scored exactly")

    def __post_init__(self):
        for key in ("memory", "window", "sinks", "span"):
            self.check(getattr(self, key) >= 0, key, "must be >= 0")
        for key in ("topk", "block", "index_block", "probes", "candidates"):
            self.check(getattr(self, key) >= 1, key, "must be >= 1")
        self.check(self.distance is None or self.distance >= 0, "distance", "must be >= 0 or null")
        self.check(0.0 <= self.gate <= 1.0, "gate", "must be within 0..1")


@dataclass
class MemorizingState(StoreState):
    """`local`: sinks + window, every layer; `store`: evicted tokens, retrieval layers only."""

    # index: blocks: the positioned queries `[retrieval layers, kv_heads, n, head_dim]` of the last segment read,
    # which vote for the next text segment's candidate blocks (None: nothing read yet)
    voters: torch.Tensor | None = None


@dataclass
class MemorizingOutputs(ForwardOutputs):
    voters: dict[int, torch.Tensor] = field(default_factory=dict)  # this forward's queries, by store slot


MemorizingOptionsT = TypeVar("MemorizingOptionsT", bound=MemorizingOptions)


@register
class Memorizing(StoreMethod[MemorizingOptionsT, MemorizingState]):
    """Generic in its options so that UniMix (UniMixOptions) shares every step."""

    name = "memorizing"
    Options = MemorizingOptions
    summary = "kNN memory: top-k per query over a large FIFO store of past K/V at upper layers, joint softmax"

    def policy(self) -> KVPolicy:
        o = self.options
        return KVPolicy(sinks=o.sinks, capacity=o.window)

    @cached_property
    def retrieval_layers(self) -> tuple[int, ...]:
        return resolve_layers(self.options.layers, self.backbone.num_layers)

    @cached_property
    def local_layers(self) -> frozenset[int]:
        return frozenset(resolve_layers(self.options.local_layers, self.backbone.num_layers))

    @property
    def distance(self) -> int:
        o = self.options
        return o.sinks + o.window if o.distance is None else o.distance

    _segment: int = 512  # set by check_segment: bounds the ordered policy's spread

    def check_segment(self, segment: int) -> None:
        super().check_segment(segment)
        self._segment = segment
        if self.options.positions == "constant" and self.distance >= self.backbone.max_positions:
            raise UsageError(f"option 'distance' {self.distance} is past the model's trained {self.backbone.max_positions} positions")

    def init_state(self) -> MemorizingState:
        return MemorizingState(self.empty_kv(), self.new_store(len(self.retrieval_layers)))

    def read(self, state: MemorizingState, seg: Segment) -> tuple[MemorizingState, ForwardPlan]:
        local, plan = self.read_kv(state.local, seg)
        mem_k, mem_v = plan.memory_keys, plan.memory_values
        if mem_k is not None and mem_v is not None and len(self.local_layers) < self.backbone.num_layers:
            plan.memory_keys = [k if i in self.local_layers else None for i, k in enumerate(mem_k)]
            plan.memory_values = [v if i in self.local_layers else None for i, v in enumerate(mem_v)]
        plan.capture, plan.out = True, MemorizingOutputs()
        if len(state.store) and self.retrieval_layers:
            slot = {layer: i for i, layer in enumerate(self.retrieval_layers)}
            basis = OWN if seg.prompt else state.voters  # text votes with what was read before it
            store = state.store

            def retrieve(current: ForwardPlan, layer: int, q: torch.Tensor) -> Retrieved | None:
                out = current.out
                assert isinstance(out, MemorizingOutputs)  # the outputs this read asked for
                return self._retrieve(store, slot.get(layer), layer, q, current.rope_of(layer).scaling, out, basis)
            plan.retrieve = retrieve
        return replace(state, local=local), plan

    def _retrieve(self, store: KNNStore, slot: int | None, layer: int, q: torch.Tensor, scaling: float,
                  out: MemorizingOutputs, basis: torch.Tensor | str | None) -> Retrieved | None:
        """Top-k store entries for every query of one layer (q: `[H, Q, D]`, pre-rotation); with the blocks
        index, the candidate blocks are voted for by `basis` (earlier queries, OWN, or None: the newest)."""
        if slot is None:
            return None
        heads, q_len, dim = q.shape
        kv_heads = store.keys.shape[1]
        groups = heads // kv_heads
        q_ret = self._position_queries(q, scaling, layer)
        o = self.options
        grouped = q_ret.reshape(kv_heads, groups * q_len, dim)
        if o.index == "blocks":
            out.voters[slot] = grouped.detach()
            voters = grouped if basis == OWN else basis[slot] if isinstance(basis, torch.Tensor) else None
            slots = store.search_blocks(slot, grouped, o.topk, block=o.index_block, probes=o.probes,
                                        candidates=o.candidates, voters=voters)
        else:
            slots = store.search(slot, grouped, o.topk, o.block)
        keys, values, doc, valid = self._read_entries(store, slot, slots, q.dtype)
        k = slots.shape[-1] * (2 * o.span + 1)
        out.retrieved[layer] = doc.view(heads, q_len, k)
        valid = valid.view(heads, q_len, k) if valid is not None else None
        if self.options.positions == "ordered":
            q_ret, keys = q * scaling, self._ordered_keys(keys, doc, layer)
        gate = None if self.options.combine == "joint" else q.new_full((heads,), self.options.gate)
        return Retrieved(q_ret, keys.view(heads, q_len, k, dim), values.view(heads, q_len, k, dim), gate, valid)

    def _read_entries(self, store: KNNStore, slot: int, hits: torch.Tensor, dtype: torch.dtype):
        """Keys, values and document indices of the hits (with their neighbours when `span` > 0); padding
        entries are marked invalid and get document index -1."""
        valid = None
        if self.options.span:
            hits, valid = store.with_neighbours(hits, self.options.span)
        keys, values = store.gather(slot, hits, dtype)
        doc = store.token_index[hits]
        if valid is not None:
            doc = doc.masked_fill(~valid, -1)
        return keys, values, doc, valid

    def _ordered_keys(self, keys: torch.Tensor, doc: torch.Tensor, layer: int) -> torch.Tensor:
        """Rotate each retrieved key to sit `distance + gap` before its query (the query stays at 0), where
        gap is how far it precedes the newest entry that query retrieved: copying needs the order of digits."""
        gap = doc.amax(dim=-1, keepdim=True) - doc
        limit = self.backbone.max_positions - 1 - self.distance - self._segment
        dist = self.distance + gap.clamp(max=max(limit, 0))
        cos, sin = self._rope_table(layer)
        # position -dist: cos is even, sin odd
        return apply_rope(keys, cos[dist].to(keys.dtype), -sin[dist].to(keys.dtype))

    def _rope_table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every trained position with `layer`'s rotary parameters, looked up per retrieved key
        (cheaper than recomputing); one table per set of rotary parameters."""
        key = ("all", self.backbone.rope_keys[layer])
        if key not in self._tables:
            with torch.inference_mode(False):  # cached: must stay usable by training after an inference pass
                self._tables[key] = self.backbone.rope_tables(torch.arange(self.backbone.max_positions), layer)
        return self._tables[key]

    def _position_queries(self, q: torch.Tensor, scaling: float, layer: int) -> torch.Tensor:
        """Queries as the retrieved keys see them: rotated by the constant distance (keys sit at position 0).

        RoPE's attention scaling multiplies rotated queries and keys alike; retrieved keys are not rotated,
        so their factor is applied to the query instead.
        """
        if self.options.positions == "none":
            return q * scaling**2  # both at position 0
        # constant (and the search of ordered): the query rotated by the distance, the keys at position 0
        cos, sin = self._distance_rope(layer)
        return apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)) * scaling

    def _distance_rope(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("distance", self.backbone.rope_keys[layer])
        if key not in self._tables:
            with torch.inference_mode(False):  # cached, as above
                self._tables[key] = self.backbone.rope_tables(torch.tensor([self.distance]), layer)
        return self._tables[key]

    @cached_property
    def _tables(self) -> dict[tuple[str, str | None], tuple[torch.Tensor, torch.Tensor]]:
        return {}

    def write(self, state: MemorizingState, seg: Segment, plan: ForwardPlan) -> MemorizingState:
        local = self.append_captured(state.local, seg, plan)
        local, gone = local.evict(self.options.sinks, self.options.window)
        if gone is not None and state.store.capacity and self.retrieval_layers:
            layers = torch.tensor(self.retrieval_layers, device=gone.keys.device)
            state.store.add(gone.keys[layers], gone.values[layers], gone.token_index, gone.token_ids, gone.byte_start)
        fresh = plan.out.voters if isinstance(plan.out, MemorizingOutputs) else None  # None: K/V of another forward
        voters = torch.stack([fresh[i] for i in range(len(fresh))]) if fresh else state.voters
        return replace(state, local=local, voters=voters)

    def state_tensors(self, state: MemorizingState) -> dict[str, torch.Tensor]:
        out = super().state_tensors(state)
        if state.voters is not None:
            out["voters.queries"] = state.voters
        return out

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> MemorizingState:
        local, store, part = self.split_tensors(tensors, "voters")
        return MemorizingState(local, store, part["voters"].get("queries"))

    def unimem(self) -> UniMem:
        o = self.options
        combine = "one joint softmax" if o.combine == "joint" else f"gate {o.gate}"
        where = {"none": "none", "constant": f"at distance {self.distance}",
                 "ordered": f"from distance {self.distance}, in document order"}[o.positions]
        return UniMem(
            management=f"FIFO store of {o.memory} tokens; local {o.sinks} sinks + {o.window} window",
            writing="direct (K/V of tokens leaving the window)",
            reading=f"similarity: top-{o.topk} per query and head (positions {where}, {combine}) + position: sinks + window",
            injection=f"store at layers {_layer_text(self.retrieval_layers)}; window at {o.local_layers}",
        )


def _layer_text(layers: tuple[int, ...]) -> str:
    return "{" + ", ".join(map(str, layers)) + "}" if layers else "none"


@dataclass(frozen=True)
class UniMixOptions(MemorizingOptions):
    memory: int = option(10240, "tokens in the K/V store at each memory layer, FIFO (UniMix: 20 segments of 512)")
    topk: int = option(4, "store entries each query reads, per head, besides the window")
    layers: str = option("0.5-1", "memory layers as fractions of depth (UniMix: the upper half)")
    window: int = option(512, "recent tokens attended directly at the memory layers")
    sinks: int = option(4, "global tokens: the first tokens of the document, always attended")
    local_layers: str = option("0.5-1", "layers that see globals + window (UniMix: the memory layers only)")
    rmt_tokens: int = option(0, "RMT memory tokens [mem; x; mem] at the input (UniMix: 40); > 0 needs an adapter from `longctx train`")
    scale: Scale = option("learned", "RMT tokens: written memory times a trained per-channel factor, or raw (none)")
    init_seed: int = option(0, "seed of the untrained RMT token parameters")
    # the trained UniMix adapters were trained and measured over a store in the model's dtype
    store_dtype: Literal["model", "bf16", "fp16", "int8"] = option("model", "dtype of stored keys/values (bf16/fp16 halve the RAM; int8: codes with a scale per token and head)")

    def __post_init__(self):
        super().__post_init__()
        self.check(self.rmt_tokens >= 0, "rmt_tokens", "must be >= 0")


@dataclass
class UniMixState(MemorizingState):
    tokens: TokenMemory | None = None  # the RMT part (None with rmt_tokens = 0)


class UniMixParams(torch.nn.Module):
    """UniMix's RMT token parameters (None with rmt_tokens 0) (declared for the type checker; `build_params` sets them)."""

    memory: torch.nn.Parameter | None
    scale: torch.nn.Parameter | None


@register
class UniMix(Memorizing[UniMixOptions], TrainableMethod[UniMixOptions, MemorizingState]):
    """UniMix = the memorizing machinery at the upper half + RMT tokens at the input (UniMem §1.2).

    With `rmt_tokens` m > 0 each segment runs as [mem; x; mem] like `rmt`: the K/V memory is written from
    the segment's own rows only (memory tokens are excluded from the cache, as in UniMem's code), the
    write slots' final states become the next tokens. Those tokens are trained (`longctx train -m unimix
    -o rmt_tokens=16`); with m = 0 nothing is trainable and the method is training-free."""

    name = "unimix"
    Options = UniMixOptions
    summary = "UniMem's UniMix: upper-half K/V memory read by window + top-k + global tokens, + RMT tokens at the input (trainable)"
    param_options = ("rmt_tokens", "scale")
    params: UniMixParams

    def __init__(self, options: UniMixOptions, backbone: Backbone):
        super().__init__(options, backbone)
        self.trainable = options.rmt_tokens > 0  # the K/V part needs no training
        self.writes_per_segment = self.trainable  # the RMT tokens are rewritten once per segment

    def build_params(self, gen: torch.Generator) -> UniMixParams:
        p = UniMixParams()
        m, d = self.options.rmt_tokens, self.backbone.config.hidden_size
        p.memory = gaussian(gen, (m, d), self.embedding_std()) if m else None
        p.scale = scale_param(self.output_scale_init(), d, self.options.scale) if m else None
        return p

    def describe(self) -> str:
        return TrainableMethod.describe(self) if self.trainable else Method.describe(self)

    def check_segment(self, segment: int) -> None:
        super().check_segment(segment + 2 * self.options.rmt_tokens)  # the forward spans the slots too

    def init_state(self) -> UniMixState:
        s = super().init_state()
        memory = self.params.memory
        return _with_tokens(s, TokenMemory(memory) if self.trainable and memory is not None else None)

    def read(self, state: MemorizingState, seg: Segment) -> tuple[UniMixState, ForwardPlan]:
        s, plan = super().read(state, seg)
        tokens = _tokens(state)
        if tokens is None:
            return _with_tokens(s, None), plan
        m = self.options.rmt_tokens
        mem = self.as_input(tokens.memory)
        plan.embeds = torch.cat((mem, self.embed(seg.ids), mem))
        plan.token_rows = slice(m, m + len(seg))
        _widen_for_tokens(plan, m, len(seg))
        return _with_tokens(s, tokens), plan

    def write(self, state: MemorizingState, seg: Segment, plan: ForwardPlan) -> UniMixState:
        if _tokens(state) is not None:  # the K/V memory keeps the segment's rows, never the memory tokens
            rows = plan.token_rows
            captured = plan.out.captured
            plan.out.captured = {layer: (k[:, rows].detach(), v[:, rows].detach()) for layer, (k, v) in captured.items()}
        s = super().write(state, seg, plan)
        tokens = _tokens(state)
        if tokens is not None:
            tokens = tokens.after(self.written(plan.out.final_hidden[-self.options.rmt_tokens :]), seg)
        return _with_tokens(s, tokens)

    def detach_state(self, state: MemorizingState) -> UniMixState:
        tokens = _tokens(state)
        return _with_tokens(state, tokens.detached() if tokens else None)

    def state_tensors(self, state: MemorizingState) -> dict[str, torch.Tensor]:
        out = super().state_tensors(state)
        tokens = _tokens(state)
        if tokens is not None:
            out.update({f"rmt.{k}": v for k, v in tokens.tensors().items()})
        return out

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> UniMixState:
        s = super().state_from_tensors({k: v for k, v in tensors.items() if not k.startswith("rmt.")})
        rmt = {k[4:]: v for k, v in tensors.items() if k.startswith("rmt.")}
        return _with_tokens(s, TokenMemory.from_tensors(rmt, self.backbone.device) if rmt else None)

    def memory_size(self, state: MemorizingState) -> int:
        return super().memory_size(state) + (self.options.rmt_tokens if _tokens(state) is not None else 0)

    def dump(self, state: MemorizingState) -> list[dict[str, Any]]:
        tokens = _tokens(state)
        return super().dump(state) + ([tokens.group()] if tokens is not None else [])

    def unimem(self) -> UniMem:
        u, m = super().unimem(), self.options.rmt_tokens
        if not m:
            return UniMem(management=u.management, writing=u.writing + "; RMT tokens off (rmt_tokens 0)",
                          reading=u.reading, injection=u.injection)
        return UniMem(management=u.management + f"; {m} RMT tokens, overwritten every segment",
                      writing=u.writing + f" + model-forward ({m} RMT write slots)",
                      reading=u.reading + f" + full ({m} RMT read slots)",
                      injection=u.injection + "; RMT tokens at the input embeddings")


def _tokens(state: MemorizingState) -> TokenMemory | None:
    """UniMix's RMT tokens. Its state is always a UniMixState; the steps it shares with `memorizing` are
    typed with (and hand back) the base, so this narrows."""
    return state.tokens if isinstance(state, UniMixState) else None


def _with_tokens(s: MemorizingState, tokens: TokenMemory | None) -> UniMixState:
    """UniMix's state: the memorizing state `s` (window, store, voters) and the RMT tokens."""
    return UniMixState(s.local, s.store, s.voters, tokens)


def _widen_for_tokens(plan: ForwardPlan, m: int, q: int) -> None:
    """Turn a plan for the segment's q tokens into one for [m read slots; q tokens; m write slots]: positions
    stay contiguous after the K/V memory; the slots see the memory as the segment's first / last token does."""
    mem_len = plan.memory_len
    start = int(plan.query_pos[0]) if plan.query_pos.numel() else 0
    plan.query_pos = torch.arange(start, start + q + 2 * m, device=plan.query_pos.device)
    plan.key_pos = torch.cat((plan.key_pos[:mem_len], plan.query_pos))
    if plan.mask is None:
        return
    old = plan.mask[:, :mem_len]
    memory_part = torch.cat((old[:1].expand(m, -1), old, old[-1:].expand(m, -1)))
    n = q + 2 * m
    local = torch.ones(n, n, dtype=torch.bool, device=old.device).tril()
    plan.mask = torch.cat((memory_part, local), dim=1)
