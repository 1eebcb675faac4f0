"""How far a run is from the machine's physical limit: the FLOPs a forward needs vs the matmul FLOP/s measured.

The FLOP model is the usual one for decoder-only transformers: 2 FLOPs (a multiply and an add) per weight
per token for every linear layer a token passes through, plus attention, which costs 2 x 2 x heads x head_dim
per (query, attended key) pair (QK^T and AV); a local (sliding-window) layer attends only the keys
within its window. Norms, RoPE, activations, softmax and bias adds are left out:
they are a few percent at most. For SmolLM2-135M this gives 0.269 GFLOP per token with logits, plus
69,120 FLOPs per attended key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..model.attention import ForwardPlan, within_window
from ..model.models import parse_dtype

WARMUP_SHARE = 0.2  # of the time budget spent warming up (allocator, oneDNN kernel selection, GPU clocks)
REPEATS = 3  # timed repeats; the best one counts (the others lost time to something else on the machine)


def measure_matmul_flops(dtype: torch.dtype | str, device: torch.device | str = "cpu", *, size: int = 1024,
                         seconds: float = 1.0, threads: int | None = None) -> dict[str, Any]:
    """The machine's achievable dense matmul throughput for `dtype`: square `size` matmuls, best of a few
    timed repeats after a warm-up, 2*size^3 FLOP each. `threads` sets torch's CPU threads for the
    measurement only. Takes about `seconds` in all (more if one matmul is slower than that)."""
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        out = torch.empty(size, size, device=device, dtype=dtype)
        per_matmul = _time_matmuls(a, b, out, 1)  # first call: also the warm-up's start
        warm = max(1, int(WARMUP_SHARE * seconds / max(per_matmul, 1e-9)))
        per_matmul = _time_matmuls(a, b, out, warm) / warm
        n = max(1, int((1 - WARMUP_SHARE) * seconds / REPEATS / max(per_matmul, 1e-9)))
        best = min(_time_matmuls(a, b, out, n) for _ in range(REPEATS)) / n
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    return {"flops_per_s": 2 * size**3 / best, "size": size, "dtype": str(dtype).removeprefix("torch."),
            "device": str(device), "repeats": REPEATS, "matmuls_per_repeat": n, "threads": used}


def _time_matmuls(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, n: int) -> float:
    """Seconds for `n` matmuls into `out` (synchronised on CUDA, where kernels run asynchronously)."""
    _sync(a.device)
    t0 = time.perf_counter()
    for _ in range(n):
        torch.matmul(a, b, out=out)
    _sync(a.device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def linear_params(config) -> dict[str, int]:
    """Weights of the linear layers every token passes through, from a Llama-family HF config:
    `layers` (all decoder layers' attention and MLP projections) and `lm_head` (only used where logits are
    computed). Embedding lookups and norms are not matmuls and are excluded."""
    hidden, inter = int(config.hidden_size), int(config.intermediate_size)
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * hidden * inter  # gate, up, down
    return {"layers": int(config.num_hidden_layers) * (attn + mlp), "lm_head": hidden * int(config.vocab_size)}


def attention_flops_per_key(config) -> float:
    """FLOPs per (query, attended key) pair over all layers: QK^T and AV, a multiply-add each per dimension."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2.0 * 2.0 * heads * head_dim * int(config.num_hidden_layers)


def forward_flops(config, tokens: int, attended_keys: float, *, with_logits: bool = True) -> float:
    """FLOPs one forward of `tokens` query tokens needs, each attending `attended_keys` keys on average
    (per layer): 2 x linear weights x tokens (the lm_head only `with_logits`) + attention."""
    params = linear_params(config)
    weights = params["layers"] + (params["lm_head"] if with_logits else 0)
    return 2.0 * weights * tokens + attention_flops_per_key(config) * tokens * attended_keys


def attended_keys(plan: ForwardPlan, q_len: int, *, num_layers: int | None = None,
                  windows: Sequence[int | None] | None = None) -> float:
    """Mean number of keys each query of one forward attends, averaged over layers: its own segment (causal),
    the memory keys of the layers that have them, and the entries similarity reading retrieved.

    Local keys are counted as the attention function masks them: bottom-right causal, or the plan's mask
    exactly (a band or dilation sees fewer keys), and at a local layer (`windows[layer]`, the sliding window
    the model passes it; None = a global layer) only the keys within its window of each query. Retrieved
    entries count in full, so padding a method marks invalid makes the figure an upper bound. `num_layers`
    defaults to the length of `windows`, else of `plan.memory_keys`; it is needed when only retrieval says
    which layers there are.
    """
    memory = plan.memory_keys
    layers = num_layers if num_layers is not None else len(windows) if windows is not None else (
        len(memory) if memory is not None else None)
    if layers is None:
        if plan.out.retrieved:
            raise ValueError("attended_keys needs num_layers when the plan has retrieval but no memory keys")
        layers = 1
    counted: dict[tuple[bool, int | None], float] = {}  # layers of one kind see the same keys
    local = 0.0
    for layer in range(layers):
        kind = (_has_memory(plan, layer), windows[layer] if windows is not None else None)
        if kind not in counted:
            counted[kind] = _local_keys(plan, q_len, *kind)
        local += counted[kind]
    retrieved = sum(int(r.shape[-1]) for r in plan.out.retrieved.values()) / layers
    return local / layers + retrieved


def _has_memory(plan: ForwardPlan, layer: int) -> bool:
    memory = plan.memory_keys
    k = memory[layer] if memory is not None and layer < len(memory) else None
    return k is not None and k.shape[1] > 0


def _local_keys(plan: ForwardPlan, q_len: int, with_memory: bool, window: int | None) -> float:
    """Mean keys per query at one layer: [memory; segment] with memory, else the segment only, masked as the
    attention function masks them (bottom-right causal unless the plan brings a mask; a local layer's band)."""
    key_pos = plan.key_pos if with_memory else plan.key_pos[-q_len:]
    mask = plan.mask if plan.mask is None or with_memory else plan.mask[:, -q_len:]
    if window is not None:
        mask = within_window(mask, plan.query_pos, key_pos, window)
    if mask is None:  # causal over the segment, after every memory key
        return (len(key_pos) - q_len) + (q_len + 1) / 2
    return float(mask.sum()) / q_len


def roofline_ratio(achieved_tokens_per_s: float, flops_per_token: float, machine_flops_per_s: float) -> float:
    """Achieved FLOP/s (tokens/s x FLOPs each token needed) over the machine's measured matmul FLOP/s."""
    if machine_flops_per_s <= 0 or not math.isfinite(machine_flops_per_s):
        raise ValueError(f"machine FLOP/s must be positive and finite (got {machine_flops_per_s})")
    return achieved_tokens_per_s * flops_per_token / machine_flops_per_s
