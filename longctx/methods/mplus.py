"""`mplus`: M+ (Wang et al., ICML 2025; docs/methods/mplus.md), MemoryLLM with a long-term store and a retriever.

Slots the random drop takes out of the pool move to a long-term store (LTM) on the CPU instead of being
forgotten: each keeps its hidden states `[layers, d]`, its retrieval keys f_k(h) per layer (computed once,
at insertion), its age (the update it was written at) and a recall frequency per layer (starts at
`recall_init`, -1 per LTM update, +1 whenever that layer retrieves it). Past `ltm` slots, those with the
lowest frequency summed over layers are pruned.

Reading: at every layer, before its attention runs (a layer tap), each LTM slot is scored by the mean over
a segment's tokens of σ(f_q(h)·f_k(h_slot)); the top K0 (all if fewer), sorted oldest first, join the keys
as [bos; retrieved; pool; x] (positions 0, 1..K0', K0'+1..). M+ scores with the current tokens, so a
token's keys would depend on the tokens after it; here text is scored with the tokens of the segment read
before it (their f_q(h) per layer, kept in the state), and only a prompt (a question) with its own.
f_q and f_k are small per-layer MLPs (RMSNorm, d -> 2r -> r, no bias). The retriever trains with a BCE on
detached states (it never changes the LM), against labels taken from the layer's own attention (see
docs/methods/mplus.md for why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import ForwardOutputs, ForwardPlan
from ..text.segments import Segment
from .base import OWN, UniMem, option
from .longterm import LongTerm
from .memoryllm import UPDATE, MemoryLLM, MemoryLLMOptions, MemoryLLMParams, PoolState, slot_groups, summary_row
from .recurrent import gaussian
from .registry import register
from .storecodec import StoreDtype, store_dtype

AGE_BUCKETS = 8  # `memory dump`'s age histogram of the long-term store


@dataclass(frozen=True)
class MPlusOptions(MemoryLLMOptions):
    ltm: int = option(8192, "long-term store capacity in slots (CPU); past it the least recalled slots are pruned")
    retrieve: int = option(256, "K0: long-term slots each layer retrieves per forward (paper: 2,560)")
    retriever_dim: int = option(64, "r: width of the retriever's f_q/f_k projections (paper: 256)")
    recall_init: int = option(10, "recall frequency of a slot entering the long-term store (paper: 10)")
    retriever_loss: float = option(1.0, "weight of the retriever's BCE in training (0 = retriever not trained)")
    store: Literal["ram", "disk"] = option("ram", "where the long-term slots' hidden states live: ram, or disk "
                                                  "(page files under LONGCTX_HOME/stores; a snapshot links them)")
    store_dtype: StoreDtype = option("model", "dtype of the long-term slots' hidden states: model, bf16, fp16, or "
                                              "int8 (codes with a scale per slot and layer)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.ltm >= 1, "ltm", "must be >= 1")
        self.check(self.retrieve >= 1, "retrieve", "must be >= 1")
        self.check(self.retriever_dim >= 1, "retriever_dim", "must be >= 1")
        self.check(self.retriever_loss >= 0.0, "retriever_loss", "must be >= 0")


@dataclass
class MPlusState(PoolState):
    """MemoryLLM's pool state plus the long-term store (carried along by every pool update)."""

    ltm: LongTerm = field(kw_only=True)  # always given (by keyword); after the base's defaulted fields
    # [layers, n, r] f_q of the attention inputs of the last segment read: what the next text segment
    # chooses its long-term slots with (None before any segment)
    queries: torch.Tensor | None = None


@dataclass
class MPlusOutputs(ForwardOutputs):
    """What an M+ forward also captures: which long-term slots each layer retrieved (rows of the store) and
    each layer's f_q of this segment's tokens (what the next segment chooses with)."""

    ltm_picked: dict[int, torch.Tensor] = field(default_factory=dict)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)


@register
class MPlus(MemoryLLM[MPlusOptions]):
    name = "mplus"
    Options = MPlusOptions
    summary = "M+: MemoryLLM + a CPU long-term store of dropped slots, read through a co-trained retriever (trainable)"
    param_options = ("update", "retriever_dim")
    starts_from = ("memoryllm",)  # M+ trains in stages: MemoryLLM's first, then the long-term store's

    # ---- parameters: MemoryLLM's + the retriever -----------------------------------------------------------
    def build_params(self, gen: torch.Generator) -> MemoryLLMParams:
        p = super().build_params(gen)
        layers, d, r = self.backbone.num_layers, self.backbone.config.hidden_size, self.options.retriever_dim
        for side in ("q", "k"):
            setattr(p, f"f{side}_norm", nn.Parameter(torch.ones(layers, d)))
            setattr(p, f"f{side}_in", gaussian(gen, (layers, d, 2 * r), d**-0.5))
            setattr(p, f"f{side}_out", gaussian(gen, (layers, 2 * r, r), (2 * r) ** -0.5))
        return p

    def project(self, side: str, layer: int, h: torch.Tensor) -> torch.Tensor:
        """f_q or f_k (`side` "q"/"k") of layer `layer`: RMSNorm(h) -> 2r -> r, SiLU between, fp32 `[n, r]`."""
        p = self.params
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * getattr(p, f"f{side}_norm")[layer]
        return F.silu(x @ getattr(p, f"f{side}_in")[layer]) @ getattr(p, f"f{side}_out")[layer]

    def relevance(self, layer: int, h_x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`[m]`: each slot's mean over the tokens `h_x` of σ(f_q(h_x)·key), keys `[m, r]` = f_k(h_slot)."""
        return score(self.project("q", layer, h_x.detach()), keys)

    # ---- the UniMem point and sizes ------------------------------------------------------------------------
    def unimem(self) -> UniMem:
        o, base = self.options, super().unimem()
        return replace(base, management=f"{base.management}; dropped slots move to a CPU long-term store of {o.ltm} "
                                        "(least recalled pruned)",
                       reading=f"position: every pool slot + similarity: learned retriever, top {o.retrieve} "
                               "long-term slots per layer (oldest first), chosen with the previous segment's tokens")

    def memory_span(self) -> int:
        return super().memory_span() + self.options.retrieve

    def memory_size(self, state: PoolState) -> int:
        state = _own(state)
        return len(state) + len(state.ltm)

    # ---- state ---------------------------------------------------------------------------------------------
    def init_state(self) -> MPlusState:
        b, o = self.backbone, self.options
        ltm = LongTerm.empty(b.num_layers, b.config.hidden_size, o.retriever_dim, store_dtype(o.store_dtype, b.dtype),
                             disk=o.store == "disk")
        return MPlusState(**vars(super().init_state()), ltm=ltm)

    def fork_state(self, state: PoolState) -> MPlusState:
        """The pool copied through its tensors; the long-term store forked (a disk store shares its files until
        either side writes)."""
        state = _own(state)
        pool = super().state_from_tensors({k: v.clone() for k, v in super().state_tensors(state).items()})
        queries = state.queries.clone() if state.queries is not None else None
        return MPlusState(**vars(pool), ltm=state.ltm.fork(), queries=queries)

    def memory_disk_bytes(self, state: PoolState) -> int:
        return _own(state).ltm.disk_bytes()

    def state_files(self, state: PoolState) -> dict[str, Path]:
        """A disk store's segment files (a snapshot links them; from then on they are never written)."""
        return _own(state).ltm.files()

    def state_tensors(self, state: PoolState) -> dict[str, torch.Tensor]:
        state = _own(state)
        layers, r = self.backbone.num_layers, self.options.retriever_dim
        queries = state.queries if state.queries is not None else torch.zeros(layers, 0, r)  # never None in a file
        return {**super().state_tensors(state), **state.ltm.tensors(), "queries": queries}

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> MPlusState:
        q = tensors.get("queries")
        queries = q.to(self.backbone.device) if q is not None and q.shape[1] else None
        return MPlusState(**vars(super().state_from_tensors(tensors)), ltm=LongTerm.from_tensors(tensors),
                          queries=queries)

    # ---- read: retrieval at every layer's input ------------------------------------------------------------
    def read(self, state: PoolState, seg: Segment) -> tuple[MPlusState, ForwardPlan]:
        state = _own(state)
        count = min(self.options.retrieve, len(state.ltm))
        plan = self.pool_plan(state.pool, len(seg), reserved=count)
        plan.out = MPlusOutputs()
        # text chooses with the segment read before it (causal); a prompt with its own tokens
        basis = OWN if seg.prompt else state.queries
        ltm = state.ltm
        ltm.check_current()

        def tap(current: ForwardPlan, layer: int, h: torch.Tensor) -> None:
            out = current.out
            assert isinstance(out, MPlusOutputs)  # the outputs this read asked for
            self.layer_tap(current, out, ltm, count, basis, layer, h)
        plan.on_layer_input = tap
        return state, plan

    def layer_tap(self, plan: ForwardPlan, out: MPlusOutputs, ltm: LongTerm, count: int,
                  basis: torch.Tensor | str | None, layer: int, h_x: torch.Tensor) -> None:
        """Keep f_q of this segment's attention inputs `h_x [q, d]` (the next segment chooses with them), then
        retrieve with `basis`: earlier f_q projections `[layers, n, r]`, OWN (these) or None (nothing read
        yet to choose with: the newest slots)."""
        with torch.no_grad():
            out.queries[layer] = self.project("q", layer, h_x.detach())
        if not count:
            return
        chooser: torch.Tensor | None
        if isinstance(basis, torch.Tensor):
            chooser = basis[layer]
        else:
            chooser = out.queries[layer] if basis == OWN else None
        self.retrieve_into(plan, out, ltm, count, layer, h_x, chooser)

    def retrieve_into(self, plan: ForwardPlan, out: MPlusOutputs, ltm: LongTerm, count: int, layer: int,
                      h_x: torch.Tensor, chooser: torch.Tensor | None) -> None:
        """Pick this layer's `count` slots with the f_q projections `chooser [n, r]` and put their keys/values
        between BOS and the pool; in training, add the retriever's BCE (on the current tokens' `h_x`)."""
        picked = self.pick(ltm, layer, chooser, count)
        out.ltm_picked[layer] = picked
        b = self.backbone
        k, v = b.layer_kv(layer, b.layer_norm_input(layer, ltm.rows_at(picked, layer).to(b.device, b.dtype)))
        all_keys, all_values = plan.memory_keys, plan.memory_values  # pool_plan gives every layer its BOS + pool
        keys, values = all_keys[layer] if all_keys else None, all_values[layer] if all_values else None
        if all_keys is None or all_values is None or keys is None or values is None:
            raise RuntimeError("M+ retrieves into a pool plan, which has memory at every layer")
        all_keys[layer] = torch.cat((keys[:, :1], k, keys[:, 1:]), dim=1)
        all_values[layer] = torch.cat((values[:, :1], v, values[:, 1:]), dim=1)
        if torch.is_grad_enabled() and self.options.retriever_loss > 0 and len(ltm) > count:
            loss = self.retriever_bce(ltm, layer, h_x, count) * (self.options.retriever_loss / b.num_layers)
            out.aux_loss = loss if out.aux_loss is None else out.aux_loss + loss

    def pick(self, ltm: LongTerm, layer: int, chooser: torch.Tensor | None, count: int) -> torch.Tensor:
        """Rows of the store: the `count` slots most relevant to the f_q projections `chooser [n, r]` at this
        layer (None: the newest), oldest first (CPU long)."""
        if chooser is None:
            return ltm.oldest_first(ltm.newest(count))
        with torch.no_grad():
            relevance = score(chooser, ltm.keys[:, layer].to(chooser.device))
        return ltm.oldest_first(torch.topk(relevance, count).indices.cpu())

    # ---- retriever training --------------------------------------------------------------------------------
    def retriever_bce(self, ltm: LongTerm, layer: int, h_x: torch.Tensor, count: int) -> torch.Tensor:
        """BCE of every slot's relevance against `attention_labels`, on detached states: only f_q/f_k learn."""
        slots = ltm.rows_at(None, layer).to(h_x.device).detach()
        h = h_x.detach()
        labels = self.attention_labels(layer, h, slots, count)
        # f_k from the slots themselves (not the keys stored at insertion), so that f_k trains too
        score = self.relevance(layer, h, self.project("k", layer, slots))
        score = score.clamp(1e-6, 1 - 1e-6)  # by hand: F.binary_cross_entropy refuses autocast
        return -(labels * score.log() + (1 - labels) * (1 - score).log()).mean()

    def attention_labels(self, layer: int, h_x: torch.Tensor, slots: torch.Tensor, count: int) -> torch.Tensor:
        """`[m]` 1.0 for the `count` slots with the highest mean pre-rotation attention logit the current queries
        give them (the layer's own q_proj/k_proj), else 0.0: the stand-in for M+'s relevance labels."""
        b = self.backbone
        attn = b.model.model.layers[layer].self_attn
        with torch.no_grad():
            q = attn.q_proj(h_x.to(b.dtype)).view(h_x.shape[0], -1, attn.head_dim)
            if getattr(attn, "q_norm", None) is not None:  # qwen3 normalises queries per head
                q = attn.q_norm(q)
            k, _ = b.layer_kv(layer, b.layer_norm_input(layer, slots.to(b.dtype)))  # [kv_heads, m, head_dim]
            # the mean over heads and tokens of q·k is the mean query of each KV group dotted with its keys
            mean_q = q.float().mean(0).view(k.shape[0], -1, attn.head_dim).mean(1)  # [kv_heads, head_dim]
            logits = torch.einsum("gd,gmd->m", mean_q, k.float()) / (k.shape[0] * math.sqrt(attn.head_dim))
            labels = torch.zeros(slots.shape[0], device=slots.device)
            labels[torch.topk(logits, count).indices] = 1.0
        return labels

    # ---- write: recall counts, self-update, dropped slots into the store -----------------------------------
    def write(self, state: PoolState, seg: Segment, plan: ForwardPlan) -> PoolState:
        state = _own(state)
        out = plan.out if isinstance(plan.out, MPlusOutputs) else MPlusOutputs()  # K/V from another forward: none
        queries, picked = out.queries, out.ltm_picked
        if queries:
            state = replace(state, queries=torch.stack([queries[i] for i in range(len(queries))]))
        if picked:
            freq = state.ltm.freq.clone()
            for layer, rows in picked.items():
                freq[rows, layer] += 1
            state = replace(state, ltm=replace(state.ltm, freq=freq))
        return super().write(state, seg, plan)

    def on_dropped(self, state: PoolState, hidden: torch.Tensor, origin: torch.Tensor) -> MPlusState:
        state = _own(state)
        return replace(state, ltm=self.merge(state.ltm, hidden, origin))

    def merge(self, ltm: LongTerm, hidden: torch.Tensor, origin: torch.Tensor) -> LongTerm:
        """One LTM update: every frequency -1, the dropped slots (`hidden [layers, j, d]`) appended with f_k
        keys and `recall_init`, then the lowest summed frequencies pruned down to `ltm` slots (ties: the
        newer slot stays); insertion order is kept by the store's `seq`."""
        with torch.no_grad():
            keys = torch.stack([self.project("k", i, hidden[i].detach()) for i in range(hidden.shape[0])], dim=1)
        return ltm.merged(hidden.detach().transpose(0, 1).cpu(), keys.cpu(), origin.cpu(), self.options.recall_init,
                          self.options.ltm)

    # ---- memory dump ---------------------------------------------------------------------------------------
    def dump(self, state: PoolState) -> list[dict[str, Any]]:
        """MemoryLLM's pool rows, then the long-term store: size, ages, frequencies, and a row per segment."""
        state = _own(state)
        ltm = state.ltm
        if not len(ltm):
            summary = f"long-term store 0/{self.options.ltm} slots ({ltm.merges} updates)"
            return [*super().dump(state), summary_row(summary, 0, ltm.origin)]
        ages, freq = ltm.origin[:, UPDATE], ltm.freq.sum(1)
        summary = (f"long-term store {len(ltm)}/{self.options.ltm} slots; written at updates {int(ages.min())}.."
                   f"{int(ages.max())}; recall frequency (sum over layers) {int(freq.min())}..{int(freq.max())}; "
                   f"{ltm.merges} updates, {ltm.pruned} pruned")
        row = summary_row(summary, len(ltm), ltm.origin, age_histogram=age_histogram(ages),
                          frequency=[int(freq.min()), int(freq.max())])
        return [*super().dump(state), row, *slot_groups(ltm.origin, "long-term slots")]


def _own(state: PoolState) -> MPlusState:
    """M+'s state. It is always an MPlusState; the steps M+ shares with MemoryLLM are typed with (and hand
    back) the base, so this narrows."""
    if not isinstance(state, MPlusState):
        raise TypeError(f"mplus needs its own state, got {type(state).__name__}")
    return state


def score(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`[m]`: each key's mean over the queries `[n, r]` of σ(query·key), keys `[m, r]`."""
    return torch.sigmoid(queries @ keys.T).mean(0)


def age_histogram(ages: torch.Tensor, buckets: int = AGE_BUCKETS) -> list[dict[str, Any]]:
    """Slots per range of write-time update index, in up to `buckets` equal ranges."""
    lo, hi = int(ages.min()), int(ages.max())
    width = max(1, math.ceil((hi - lo + 1) / buckets))
    out = []
    for a in range(lo, hi + 1, width):
        n = int(((ages >= a) & (ages < a + width)).sum())
        if n:
            out.append({"updates": [a, a + width - 1], "slots": n})
    return out
