"""`memoryllm`: MemoryLLM's latent memory pool with self-update (Wang et al., ICML 2024; docs/methods/memoryllm.md).

Every layer l holds a pool θ_l of up to N residual-stream hidden states, read as extra keys/values:
- read: layer l attends to [bos_l; θ_l; x] (positions 0, 1..n, n+1..), the memory's keys/values made by
  layer l's own (read-LoRA'd) k/v projections from its input-normed hidden states; queries only from x;
- write (self-update, through the write LoRA): e_l = the last K slots of θ_l plus a learned positional vector;
  one forward of the segment with keys [bos_l; e_l] at every layer; the last k = min(K, |x|) outputs of every
  layer are the new slots δ_l. Past N slots, as many random old slots are dropped (one draw from the state's
  generator, the same slots in every layer) and δ is appended. A segment shorter than `min_context` is not
  written (the README: shorter contexts disturb the memory).
The pool starts empty and fills up to N (the reference starts from a full, trained pool); the per-layer BOS
vector starts as the base model's own hidden state of a BOS token, so an untrained empty memory is exactly
the base model reading after BOS.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..errors import ModelError, UsageError
from ..model.attention import ForwardPlan
from ..text.segments import Segment
from .base import MethodOptions, UniMem, option
from .recurrent import TrainableMethod
from .registry import register

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "gate_proj")  # MemoryLLM's LoRA targets
# columns of a slot's origin: the segment (write) index, the update index (its age), the segment's token
# span and the bytes where its first and last tokens start
SEGMENT, UPDATE, TOKEN_START, TOKEN_END, BYTE_START, BYTE_LAST = range(6)


@dataclass(frozen=True)
class MemoryLLMOptions(MethodOptions):
    pool: int = option(1024, "N: latent slots per layer; the pool starts empty and fills up to N (paper: 7,680)")
    update: int = option(64, "K: slots each self-update writes (the segment's last K outputs); past N, as many random old slots are dropped")
    min_context: int = option(16, "shortest segment a write takes; shorter ones are read but not written (MemoryLLM README: 16)")
    init_seed: int = option(0, "seed of the random drops (and of randomly initialised parameters)")

    def __post_init__(self) -> None:
        self.check(self.pool >= 1, "pool", "must be >= 1")
        self.check(1 <= self.update <= self.pool, "update", f"must be within 1..pool ({self.pool})")
        self.check(self.min_context >= 1, "min_context", "must be >= 1")


@dataclass
class PoolState:
    """`pool [layers, n, d]` slots (oldest first, n <= N); `origin [n, 6]` where each slot came from (columns
    SEGMENT..BYTE_LAST); `rng` the drop generator's state (uint8); counters: self-updates done, writes skipped
    for a segment shorter than `min_context`, and segments offered to write (the next segment's index)."""

    pool: torch.Tensor
    origin: torch.Tensor
    rng: torch.Tensor
    updates: int = 0
    skipped: int = 0
    segments: int = 0

    def __len__(self) -> int:
        return int(self.pool.shape[1])


class MemoryLLMParams(nn.Module):
    """MemoryLLM's trainable parameters (declared for the type checker; `build_params` sets them)."""

    bos: nn.Parameter
    new_memory_pos: nn.Parameter


MemoryLLMOptionsT = TypeVar("MemoryLLMOptionsT", bound=MemoryLLMOptions)


@register
class MemoryLLM(TrainableMethod[MemoryLLMOptionsT, PoolState]):
    """Generic in its options so that M+ (MPlusOptions) shares every step."""

    params: MemoryLLMParams

    name = "memoryllm"
    Options = MemoryLLMOptions
    summary = "MemoryLLM: a latent pool of N hidden states per layer, self-updated K at a time with random drops (trainable)"
    param_options: ClassVar[tuple[str, ...]] = ("update",)  # K shapes the positional vectors; N does not
    lora_roles: ClassVar[dict[str, tuple[str, ...] | None]] = {"write": LORA_TARGETS, "read": LORA_TARGETS}
    main_role = "read"

    # ---- parameters ----------------------------------------------------------------------------------------
    def build_params(self, gen: torch.Generator) -> MemoryLLMParams:
        d = self.backbone.config.hidden_size
        p = MemoryLLMParams()
        p.bos = nn.Parameter(self.bos_hidden())  # [layers, d]
        p.new_memory_pos = nn.Parameter(torch.zeros(self.options.update, d))  # MemoryLLM's new_memory_positional_emb
        return p

    def bos_hidden(self) -> torch.Tensor:
        """Each layer's residual-stream input for a BOS token (EOS if none) at position 0, base weights, fp32."""
        from ..model.lora import activate

        tok = self.backbone.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise ModelError("memoryllm needs a BOS or EOS token to start its memory from; this tokenizer has neither")
        outputs: dict[int, torch.Tensor] = {}
        pos = torch.zeros(1, dtype=torch.long, device=self.backbone.device)
        plan = ForwardPlan(query_pos=pos, key_pos=pos, on_layer_output=lambda _plan, i, h: outputs.__setitem__(i, h[0]))
        before = self.backbone.active_lora
        with torch.inference_mode(False), torch.no_grad():
            activate(self.backbone, None)
            try:
                self.backbone.forward(torch.tensor([bos]), plan)
            finally:
                activate(self.backbone, before)
            first = self.embed(torch.tensor([bos]))[0]
            layers = [first] + [outputs[i] for i in range(self.backbone.num_layers - 1)]
            return torch.stack(layers).float().cpu()

    # ---- the UniMem point, sizes, checks -------------------------------------------------------------------
    def unimem(self) -> UniMem:
        o = self.options
        return UniMem(management=f"{o.pool} latent slots per layer; each write adds {o.update}, dropping random old slots past {o.pool}",
                      writing=f"model-forward (self-update: the last {o.update} outputs of every layer, write adapter)",
                      reading="position: every slot (full reading)",
                      injection="extra keys/values at every layer (hidden states through the layer's own k/v projections)")

    def memory_span(self) -> int:
        """Positions the memory takes before the segment: BOS + the full pool."""
        return 1 + self.options.pool

    def check_segment(self, segment: int) -> None:
        if segment < self.options.min_context:
            raise UsageError(f"segment {segment} is shorter than option 'min_context' ({self.options.min_context}): "
                             "no segment would ever be written to memory; use a longer segment")
        self.check_span(segment, self.memory_span())

    def memory_size(self, state: PoolState) -> int:
        return len(state)

    # ---- state ---------------------------------------------------------------------------------------------
    def init_state(self) -> PoolState:
        b = self.backbone
        pool = torch.zeros(b.num_layers, 0, b.config.hidden_size, dtype=b.dtype, device=b.device)
        rng = torch.Generator().manual_seed(self.options.init_seed).get_state()
        return PoolState(pool, torch.zeros(0, 6, dtype=torch.long), rng)

    def detach_state(self, state: PoolState) -> PoolState:
        return replace(state, pool=state.pool.detach())

    def state_tensors(self, state: PoolState) -> dict[str, torch.Tensor]:
        return {"pool": state.pool.detach(), "origin": state.origin, "rng": state.rng,
                "counters": torch.tensor([state.updates, state.skipped, state.segments])}

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> PoolState:
        c = [int(x) for x in tensors["counters"].tolist()]
        return PoolState(tensors["pool"].to(self.backbone.device), tensors["origin"].cpu(), tensors["rng"].cpu(), *c)

    # ---- read ----------------------------------------------------------------------------------------------
    def read(self, state: PoolState, seg: Segment) -> tuple[PoolState, ForwardPlan]:
        return state, self.pool_plan(state.pool, len(seg))

    def pool_plan(self, slots: torch.Tensor, q: int, reserved: int = 0) -> ForwardPlan:
        """The plan of a forward over q tokens whose every layer attends to [bos; slots] (`slots [layers, n, d]`)
        at positions 0..n, the tokens after. `reserved` positions after BOS stay free for keys a layer tap
        inserts before the forward's attention reaches them (M+'s retrieved slots)."""
        keys, values = self.memory_kv(self.with_bos(slots))
        m = 1 + reserved + slots.shape[1]
        pos = torch.arange(m + q, device=self.backbone.device)
        return ForwardPlan(query_pos=pos[m:], key_pos=pos, memory_keys=keys, memory_values=values)

    def with_bos(self, slots: torch.Tensor) -> torch.Tensor:
        """`[layers, 1 + n, d]`: each layer's BOS vector before its slots."""
        return torch.cat((self.params.bos.to(slots.dtype).unsqueeze(1), slots), dim=1)

    def memory_kv(self, hidden: torch.Tensor) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Per layer, pre-rotation keys and values `[kv_heads, m, head_dim]` of residual states `hidden[layer]`
        (through the adapter active now)."""
        b = self.backbone
        keys: list[torch.Tensor | None] = []
        values: list[torch.Tensor | None] = []
        for layer in range(b.num_layers):
            k, v = b.layer_kv(layer, b.layer_norm_input(layer, hidden[layer]))
            keys.append(k)
            values.append(v)
        return keys, values

    # ---- write ---------------------------------------------------------------------------------------------
    def write(self, state: PoolState, seg: Segment, plan: ForwardPlan) -> PoolState:
        if len(seg) < self.options.min_context:
            return replace(state, skipped=state.skipped + 1, segments=state.segments + 1)
        return self.add_slots(state, self.new_slots(state.pool, seg), self.origin_row(state, seg))

    def new_slots(self, slots: torch.Tensor, seg: Segment) -> torch.Tensor:
        """δ `[layers, k, d]`: the last k = min(K, |seg|) outputs of every layer in a forward of the segment that
        attends to [bos; e] with e = the last K slots + the learned positional vectors (write adapter)."""
        big_k = self.options.update
        e = slots[:, -big_k:]
        e = e + self.params.new_memory_pos[big_k - e.shape[1]:].to(e.dtype)
        k = min(big_k, len(seg))
        outputs: dict[int, torch.Tensor] = {}
        self.use_lora("write")
        try:
            plan = self.pool_plan(e, len(seg))
            plan.on_layer_output = lambda _plan, i, h: outputs.__setitem__(i, h[-k:])
            self.backbone.forward(seg.ids, plan)
        finally:
            self.use_lora(self.main_role)
        return torch.stack([outputs[i] for i in range(self.backbone.num_layers)]).to(slots.dtype)

    @staticmethod
    def origin_row(state: PoolState, seg: Segment) -> torch.Tensor:
        """`[6]`: where slots written from `seg` now come from."""
        return torch.tensor([state.segments, state.updates, seg.start, seg.start + len(seg), int(seg.byte_start[0]),
                             int(seg.byte_start[-1])])

    def add_slots(self, state: PoolState, delta: torch.Tensor, row: torch.Tensor) -> PoolState:
        """One self-update: append `delta [layers, k, d]` (origin `row`), first dropping random old slots so
        at most N remain; dropped slots go to `on_dropped`."""
        k, room = delta.shape[1], self.options.pool
        over = len(state) + k - room
        pool, origin, rng = state.pool, state.origin, state.rng
        dropped = None
        if over > 0:
            gen = torch.Generator()
            gen.set_state(rng)
            gone = torch.randperm(len(state), generator=gen)[:over]
            keep = torch.ones(len(state), dtype=torch.bool)
            keep[gone] = False
            dropped = (pool[:, ~keep.to(pool.device)], origin[~keep])
            pool, origin, rng = pool[:, keep.to(pool.device)], origin[keep], gen.get_state()
        new = replace(state, pool=torch.cat((pool, delta), dim=1), origin=torch.cat((origin, row.expand(k, -1))),
                      rng=rng, updates=state.updates + 1, segments=state.segments + 1)
        return new if dropped is None else self.on_dropped(new, *dropped)

    def on_dropped(self, state: PoolState, hidden: torch.Tensor, origin: torch.Tensor) -> PoolState:
        """What happens to slots dropped from the pool (`hidden [layers, j, d]`): MemoryLLM forgets them."""
        return state

    # ---- memory dump ---------------------------------------------------------------------------------------
    def dump(self, state: PoolState) -> list[dict[str, Any]]:
        """The pool's occupancy, then one row per source segment that still has slots in it."""
        o = self.options
        summary = (f"pool occupancy {len(state)}/{o.pool} slots per layer ({state.updates} updates, "
                   f"{state.skipped} short segments not written)")
        return [summary_row(summary, len(state), state.origin), *slot_groups(state.origin, "pool slots")]


def summary_row(kind: str, entries: int, origin: torch.Tensor, **extra: Any) -> dict[str, Any]:
    """A `memory dump` row that describes a store as a whole: an empty token span where its entries begin (so
    it covers no text itself: the per-segment rows do)."""
    at = (int(origin[:, TOKEN_START].min()), int(origin[:, BYTE_START].min())) if len(origin) else (0, 0)
    return {"kind": kind, "entries": entries, "tokens": [at[0], at[0]], "byte_start": at[1],
            "byte_last_token": at[1], **extra}


def slot_groups(origin: torch.Tensor, what: str) -> list[dict[str, Any]]:
    """One `memory dump` row per source segment of the slots described by `origin [n, 6]`, oldest first."""
    rows = []
    for s in torch.unique(origin[:, SEGMENT]).tolist():
        mine = origin[origin[:, SEGMENT] == s]
        first = mine[0]
        rows.append({"kind": f"{what} from segment {s}", "entries": len(mine),
                     "tokens": [int(first[TOKEN_START]), int(first[TOKEN_END])], "byte_start": int(first[BYTE_START]),
                     "byte_last_token": int(first[BYTE_LAST]), "written_at_update": int(first[UPDATE])})
    return rows
