"""`uio`: UIO-LLMs (Li et al., 2024): an encoder compresses each segment into per-layer memory that the
decoder reads as extra keys/values (docs/methods/uio.md).

One frozen base model plays both parts through two peft LoRA adapters (no deep copies):
- encoder (in `write`, after the segment's own forward; LoRA on q_proj, v_proj): [segment; M memory tokens],
  all M copies of one trainable vector. Memory token i sits at position (i+1)L/M, the end of the span it
  summarises, and sees that prefix [0, (i+1)L/M) and itself. The memory is what the M memory rows feed
  every layer's attention: hidden states h^l_mem `[layers, M, d]`, not keys/values;
- transfer head: the decoder adapter's k_proj/v_proj turn h^l_mem into layer l's memory keys/values (kept
  in the state as a cache, recomputed exactly on reload);
- decoder (`read`; base weights for every ordinary token): attention over [all memory; segment], positions
  contiguous with memory first. With no memory it is exactly the base model.
Training (`backward_sample`) is the paper's incremental optimisation with a reservoir of W encoder graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ModelError, UsageError
from ..model.attention import ForwardPlan, causal_mask
from ..text.segments import Segment
from .base import MethodOptions, StepNLL, UniMem, option
from .recurrent import TrainableMethod
from .registry import register
from .reservoir import Reservoir
from .rowroom import RowRoom, append_rows

Management = Literal["unbounded", "fifo"]


@dataclass(frozen=True)
class UIOOptions(MethodOptions):
    memory_tokens: int = option(16, "M: memory tokens the encoder compresses each segment into (16 per 512 tokens = 32x)")
    management: Management = option(
        "unbounded", "unbounded: memory grows by memory_tokens per segment and a read past the trained positions "
        "is refused (the paper); fifo: keep the newest max_memory entries")
    max_memory: int = option(4096, "entries kept under management fifo (whole segments' memories)")
    reservoir: int = option(2, "W: encoder graphs kept alive for back-propagation, chosen by reservoir sampling (training only)")
    importance: bool = option(False, "scale the gradient a decoder step reading t memories sends them by t/W (unbiased; training only)")
    init_seed: int = option(0, "seed of the untrained initial parameters (the memory vector starts at the EOS embedding)")

    def __post_init__(self) -> None:
        self.check(self.memory_tokens >= 1, "memory_tokens", "must be >= 1")
        self.check(self.reservoir >= 1, "reservoir", "must be >= 1")
        self.check(self.max_memory >= 1, "max_memory", "must be >= 1")
        self.check(self.management != "fifo" or self.max_memory >= self.memory_tokens, "max_memory",
                   f"must hold at least one segment's memory_tokens ({self.memory_tokens}) under management fifo")


@dataclass
class UIOState:
    """`hidden [layers, m, d]`: the memory (each layer's attention input at the memory tokens), oldest first;
    `keys`/`values [layers, kv_heads, m, head_dim]`: its pre-rotation K/V through the transfer head (a cache
    derived from `hidden`, not persisted); `spans [chunks, 4]`: the segment each chunk of memory_tokens
    entries summarises (first and end token, first token's byte, last token's byte); segments written. At
    inference hidden/keys/values are views of rows `start..` of a `RowRoom` (rowroom.py): a write appends
    only the new rows and the FIFO only moves `start`; under autograd they are plain tensors (room None)."""

    hidden: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    spans: torch.Tensor
    segments: int = 0
    room: RowRoom | None = field(default=None, repr=False, compare=False)
    start: int = 0


@dataclass
class ChunkGraph:
    """One chunk's memory during `backward_sample`: the encoder output with its graph, and the leaf copy
    (`detach().requires_grad_()`) every later decoder reads and accumulates its gradient on."""

    index: int
    output: torch.Tensor | None
    leaf: torch.Tensor
    span: torch.Tensor

    def release(self) -> None:
        """Run the encoder's backward with the gradient the leaf gathered so far, then free the graph (once:
        gradients arriving on the leaf later are lost, as in the paper)."""
        if self.output is None:
            raise RuntimeError(f"the encoder graph of chunk {self.index} was already released")
        if self.leaf.grad is not None and self.output.requires_grad:
            self.output.backward(self.leaf.grad)
        self.output = None


class UIOParams(nn.Module):
    """UIO's trainable parameters (declared for the type checker; `build_params` sets them)."""

    memory: nn.Parameter


@register
class UIO(TrainableMethod[UIOOptions, UIOState]):
    params: UIOParams
    name = "uio"
    backward_in_sample = True  # the trainer calls backward_sample (incremental optimisation)
    Options = UIOOptions
    summary = ("UIO-LLMs: an encoder LoRA compresses each segment into M per-layer memory tokens, read by the "
               "decoder as extra keys/values through LoRA'd k/v projections (trainable)")
    lora_roles = {"encoder": ("q_proj", "v_proj"), "decoder": ("k_proj", "v_proj")}
    main_role = None  # ordinary tokens always run the base weights
    param_options = ()  # W and importance shape training only; M copies of one vector whatever M is

    def build_params(self, gen: torch.Generator) -> UIOParams:
        p = UIOParams()
        p.memory = nn.Parameter(self.embed(torch.tensor([self.eos_id()])).detach().float().clone())
        return p

    def eos_id(self) -> int:
        """The tokenizer's end-of-text token (the model config's when the tokenizer names none)."""
        eos = self.backbone.tokenizer.eos_token_id
        if eos is None:
            eos = getattr(self.backbone.config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is None:
            raise ModelError("uio initialises its memory vector from the EOS token's embedding; this model has no EOS token")
        return int(eos)

    @property
    def kept_chunks(self) -> int | None:
        """Segments' memories kept (None: all of them)."""
        o = self.options
        return None if o.management == "unbounded" else o.max_memory // o.memory_tokens

    def unimem(self) -> UniMem:
        o = self.options
        management = (f"unbounded: grows by {o.memory_tokens} entries per segment" if self.kept_chunks is None
                      else f"FIFO of {o.max_memory} entries (whole segments' memories)")
        return UniMem(management=management,
                      writing=f"model-forward: encoder LoRA compresses each segment into {o.memory_tokens} tokens per layer",
                      reading="full: every memory token, positions contiguous, memory first",
                      injection="extra keys/values at every layer through the decoder's LoRA'd k/v projections")

    def check_segment(self, segment: int) -> None:
        self.check_span(segment, self.options.memory_tokens)  # the encoder's forward
        if self.kept_chunks is not None:
            held, limit = self.kept_chunks * self.options.memory_tokens, self.backbone.max_positions
            if held + segment > limit:
                raise UsageError(f"{self.describe()} keeps up to {held} memory entries: with segment {segment} the "
                                 f"decoder spans {held + segment} positions, past the model's trained {limit}; "
                                 "use a smaller max_memory or segment")

    # ---- state -------------------------------------------------------------------------------------------------
    def init_state(self) -> UIOState:
        b = self.backbone
        keys, values = self._empty_kv()
        hidden = torch.zeros(b.num_layers, 0, b.config.hidden_size, dtype=b.dtype, device=b.device)
        return UIOState(hidden, keys, values, torch.zeros(0, 4, dtype=torch.long, device=b.device))

    def _empty_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        kv = torch.zeros(b.num_layers, b.config.num_key_value_heads, 0, b.head_dim, dtype=b.dtype, device=b.device)
        return kv, kv.clone()

    def memory_size(self, state: UIOState) -> int:
        return int(state.hidden.shape[1])

    def fork_state(self, state: UIOState) -> UIOState:
        """Sharing the state is a copy: a write appends in place only past the newest row of its room, and
        the second of two forks to write copies its rows into a new room (rowroom.py), so no state's rows
        ever change."""
        return state

    def detach_state(self, state: UIOState) -> UIOState:
        return UIOState(state.hidden.detach(), state.keys.detach(), state.values.detach(), state.spans,
                        state.segments)

    def state_tensors(self, state: UIOState) -> dict[str, torch.Tensor]:
        return {"hidden": state.hidden.detach(), "spans": state.spans, "counters": torch.tensor([state.segments])}

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> UIOState:
        """The persisted memory, its K/V recomputed through the decoder adapter chunk by chunk as `write`
        computed them (so they are bit-identical)."""
        dev = self.backbone.device
        hidden = tensors["hidden"].to(dev, self.backbone.dtype)
        with torch.no_grad():
            keys, values = self.derive_kv(hidden)
        return UIOState(hidden, keys, values, tensors["spans"].to(dev), int(tensors["counters"][0]))

    def dump(self, state: UIOState) -> list[dict[str, Any]]:
        """One row per chunk of memory: the segment it summarises."""
        first = state.segments - len(state.spans)
        return [{"kind": f"memory of segment {first + i}", "entries": self.options.memory_tokens, "tokens": [a, b],
                 "byte_start": bs, "byte_last_token": bl} for i, (a, b, bs, bl) in enumerate(state.spans.tolist())]

    # ---- encoder and transfer head ----------------------------------------------------------------------------
    def encoder_plan(self, length: int) -> ForwardPlan:
        """The encoder's forward over [segment of `length`; M memory tokens]: tokens at 0..L-1, causal among
        themselves; memory token i at (i+1)L//M (the end of its span), seeing tokens [0, (i+1)L//M) and itself."""
        m, dev = self.options.memory_tokens, self.backbone.device
        tokens = torch.arange(length, device=dev)
        ends = torch.arange(1, m + 1, device=dev) * length // m
        mask = torch.zeros(length + m, length + m, dtype=torch.bool, device=dev)
        mask[:length, :length] = causal_mask(length, length, dev)
        mask[length:, :length] = tokens[None, :] < ends[:, None]
        mask[length:, length:] = torch.eye(m, dtype=torch.bool, device=dev)
        pos = torch.cat((tokens, ends))
        return ForwardPlan(query_pos=pos, key_pos=pos, mask=mask)

    def encode(self, seg: Segment) -> torch.Tensor:
        """h^l_mem `[layers, M, d]`: every layer's attention input at the segment's memory tokens, through the
        encoder adapter (base weights again afterwards)."""
        length, m = len(seg), self.options.memory_tokens
        embeds = torch.cat((self.embed(seg.ids), self.as_input(self.params.memory).expand(m, -1)))
        plan = self.encoder_plan(length)
        rows: dict[int, torch.Tensor] = {}
        plan.on_layer_input = lambda _plan, layer, h: rows.__setitem__(layer, h[length:])
        self.use_lora("encoder")
        try:
            self.backbone.forward(torch.empty(0), plan, embeds=embeds)
        finally:
            self.use_lora(None)
        return torch.stack([rows[i] for i in range(self.backbone.num_layers)])

    def derive_kv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory keys/values `[layers, kv_heads, m, head_dim]` of `hidden [layers, m, d]` through the decoder
        adapter's k/v projections (the transfer head), one chunk of M entries at a time, each in a fresh
        allocation: a recomputation (from a loaded snapshot, whose buffers may sit anywhere) runs the very
        matmuls `write` ran on identically aligned inputs, so its result is exact."""
        m, size = hidden.shape[1], self.options.memory_tokens
        if m == 0:
            return self._empty_kv()
        self.use_lora("decoder")
        try:
            per_layer = [[self.backbone.layer_kv(layer, hidden[layer, s : s + size].clone()) for s in range(0, m, size)]
                         for layer in range(self.backbone.num_layers)]
        finally:
            self.use_lora(None)
        keys = torch.stack([torch.cat([k for k, _ in chunks], dim=1) for chunks in per_layer])
        values = torch.stack([torch.cat([v for _, v in chunks], dim=1) for chunks in per_layer])
        return keys, values

    # ---- read and write ---------------------------------------------------------------------------------------
    def read(self, state: UIOState, seg: Segment) -> tuple[UIOState, ForwardPlan]:
        m, q, dev = self.memory_size(state), len(seg), self.backbone.device
        if self.kept_chunks is None and m + q > self.backbone.max_positions:
            raise UsageError(
                f"{self.describe()} reached {m} memory entries after {state.segments} segments (document token "
                f"{seg.start}): with this segment's {q} tokens the decoder would span {m + q} positions, past the "
                f"model's trained {self.backbone.max_positions}. Use management: fifo (keeps the newest max_memory "
                "entries) to read further")
        pos = torch.arange(m + q, device=dev)
        if m == 0:
            return state, ForwardPlan(query_pos=pos, key_pos=pos)  # exactly the base model
        return state, ForwardPlan(query_pos=pos[m:], key_pos=pos, memory_keys=list(state.keys),
                                  memory_values=list(state.values))

    def write(self, state: UIOState, seg: Segment, plan: ForwardPlan) -> UIOState:
        hidden = self.encode(seg)
        keys, values = self.derive_kv(hidden)
        spans = torch.cat((state.spans, self._span(seg)))  # a few ints per segment
        if torch.is_grad_enabled():  # autograd keeps every step's tensors: no shared buffer
            grown = UIOState(torch.cat((state.hidden, hidden), dim=1), torch.cat((state.keys, keys), dim=2),
                             torch.cat((state.values, values), dim=2), spans, state.segments + 1)
        else:
            (h, k, v), room, start = append_rows((state.hidden, state.keys, state.values), (1, 2, 2), state.room,
                                                 state.start, (hidden, keys, values))
            grown = UIOState(h, k, v, spans, state.segments + 1, room, start)
        return self._managed(grown)

    def _managed(self, state: UIOState) -> UIOState:
        """FIFO over whole chunks: the newest `kept_chunks` segments' memories."""
        chunks = self.kept_chunks
        if chunks is None or len(state.spans) <= chunks:
            return state
        n = chunks * self.options.memory_tokens
        dropped = self.memory_size(state) - n  # views: only the start moves
        return UIOState(state.hidden[:, -n:], state.keys[:, :, -n:], state.values[:, :, -n:], state.spans[-chunks:],
                        state.segments, state.room, state.start + dropped)

    # ---- training: incremental optimisation (docs/methods/uio.md) ------------------------------------------------
    def backward_sample(self, segments: Sequence[Segment], step: StepNLL, *, loss: str, weight: float,
                        gen: torch.Generator) -> float:
        """Back-propagate one sample as UIO-LLMs trains: decoder step t reads leaf copies of the memories of
        chunks < t and back-propagates its loss at once (scaled by `weight` / scored tokens, so the sum is
        the mean-loss gradient), accumulating on the leaves; the encoder graph of chunk t (none for the last
        chunk: nobody reads it) stays alive only while it is in a reservoir of W, and is released (its
        backward run with the leaf's gradient so far) on eviction or at the end. Returns the mean loss."""
        n = len(segments)
        counts = [int((s.targets >= 0).sum()) if loss != "last" or i == n - 1 else 0 for i, s in enumerate(segments)]
        total = sum(counts)
        if total == 0:
            raise UsageError("a training sample had no scored token (check --loss and the task)")
        reservoir: Reservoir[ChunkGraph] = Reservoir(self.options.reservoir, gen)
        read: list[ChunkGraph] = []  # the chunks the next decoder step reads (all, or the newest under fifo)
        nll_sum = 0.0
        for t, seg in enumerate(segments):
            if counts[t]:
                nll = step(self._leaf_state(read, t), seg)
                assert nll is not None  # counts[t] > 0: the segment has scored targets
                step_loss = nll.sum() * (weight / total)
                if step_loss.requires_grad:  # without memory nothing trainable is on the path
                    step_loss.backward()
                nll_sum += float(nll.detach().double().sum())
            if t < n - 1:
                out = self.encode(seg)
                chunk = ChunkGraph(t, out, out.detach().requires_grad_(), self._span(seg))
                read = read + [chunk]
                if self.kept_chunks is not None:
                    read = read[-self.kept_chunks :]
                leaving = reservoir.offer(chunk)
                if leaving is not None:
                    leaving.release()
        for chunk in reservoir.drain():
            chunk.release()
        return nll_sum / total

    def _leaf_state(self, chunks: list[ChunkGraph], segments: int) -> UIOState:
        """The decoder's memory from the chunks' leaves, K/V recomputed with grad through the decoder adapter.
        With `importance`, a hook scales the gradient this step sends into the leaves (not the decoder LoRA's)
        by max(1, t/W), t the number of memories read: the inverse of their chance W/t of being alive."""
        if not chunks:
            return self.init_state()
        hidden = torch.cat([c.leaf for c in chunks], dim=1)
        factor = max(1.0, len(chunks) / self.options.reservoir)
        if self.options.importance and factor != 1.0:
            hidden.register_hook(lambda g: g * factor)
        keys, values = self.derive_kv(hidden)
        return UIOState(hidden, keys, values, torch.cat([c.span for c in chunks]), segments)

    def _span(self, seg: Segment) -> torch.Tensor:
        """`[1, 4]`: first and end token, first token's byte, last token's byte."""
        return torch.tensor([[seg.start, seg.start + len(seg), int(seg.byte_start[0]), int(seg.byte_start[-1])]],
                            device=self.backbone.device)
