"""Attention-level memory injection through transformers' attention-function registry.

The backbone runs with every `position_ids` set to 0, so RoPE is the identity and the attention function
receives *pre-rotation* queries and keys. It then rotates them itself at the positions a method's
`ForwardPlan` assigns. That gives exact pre-rotation keys to store (no re-rotation drift, DESIGN.md §2) and
lets one primitive express every position policy: contiguous, cache-relative, absolute, constant distance.
No modeling code is patched: this is the public `AttentionInterface` seam.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTN_NAME = "longctx"


@dataclass
class ForwardPlan:
    """What one forward of the backbone reads and captures, shared by all layers.

    `memory_keys[layer]` are pre-rotation keys `[kv_heads, m, head_dim]` (or None: no memory at that
    layer), `key_pos` the positions of `[memory; current]` keys, `query_pos` those of the current tokens,
    `mask` a bool `[q, m + q]` (True = may attend) or None for plain causal attention over the current
    tokens. With `capture`, each layer's pre-rotation keys and values of the current tokens are kept in
    `captured` for the method's write step.
    """

    query_pos: torch.Tensor
    key_pos: torch.Tensor
    mask: torch.Tensor | None = None
    memory_keys: list[torch.Tensor | None] | None = None
    memory_values: list[torch.Tensor | None] | None = None
    capture: bool = False
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Filled by the backbone before the forward: RoPE tables in the model dtype, and RoPE's attention
    # scaling, which the zero-position pass has already applied once to q and k.
    cos_q: torch.Tensor | None = None
    sin_q: torch.Tensor | None = None
    cos_k: torch.Tensor | None = None
    sin_k: torch.Tensor | None = None
    rope_scaling: float = 1.0

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
    longctx_plan: ForwardPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over `[memory; current]` with positions from the plan; registered as "longctx"."""
    plan = longctx_plan
    if plan is None:
        raise RuntimeError("the longctx attention function needs a ForwardPlan (longctx_plan=...)")
    layer = module.layer_idx
    if plan.rope_scaling != 1.0:
        query, key = query / plan.rope_scaling, key / plan.rope_scaling
    if plan.capture:
        plan.captured[layer] = (key[0], value[0])
    q = apply_rope(query, plan.cos_q, plan.sin_q)
    mem_k = plan.memory_keys[layer] if plan.memory_keys is not None else None
    if mem_k is not None and mem_k.shape[1] > 0:
        k = torch.cat((mem_k.unsqueeze(0), key), dim=2)
        v = torch.cat((plan.memory_values[layer].unsqueeze(0), value), dim=2)
        cos_k, sin_k, mask = plan.cos_k, plan.sin_k, plan.mask
    else:
        q_len = query.shape[2]
        k, v = key, value
        cos_k, sin_k = plan.cos_k[-q_len:], plan.sin_k[-q_len:]
        mask = plan.mask[:, -q_len:] if plan.mask is not None else None
    k = apply_rope(k, cos_k, sin_k)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """Mask builder for "longctx": masks come from the ForwardPlan, so transformers builds none."""
    return None


def register() -> str:
    """Register the attention and mask functions under the name "longctx" (idempotent)."""
    AttentionInterface.register(ATTN_NAME, longctx_attention)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    return ATTN_NAME
