"""Attention-level memory injection through transformers' attention-function registry.

The backbone runs with every `position_ids` set to 0, so RoPE is the identity and the attention function
receives *pre-rotation* queries and keys. It then rotates them itself at the positions a method's
`ForwardPlan` assigns. That gives exact pre-rotation keys to store (no re-rotation drift, docs/architecture.md "Positions") and
lets one primitive express every position policy: contiguous, cache-relative, absolute, constant distance.
No modeling code is patched: this is the public `AttentionInterface` seam.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .roomread import RoomRead

ATTN_NAME = "longctx"


@dataclass
class Retrieved:
    """Entries one layer read by similarity, per query: what joins the local keys in that layer's softmax.

    `query [H, Q, D]` is the query rotated for the retrieved keys (their position policy), `keys`/`values`
    `[H, Q, k, D]`. `gate [H]`: None joins the retrieved and local logits in one softmax (training-free);
    otherwise out = gate * attend(retrieved) + (1 - gate) * attend(local), the Memorizing Transformer's form.
    """

    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    gate: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [H, Q, k] bool: False entries are padding (not attended)


@dataclass(frozen=True)
class RopeTables:
    """cos/sin `[n, head_dim]` of one set of rotary parameters at a plan's query and key positions, in the
    model dtype, and RoPE's attention scaling, which the zero-position pass has already applied once to q and k."""

    cos_q: torch.Tensor
    sin_q: torch.Tensor
    cos_k: torch.Tensor
    sin_k: torch.Tensor
    scaling: float = 1.0


@dataclass
class ForwardOutputs:
    """What one forward captured, filled while it runs: the method's write step and the tasks read it.

    `captured[layer]` holds each layer's pre-rotation keys and values `[kv_heads, n, head_dim]` of the
    current tokens (when the plan asks for `capture`); `hidden` the final hidden states `[n, d]` of every
    row, memory tokens included; `retrieved[layer]` the document token indices that layer read by
    similarity, `[H, Q, k]` (provenance: citations, passkey hits); `aux_loss` an auxiliary training loss the
    forward produced (M+'s retriever BCE), already weighted, which training adds. A method that captures
    more (memorizing's voters, InfLLM's recent queries, M+'s retrieval queries and picked slots)
    subclasses this and puts an instance in its plan.
    """

    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    retrieved: dict[int, torch.Tensor] = field(default_factory=dict)
    aux_loss: torch.Tensor | None = None

    @property
    def final_hidden(self) -> torch.Tensor:
        """`hidden`, which the driver always leaves after a forward it ran."""
        if self.hidden is None:
            raise RuntimeError("the final hidden states are filled by the driver's forward")
        return self.hidden


@dataclass
class ForwardPlan:
    """What a method decides for one forward of the backbone, shared by all layers; `out` receives what
    the forward captured.

    `memory_keys[layer]` are pre-rotation keys `[kv_heads, m, head_dim]` (or None: no memory at that
    layer), `key_pos` the positions of `[memory; current]` keys, `query_pos` those of the current tokens,
    `mask` a bool `[q, m + q]` (True = may attend) or None for plain causal attention over the current
    tokens. With `capture`, each layer's pre-rotation keys and values of the current tokens are kept in
    `out.captured` for the method's write step.
    """

    query_pos: torch.Tensor
    key_pos: torch.Tensor
    mask: torch.Tensor | None = None
    memory_keys: list[torch.Tensor | None] | None = None
    memory_values: list[torch.Tensor | None] | None = None
    capture: bool = False
    # Memory tokens at the input (RMT, HMT): `embeds [n, d]` replaces the token ids, and `token_rows` says which
    # rows of the output are the segment's own tokens (None: all of them).
    embeds: torch.Tensor | None = None
    token_rows: slice | None = None
    # Every callback below is handed the running plan by its caller, so none holds the plan itself: a plan
    # that held a callback holding the plan would be a reference cycle, keeping each forward's keys and
    # values alive until the garbage collector ran. Callbacks record what they find in `plan.out`.
    # Similarity reading: called with (plan, layer, pre-rotation queries [H, Q, D]); None = nothing there.
    retrieve: Callable[[ForwardPlan, int, torch.Tensor], Retrieved | None] | None = None
    # Layer taps (hidden-state memories: UIO, MemoryLLM, M+). `on_layer_input(plan, layer, h [n, d])` sees
    # each layer's attention input (after its input norm) before the attention runs, so it may still set
    # that layer's `memory_keys`/`memory_values`; `on_layer_output(plan, layer, h [n, d])` sees its output.
    on_layer_input: Callable[[ForwardPlan, int, torch.Tensor], None] | None = None
    on_layer_output: Callable[[ForwardPlan, int, torch.Tensor], None] | None = None
    # What the forward captured (outputs), kept apart from the decisions above.
    out: ForwardOutputs = field(default_factory=ForwardOutputs)
    # Filled by the backbone before the forward: each layer's RoPE tables at the plan's positions, from that
    # layer's own rotary parameters (layers of one type share one object).
    rope: list[RopeTables] | None = None
    # A read of the memory straight from a K/V room whose keys stay rotated between steps (roomread.py); the
    # backbone drops it when the plan no longer reads what it was made for. With it, the RoPE tables are at
    # the shifted positions: queries at `query_pos + shift`, keys at `room_read.rotate_positions`.
    room_read: RoomRead | None = None

    def rope_of(self, layer: int) -> RopeTables:
        """The RoPE tables of `layer` (its own rotary parameters: a local layer's base may differ)."""
        if self.rope is None:
            raise RuntimeError("the backbone fills the plan's RoPE tables before the forward")
        return self.rope[layer]

    @property
    def memory_len(self) -> int:
        """Number of memory keys (the same at every layer that has memory)."""
        return int(self.key_pos.numel() - self.query_pos.numel())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's pairing convention of the Llama family: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [..., n, head_dim]` by tables `[n, head_dim]` (same arithmetic as transformers' Llama)."""
    return (x * cos) + (rotate_half(x) * sin)


def longctx_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    longctx_plan: ForwardPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over `[memory; current]` with positions from the plan; registered as "longctx".

    `scaling` and `sliding_window` are what the model's own attention module passes (Gemma 3's
    `query_pre_attn_scalar`, a local layer's window): a local layer sees only keys whose position lies within
    its window of the query's, whatever the plan's mask allows, and reads nothing by similarity.
    """
    plan = longctx_plan
    if plan is None:
        raise RuntimeError("the longctx attention function needs a ForwardPlan (longctx_plan=...)")
    layer = cast(int, module.layer_idx)  # every decoder layer's attention module carries its index
    rope = plan.rope_of(layer)
    if rope.scaling != 1.0:
        query, key = query / rope.scaling, key / rope.scaling
    if plan.capture:
        plan.out.captured[layer] = (key[0], value[0])
    q = apply_rope(query, rope.cos_q, rope.sin_q)
    mem_k = plan.memory_keys[layer] if plan.memory_keys is not None else None
    mem_v = plan.memory_values[layer] if plan.memory_values is not None else None
    with_memory = mem_k is not None and mem_v is not None and mem_k.shape[1] > 0
    q_len = query.shape[2]
    if plan.room_read is not None:  # rotated keys kept in the room: rotate only what is new, read a view
        k, v = plan.room_read.layer_kv(layer, key, value, rope.cos_k, rope.sin_k, with_memory)
    elif with_memory:
        assert mem_k is not None and mem_v is not None
        k = apply_rope(torch.cat((mem_k.unsqueeze(0), key), dim=2), rope.cos_k, rope.sin_k)
        v = torch.cat((mem_v.unsqueeze(0), value), dim=2)
    else:
        k, v = apply_rope(key, rope.cos_k[-q_len:], rope.sin_k[-q_len:]), value
    key_pos = plan.key_pos if with_memory else plan.key_pos[-q_len:]
    mask = plan.mask if with_memory or plan.mask is None else plan.mask[:, -q_len:]
    if sliding_window is not None:
        mask = within_window(mask, plan.query_pos, key_pos, sliding_window)
    if mask is None and k.shape[2] > q_len > 1:  # SDPA's is_causal aligns top-left; memory needs bottom-right
        mask = causal_mask(q_len, k.shape[2], q.device)
    local_layer = sliding_window is not None  # entries read by similarity come from beyond any window
    found = plan.retrieve(plan, layer, query[0]) if plan.retrieve is not None and not local_layer else None
    if found is not None:
        out = attend_with_retrieved(q[0], k[0], v[0], mask, scaling, found).unsqueeze(0)
    elif q_len == 1 and _sdpa_slow_for_one_query(q):
        out = attend_one_query(q, k, v, scaling, mask)
    else:
        causal = mask is None and q_len > 1  # one query after its memory sees every key: no mask at all
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling,
                                             enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _sdpa_slow_for_one_query(q: torch.Tensor) -> bool:
    """On CPU, torch's SDPA over one query takes 8-15x (bf16) or 2-4x (fp16) longer than two matmuls; fp32 not."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query per head `q [1, H, 1, D]` over keys `k, v [1, KVH, L, D]` (a generated token), those where
    `mask [1, L]` is True (None: all), as SDPA with GQA computes it. The logits and softmax are fp32, as
    SDPA's kernels keep them: bf16 logits of magnitude 30 would be off by up to 0.1. Returns `[1, H, 1, D]`."""
    heads, dim, kv_heads = q.shape[1], q.shape[3], k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    # the query heads sharing a KV head are rows of one matmul: no K/V repeated per head
    logits = q.reshape(kv_heads, heads // kv_heads, dim).float() @ k[0].transpose(1, 2).float()
    if mask is not None:
        logits.masked_fill_(~mask, float("-inf"))
    weights = torch.softmax(logits.mul_(scale), dim=-1).to(v.dtype)
    return (weights @ v[0]).view(1, heads, 1, dim)


def within_window(mask: torch.Tensor | None, query_pos: torch.Tensor, key_pos: torch.Tensor,
                  window: int) -> torch.Tensor | None:
    """`mask` (None = causal) intersected with a local layer's band: query at position p sees a key at
    position p' only when p - p' < window, as transformers' sliding-window mask has it (memory keys
    included). Unchanged when every key is within the window of every query."""
    q_pos, k_pos = query_pos.to(torch.long), key_pos.to(torch.long)
    if q_pos.numel() == 0 or int(q_pos.max()) - int(k_pos.min()) < window:
        return mask
    base = mask if mask is not None else causal_mask(q_pos.numel(), k_pos.numel(), q_pos.device)
    band = (q_pos[:, None] - k_pos[None, :].to(q_pos.device)) < window
    return base & band.to(base.device)


def attend_with_retrieved(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          scale: float | None, found: Retrieved) -> torch.Tensor:
    """Attention of `q [H, Q, D]` over local `k, v [KVH, L, D]` (mask `[Q, L]`, None = causal) plus per-query
    retrieved entries; one joint softmax, or a gated sum of two. Returns `[H, Q, D]`."""
    heads, q_len, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    if found.gate is not None:
        local = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                               is_causal=mask is None, scale=scale, enable_gqa=True)[0]
        p_mem = torch.softmax(_memory_scores(found, scale), dim=-1)
        mem = torch.einsum("hqk,hqkd->hqd", p_mem, found.values)
        g = found.gate.view(-1, 1, 1).to(q.dtype)
        return g * mem + (1 - g) * local
    kv_heads, k_len = k.shape[0], k.shape[1]
    groups = heads // kv_heads
    if mask is None:
        mask = causal_mask(q_len, k_len, q.device)
    # GQA without copying K/V: the query heads sharing a KV head are stacked along the query axis
    s_loc = (q.reshape(kv_heads, groups * q_len, dim) @ k.transpose(1, 2)).view(heads, q_len, k_len) * scale
    training = torch.is_grad_enabled()  # autograd needs the score buffers kept; inference reuses them in place
    s_loc = s_loc.masked_fill(~mask, float("-inf")) if training else s_loc.masked_fill_(~mask, float("-inf"))
    s_mem = _memory_scores(found, scale)
    top = torch.maximum(s_loc.amax(-1, keepdim=True), s_mem.amax(-1, keepdim=True))
    if training:
        e_loc, e_mem = (s_loc - top).exp(), (s_mem - top).exp()
    else:  # one softmax over both, without a concat
        e_loc, e_mem = s_loc.sub_(top).exp_(), s_mem.sub_(top).exp_()
    denom = e_loc.sum(-1, keepdim=True) + e_mem.sum(-1, keepdim=True)
    local = (e_loc.view(kv_heads, groups * q_len, k_len) @ v).view(heads, q_len, dim)
    return (local + torch.einsum("hqk,hqkd->hqd", e_mem, found.values)) / denom


def _memory_scores(found: Retrieved, scale: float) -> torch.Tensor:
    scores = torch.einsum("hqd,hqkd->hqk", found.query, found.keys) * scale
    return scores if found.valid is None else scores.masked_fill(~found.valid, float("-inf"))


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Bool `[q_len, k_len]`: the queries are the last `q_len` keys, each seeing itself and all before."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def _no_mask(*args, **kwargs) -> None:
    """Mask builder for "longctx": masks come from the ForwardPlan, so transformers builds none."""
    return None


def register() -> str:
    """Register the attention and mask functions under the name "longctx" (idempotent)."""
    AttentionInterface.register(ATTN_NAME, longctx_attention)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    return ATTN_NAME
