"""`infllm` (InfLLM, Xiao et al., 2024): training-free block memory, read whole at every layer.

Every layer attends to sinks + a recent window, as `xl` does. Tokens leaving the window go, in whole
blocks of consecutive tokens, into a FIFO block memory kept at every layer. Once per forward the top-k
blocks are chosen (see `InfLLM.recall`) and every layer reads them whole, in document order, as if that
text stood between the sinks and the window: positions stay contiguous and inside the trained range, and
the model sees a pass key's digits in their order at every layer.

Where this departs from InfLLM's code, and why (measured on SmolLM2-135M, docs/methods/infllm.md):
- One choice for all layers, not one per layer: per-layer choices put the key's block in 13 of 30 layers
  and the model did not copy it; with the same blocks everywhere it does.
- Blocks are scored by the attention mass the sharpest head gives them (every stored key scored), not by
  the mean query against 4 representative keys: on passkey prompts only two heads of one layer single the
  key's block out; averaged scores ranked it 1st-40th.
- Retrieved blocks keep their order and contiguous positions instead of one shared distance.

Choosing with the *current* segment's queries would let a token's block choice depend on the tokens
after it (a leak into perplexity), so text read into memory chooses with the queries of the tokens
before each segment. A prompt segment (the question `ask` reads after the document) is first read
against sinks + window alone, and its own queries choose what it then reads: one extra forward of the
question. One-token forwards (generation) keep the blocks chosen last and choose again every `refresh`
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

import torch

from ..errors import InputError, UsageError
from ..model.attention import ForwardOutputs, ForwardPlan
from ..model.catalog import retrieval_layers
from ..text.segments import Segment
from .base import UniMem, option
from .blockreps import BlockReps, representatives
from .knnstore import KNNStore
from .kvcache import KVPolicy, StoreMethod, StoreOptions, StoreState
from .kvstate import KVState
from .layersets import resolve_layers
from .registry import register

# stored keys decoded at a time by exact scoring: 6 MB of fp32 keys on the default model, small enough that the
# allocator reuses the same memory for every chunk (a fresh 50 MB buffer page-faulted in at every chunk)
SCORE_CHUNK = 8192
FOCUS = 32  # read tokens named as retrieved (citations): those the choosing heads attended to most


@dataclass(frozen=True)
class InfLLMOptions(StoreOptions):
    memory: int = option(262144, "tokens in the block memory at every layer, FIFO by whole blocks")
    block: int = option(128, "consecutive tokens per memory block (InfLLM: 128)")
    topk: int = option(4, "blocks read, the same at every layer (InfLLM: 16)")
    window: int = option(256, "recent tokens attended directly; older ones move to the block memory (InfLLM: 4096)")
    sinks: int = option(64, "first tokens of the document attended forever (InfLLM: 64-128)")
    queries: int = option(8, "recent queries that choose the blocks")
    refresh: int = option(128, "one-token forwards (generation) choose blocks again after this many tokens")
    store_dtype: Literal["model", "bf16", "fp16", "int8"] = option("int8", "dtype of the block memory: int8 = codes with a scale per token and head (a quarter of fp32, PPL within 0.1 %), model, bf16 or fp16")
    store: Literal["ram", "disk"] = option("ram", "where the store's keys/values live: ram, or disk (page files under LONGCTX_HOME/stores that a saved memory links without a copy; RAM keeps token indices and summaries)")
    scoring: Literal["exact", "representative"] = option("exact", "exact: every stored key scores its block (fp32); representative: only the block's `representatives` most-attended keys (InfLLM; model dtype)")
    representatives: int = option(4, "r: keys per block that represent it under scoring representative (InfLLM: 4)")
    score_layers: str = option("auto", "layers whose heads choose the blocks, as fractions of depth ('all', '0.55-0.65'), or auto: the reader's measured retrieval layers from the model catalog, else all; the chosen blocks are still read at every layer")
    score_keys: Literal["auto", "ram", "disk"] = option("auto", "with store: disk and exact scoring, where the choosing layers' keys are read from: ram (a copy kept in RAM too, about 200 bytes a token and layer in int8 on the default model, so choosing reads no file), disk (the page files), auto = ram when they are at most a quarter of the layers")

    def __post_init__(self):
        for key in ("block", "topk", "queries", "refresh"):
            self.check(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("memory", "window", "sinks"):
            self.check(getattr(self, key) >= 0, key, "must be >= 0")
        self.check(self.memory % self.block == 0, "memory", f"must be a multiple of block ({self.block})")
        self.check(self.representatives >= 1, "representatives", "must be >= 1")
        self.check(self.scoring == "exact" or self.representatives <= self.block, "representatives",
                   f"must be at most block ({self.block})")


@dataclass
class Recalled:
    """The blocks read last (the same at every layer): keys/values `[layers, kv_heads, r, head_dim]`, doc indices `[r]`."""

    keys: torch.Tensor
    values: torch.Tensor
    token_index: torch.Tensor
    focus: torch.Tensor  # doc indices of the read tokens the choosing heads attended to most (citations)

    def __len__(self) -> int:
        return int(self.token_index.numel())


@dataclass
class InfLLMState(StoreState):
    """`local`: sinks + window, every layer; `store`: evicted tokens in whole blocks, every layer."""

    recent: torch.Tensor  # [layers, heads, <= queries, head_dim] pre-rotation queries of the last tokens read
    recalled: Recalled
    since: int = 0  # tokens read since the blocks were last chosen
    reps: BlockReps | None = None  # representative keys per stored block (scoring representative)


@dataclass
class InfLLMOutputs(ForwardOutputs):
    """What an InfLLM forward also captures: each layer's newest pre-rotation queries, `[heads, <= queries,
    head_dim]` (what chooses the next segment's blocks)."""

    recent: dict[int, torch.Tensor] = field(default_factory=dict)

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.recent[i] for i in range(len(self.recent))])


class _QueryTap:
    """The layer tap of one forward: puts each layer's newest pre-rotation queries (at most `keep`, after
    those read `before`) in the plan's InfLLMOutputs."""

    def __init__(self, backbone, before: torch.Tensor, keep: int):
        self.backbone, self.before, self.keep = backbone, before, keep

    def __call__(self, plan: ForwardPlan, layer: int, h: torch.Tensor) -> None:
        out = plan.out
        assert isinstance(out, InfLLMOutputs)  # the outputs the plan's read asked for
        q = self.backbone.layer_queries(layer, h[-self.keep :].detach())
        out.recent[layer] = torch.cat((self.before[layer].to(q.dtype), q), dim=1)[:, -self.keep :]


@register
class InfLLM(StoreMethod[InfLLMOptions, InfLLMState]):
    name = "infllm"
    Options = InfLLMOptions
    summary = "InfLLM block memory: sinks + window + the top-k past blocks (whole, in order) at every layer"

    def policy(self) -> KVPolicy:
        o = self.options
        return KVPolicy(sinks=o.sinks, capacity=o.window)

    @cached_property
    def score_layers(self) -> tuple[int, ...]:
        """The layers whose heads score the blocks (`score_layers`; auto: the catalog's for this reader)."""
        if self.options.score_layers.strip().lower() == "auto":
            return retrieval_layers(self.backbone.info.model_id, self.backbone.num_layers)
        return resolve_layers(self.options.score_layers, self.backbone.num_layers)

    def protocol_options(self) -> dict[str, Any]:
        """`score_layers: auto` is stated with the layers it chose for this reader: `auto(2/5/6/8/14)`."""
        opts = super().protocol_options()
        if self.options.score_layers.strip().lower() == "auto":
            every = self.score_layers == tuple(range(self.backbone.num_layers))
            opts["score_layers"] = "auto(all)" if every else f"auto({'/'.join(map(str, self.score_layers))})"
        return opts

    def check_segment(self, segment: int) -> None:
        o = self.options
        span = o.sinks + o.topk * o.block + o.window + o.block + segment  # the window holds up to a block more
        if span > self.backbone.max_positions:
            raise UsageError(f"{self.describe()} with segment {segment} spans {span} positions, past the model's "
                             f"trained {self.backbone.max_positions}; use fewer or smaller blocks, or a smaller window")

    def init_state(self) -> InfLLMState:
        local, b = self.empty_kv(), self.backbone
        layers, _, _, dim = local.keys.shape
        recent = torch.zeros(layers, int(b.config.num_attention_heads), 0, dim, dtype=b.dtype, device=b.device)
        store = self.new_store(layers)
        self._keep_score_keys(store)
        return InfLLMState(local, store, recent, self._no_recall(local), reps=self._no_reps(store))

    def _keep_score_keys(self, store: KNNStore) -> None:
        """Exact scoring reads the choosing layers' keys every segment: a disk store keeps a RAM copy of them
        (`score_keys`), so choosing reads no file (from the page files a choice over a million stored tokens
        cost 1.6 times as much: benchmarks/score_keys.py)."""
        o, layers = self.options, self.score_layers
        few = len(layers) * 4 <= self.backbone.num_layers
        if o.store == "disk" and o.scoring == "exact" and (o.score_keys == "ram" or (o.score_keys == "auto" and few)):
            store.keep_keys_in_ram(layers)

    def _no_reps(self, store: KNNStore) -> BlockReps | None:
        o = self.options
        if o.scoring != "representative":
            return None
        layers, kv_heads, _, dim = store.keys.shape
        dtype = self.backbone.dtype if store.quantised else store.keys.dtype  # scored as they are: never int8
        return BlockReps.empty(layers, kv_heads, o.representatives, dim, dtype=dtype, device=store.keys.device)

    def _no_recall(self, local: KVState) -> Recalled:
        L, H, _, D = local.keys.shape
        kv = local.keys.new_zeros(L, H, 0, D)
        none = local.token_index.new_zeros(0)
        return Recalled(kv, kv.clone(), none, none.clone())

    def read(self, state: InfLLMState, seg: Segment) -> tuple[InfLLMState, ForwardPlan]:
        o = self.options
        blocks = len(state.store) // o.block
        if blocks and (len(seg) > 1 or state.since + len(seg) >= o.refresh):
            basis = self._probe(state, seg) if seg.prompt else state.recent
            state = replace(state, recalled=self.recall(state.store, basis, state.reps), since=0)
        else:
            state = replace(state, since=state.since + len(seg))
        local, rec = state.local, state.recalled
        local.check_current()
        m = len(local) + len(rec)
        key_pos = torch.arange(m + len(seg), device=local.token_index.device)
        plan = ForwardPlan(query_pos=key_pos[m:], key_pos=key_pos, capture=True, out=InfLLMOutputs())
        if m:
            ns = len(local) - local.non_sinks(o.sinks)
            plan.memory_keys, plan.memory_values = self._layout(local.keys, rec.keys, ns), self._layout(local.values, rec.values, ns)
        if len(rec):  # provenance: the most-attended of the tokens every layer read ([heads, queries, f], views)
            heads = state.recent.shape[1]
            plan.out.retrieved = {i: rec.focus.view(1, 1, -1).expand(heads, len(seg), -1)
                              for i in range(self.backbone.num_layers)}
        plan.on_layer_input = _QueryTap(self.backbone, state.recent, o.queries)
        return state, plan

    @staticmethod
    def _layout(local: torch.Tensor, recalled: torch.Tensor, ns: int) -> list[torch.Tensor | None]:
        """Per-layer memory `[sinks; blocks; window]` from `[layers, kv, n, d]` tensors whose first `ns` local
        entries are the sinks. (Blocks after the window, nearest the query, broke copying: 0/10 at 8k.)"""
        return list(torch.cat((local[:, :, :ns], recalled, local[:, :, ns:]), dim=2))

    def _probe(self, state: InfLLMState, seg: Segment) -> torch.Tensor:
        """The queries of a prompt segment (a question) as it reads sinks + window only: what chooses the
        blocks it then reads. One extra forward of the segment."""
        _, plan = self.read_kv(state.local, seg)  # the xl-style plan over sinks + window
        out = InfLLMOutputs()
        plan.capture, plan.out = False, out
        plan.on_layer_input = _QueryTap(self.backbone, state.recent, self.options.queries)
        self.backbone.forward(seg.ids, plan)
        return out.stacked()

    def recall(self, store: KNNStore, queries: torch.Tensor, reps: BlockReps | None = None) -> Recalled:
        """The top-k blocks for recent `queries [layers, heads, s, head_dim]`, the same blocks at every layer,
        in document order. Every head of every layer spreads its attention (softmax of q·k over all stored
        keys, averaged over the queries) over the blocks; a block scores the largest share any head gives
        it. A few heads retrieve sharply (measured: two heads of SmolLM2's layer 18 put about half their
        mass on a pass key's block), so the maximum lets them decide, and every layer reads what they found.
        With `reps`, only each block's representative keys are scored (in the model dtype)."""
        o = self.options
        n = len(store) // o.block * o.block  # whole blocks only (the store is filled block by block)
        best = torch.zeros(n // o.block, device=store.keys.device)
        token_best = torch.zeros(n, device=store.keys.device)
        if queries.shape[2] == 0:  # nothing read yet to choose with (a store restored without queries): the newest
            best = store.token_index[: n : o.block].float()
        for layer in self.score_layers if queries.shape[2] else ():
            if reps is not None:
                block_mass, token_best = self._rep_mass(reps, queries[layer], layer, n, token_best)
                best = torch.maximum(best, block_mass)
                continue
            mass = self._key_mass(store, queries[layer], layer, n)  # [heads, n]
            best = torch.maximum(best, mass.view(mass.shape[0], -1, o.block).sum(-1).amax(0))
            token_best = torch.maximum(token_best, mass.amax(0))
        top = best.topk(min(o.topk, best.numel())).indices
        top = top[store.token_index[top * o.block].argsort()]  # document order
        slots = (top.unsqueeze(-1) * o.block + torch.arange(o.block, device=top.device)).flatten()
        focus = slots[token_best[slots].topk(min(FOCUS, len(slots))).indices]
        dtype = self.backbone.dtype
        index = (slice(None), slice(None), slots)
        return Recalled(store.keys_at(index, dtype), store.values_at(index, dtype), store.token_index[slots],
                        store.token_index[focus])

    def _key_mass(self, store: KNNStore, queries: torch.Tensor, layer: int, n: int) -> torch.Tensor:
        """Each head's attention `[heads, n]` over the first `n` stored keys of `layer` (softmax of q·k in fp32,
        averaged over `queries [heads, s, d]`). Keys are decoded `SCORE_CHUNK` at a time, so only the logits
        grow with the store."""
        q = queries.float()
        heads, s, dim = q.shape
        kv_heads = store.keys.shape[1]
        q = q.reshape(kv_heads, -1, dim) * self.backbone.head_dim**-0.5
        logits = store.score_buffer(heads * s, n).view(kv_heads, q.shape[1], n)
        for a in range(0, n, SCORE_CHUNK):
            b = min(a + SCORE_CHUNK, n)
            torch.matmul(q, store.keys_at((layer, slice(None), slice(a, b)), torch.float).transpose(1, 2),
                         out=logits[:, :, a:b])
        p = logits.view(heads, s, n)  # softmax in place: exp(x - max), then each query's row over its sum,
        p.sub_(p.amax(-1, keepdim=True)).exp_()  # and the mean over queries as one weighted sum of the rows
        weights = (p.sum(-1) * s).reciprocal_()  # [heads, s]
        return torch.bmm(weights.unsqueeze(1), p).squeeze(1)

    def _rep_mass(self, reps: BlockReps, queries: torch.Tensor, layer: int, n: int,
                  token_best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's block scores `[n/block]` from the representative keys alone (softmax over them, then the
        sharpest head), and `token_best` raised at the representatives' slots (for citations)."""
        nb = n // self.options.block
        keys, slots = reps.keys[layer, :, :nb], reps.slots[layer, :, :nb]  # [kv, nb, r, d], [kv, nb, r]
        kv_heads, _, r, dim = keys.shape
        heads, s, _ = queries.shape
        q = queries.to(keys.dtype).reshape(kv_heads, -1, dim)
        logits = (q @ keys.reshape(kv_heads, nb * r, dim).transpose(1, 2)).float() * self.backbone.head_dim**-0.5
        mass = logits.view(heads, s, nb * r).softmax(-1).mean(1)  # [heads, nb*r]
        per_head_slots = slots.reshape(kv_heads, 1, nb * r).expand(-1, heads // kv_heads, -1).reshape(heads, -1)
        token_best = token_best.scatter_reduce(0, per_head_slots.flatten(), mass.flatten(), "amax")
        return mass.view(heads, nb, r).sum(-1).amax(0), token_best

    def write(self, state: InfLLMState, seg: Segment, plan: ForwardPlan) -> InfLLMState:
        local = self.append_captured(state.local, seg, plan)
        local, evicted = self._evict_blocks(local)
        out = plan.out  # plain when the K/V came from another forward (benchmarks/retrieval.py fills so)
        recent = out.stacked() if isinstance(out, InfLLMOutputs) else state.recent
        if evicted is not None and state.store.capacity:
            if state.reps is not None:  # scored by the queries that read the window last
                self._add_reps(state.reps, state.store, evicted.keys, recent)
            state.store.add(evicted.keys, evicted.values, evicted.token_index, evicted.token_ids, evicted.byte_start)
        return replace(state, local=local, recent=recent)

    def _add_reps(self, reps: BlockReps, store: KNNStore, keys: torch.Tensor, queries: torch.Tensor) -> None:
        """The representatives of the blocks about to be added to `store` (their rows follow its newest)."""
        o, cap = self.options, store.capacity
        skip = max(keys.shape[2] - cap, 0)  # the store keeps at most its capacity, the newest
        first = (store.written + skip) % cap
        rep_keys, slots = representatives(keys[:, :, skip:], queries, o.block, o.representatives, first)
        reps.put(first // o.block, rep_keys, slots % cap, cap // o.block)

    def _evict_blocks(self, local: KVState) -> tuple[KVState, KVState | None]:
        """Move the oldest window tokens to the block memory, whole blocks at a time (the window keeps up
        to a block more than `window`), so every stored block is consecutive text."""
        o = self.options
        held = local.non_sinks(o.sinks)
        over = held - o.window
        if over < o.block:
            return local, None
        return local.evict(o.sinks, held - over // o.block * o.block)

    def state_tensors(self, state: InfLLMState) -> dict[str, torch.Tensor]:
        r = state.recalled
        out = {**super().state_tensors(state), "recent": state.recent, "recalled.keys": r.keys,
               "recalled.values": r.values, "recalled.token_index": r.token_index, "recalled.focus": r.focus, "since": torch.tensor([state.since])}
        if state.reps is not None:
            blocks = len(state.store) // self.options.block
            out.update({f"reps.{k}": v for k, v in state.reps.tensors(blocks).items()})
        return out

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> InfLLMState:
        local, store, part = self.split_tensors(tensors, "recalled", "reps")
        self._keep_score_keys(store)
        r, dtype = part["recalled"], self.backbone.dtype
        recalled = Recalled(r["keys"].to(dtype), r["values"].to(dtype), r["token_index"], r["focus"])
        reps = self._no_reps(store)
        if reps is not None and part["reps"]:
            reps = BlockReps.from_tensors(part["reps"])
        elif reps is not None and len(store) >= self.options.block:
            raise InputError("this infllm memory was saved without representative keys; read the document again "
                             "with scoring: representative")
        return InfLLMState(local, store, tensors["recent"].to(self.backbone.device, dtype), recalled,
                           int(tensors["since"][0]), reps=reps)

    def fork_state(self, state: InfLLMState) -> InfLLMState:
        """As every store method's, with the representative keys copied (written in place like the store)."""
        forked = super().fork_state(state)
        return replace(forked, reps=state.reps.clone() if state.reps is not None else None)

    def unimem(self) -> UniMem:
        o = self.options
        return UniMem(
            management=f"FIFO block memory of {o.memory} tokens in blocks of {o.block}; local {o.sinks} sinks + {o.window} window",
            writing="direct (K/V of tokens leaving the window, whole blocks)",
            reading=f"similarity: top-{o.topk} blocks by the sharpest head's attention mass from {o.queries} recent "
                    "queries, read whole in document order + position: sinks + window",
            injection="all layers",
        )
