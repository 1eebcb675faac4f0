"""Throughput and memory of a method over one input: prefill and decode tokens/s, peak memory, FLOPs needed.

Prefill is `decode.ingest` (the path `ask`, `generate` and the retrieval benchmarks take: no logits for the
text), decode is greedy `decode.continue_text` after it. The FLOPs each forward needed come from the plans
the method actually ran (`roofline.forward_flops` with `roofline.attended_keys`), so a roofline ratio can
say how far each method is from what the machine's matmuls could do. Not counted: the forward a `full`
window re-prefills on overflow and the store search of similarity methods (their own overhead, not the
model's).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch

from ..cpus import load_average
from ..errors import InputError
from ..methods.base import Method
from ..model.attention import ForwardPlan
from ..model.backbone import Backbone
from ..resources import peak_gpu_mb, peak_rss_mb, release_memory, reset_peak_rss
from ..tasks.decode import continue_text, ingest, plain_segments
from .roofline import attended_keys, forward_flops, linear_params, roofline_ratio


class _PlanTap:
    """`method` with the plan of its latest read kept, so the FLOPs of the exact forwards `ingest` runs can
    be counted without a second copy of its loop. Everything else is the method itself."""

    def __init__(self, method: Method):
        self._method = method
        self.plan: ForwardPlan | None = None

    def read(self, state: Any, seg: Any) -> tuple[Any, ForwardPlan]:
        state, self.plan = self._method.read(state, seg)
        return state, self.plan

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)


def plan_flops(backbone: Backbone, plan: ForwardPlan) -> float:
    """FLOPs one forward with `plan` needed, without logits (after the forward: retrieval fills the plan)."""
    q = int(plan.query_pos.numel())  # memory-token methods run more rows than the segment has tokens
    keys = attended_keys(plan, q, windows=[backbone.layer_window(i) for i in range(backbone.num_layers)])
    return forward_flops(backbone.config, q, keys, with_logits=False)


def throughput(backbone: Backbone, method: Method, ids: torch.Tensor, *, segment: int, decode_tokens: int = 16,
               machine_flops_per_s: float | None = None) -> dict[str, Any]:
    """Measure `method` over `ids [n]` from a fresh memory: prefill in segments of `segment`, then greedy
    decoding of `decode_tokens` tokens. Peak RSS (and GPU memory) cover both; FLOP/s are compared with
    `machine_flops_per_s` (see `roofline.measure_matmul_flops`) when given."""
    if len(ids) == 0:
        raise InputError("throughput needs at least one token")
    method.check_segment(segment)
    tap, prefill_flops, marks = _PlanTap(method), [0.0], _Marks()

    def count(seg: Any) -> None:  # called after each segment's forward
        assert tap.plan is not None  # the segment's read set it
        prefill_flops[0] += plan_flops(backbone, tap.plan)
        marks.after(len(seg))

    gc.collect()  # what earlier runs left behind must not count as this run's peak
    reset_peak_rss()
    marks.start()
    t0 = time.perf_counter()
    # the tap stands in for the method (a proxy: everything but `read` is forwarded to it)
    done = ingest(backbone, cast(Method, tap), plain_segments(ids, segment), segment=segment, on_segment=count)
    _sync(backbone)
    prefill_s = time.perf_counter() - t0
    row = _prefill_row(method, ids, segment, prefill_s, prefill_flops[0]) | marks.rates()
    row.update(_decode(backbone, method, done, decode_tokens, prefill_s))
    row.update({"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(),
                "load_avg_1m": load_average()})
    row.update(_roofline(row, machine_flops_per_s))
    return row


class _Marks:
    """Wall and CPU clocks after every prefill segment. Two load-robust views of cost at the end of a long
    read: the rate over the last `TAIL` tokens (the cost *at* that length, not averaged from the start), and
    tokens per CPU-second of this process (with one thread, work stolen by other processes is not counted)."""

    TAIL = 8192

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []  # (tokens read, wall s, process CPU s)

    def start(self) -> None:
        self.points = [(0, time.perf_counter(), time.process_time())]

    def after(self, tokens: int) -> None:
        self.points.append((self.points[-1][0] + tokens, time.perf_counter(), time.process_time()))

    def rates(self) -> dict[str, Any]:
        """prefill_cpu_s, prefill_tok_per_cpu_s, and the tail's tokens, tok/s and tok per CPU-s."""
        n, wall, cpu = self.points[-1]
        first = next((p for p in reversed(self.points) if n - p[0] >= self.TAIL), self.points[0])
        tail_n, tail_wall, tail_cpu = n - first[0], wall - first[1], cpu - first[2]
        cpu_s = cpu - self.points[0][2]

        def per(tokens: int, seconds: float) -> float | None:
            return tokens / seconds if seconds > 0 else None

        return {"prefill_cpu_s": cpu_s, "prefill_tok_per_cpu_s": per(n, cpu_s), "tail_tokens": tail_n,
                "tail_tok_s": per(tail_n, tail_wall), "tail_tok_per_cpu_s": per(tail_n, tail_cpu)}


def _prefill_row(method: Method, ids: torch.Tensor, segment: int, seconds: float, flops: float) -> dict[str, Any]:
    n = len(ids)
    return {"method": method.name, "protocol": method.describe(), "segment": segment, "prefill_tokens": n,
            "prefill_s": seconds, "prefill_tok_s": n / seconds if seconds > 0 else None,
            "prefill_flops": flops, "prefill_flops_per_token": flops / n}


def _decode(backbone: Backbone, method: Method, done: Any, tokens: int, prefill_s: float) -> dict[str, Any]:
    """Greedy continuation: tokens/s, time to the first token (prefill included), FLOPs per token, and the
    memory entries held at the end, with the bytes they take in RAM and in a snapshot."""
    flops = [0.0]
    first_plan = done.last_plan  # continue_text shows it first; it belongs to the prefill

    def count(plan: ForwardPlan) -> None:
        if plan is not first_plan:
            flops[0] += plan_flops(backbone, plan)

    result = continue_text(backbone, method, done, tokens, on_plan=count) if tokens > 0 else None
    _sync(backbone)
    state = result.done.state if result is not None else done.state
    out: dict[str, Any] = {"decode_tokens": 0, "decode_s": None, "decode_tok_s": None, "first_token_s": None,
                           "decode_flops_per_token": None, "memory_entries": method.memory_size(state),
                           "memory_ram_bytes": method.memory_bytes(state),
                           "memory_disk_bytes": method.memory_disk_bytes(state),
                           "memory_snapshot_bytes": sum(t.numel() * t.element_size()
                                                        for t in method.state_tensors(state).values())}
    if result is None or not result.tokens:
        return out
    n = len(result.tokens)
    lm_head = 2.0 * linear_params(backbone.config)["lm_head"]  # one row of logits per generated token
    out.update({"decode_tokens": n, "decode_s": result.seconds,
                "decode_tok_s": n / result.seconds if result.seconds > 0 else None,
                "first_token_s": prefill_s + result.first_token_s, "decode_flops_per_token": flops[0] / n + lm_head})
    return out


def _roofline(row: dict[str, Any], machine: float | None) -> dict[str, Any]:
    """Achieved FLOP/s over the machine's, for prefill and decode (None without a machine figure)."""
    def ratio(tok_s: float | None, per_token: float | None) -> float | None:
        if machine is None or tok_s is None or per_token is None:
            return None
        return roofline_ratio(tok_s, per_token, machine)

    return {"machine_flops_per_s": machine,
            "prefill_roofline": ratio(row["prefill_tok_s"], row["prefill_flops_per_token"]),
            "decode_roofline": ratio(row["decode_tok_s"], row["decode_flops_per_token"])}


def _sync(backbone: Backbone) -> None:
    if backbone.device.type == "cuda":
        torch.cuda.synchronize(backbone.device)


def throughput_vs_length(backbone: Backbone, methods: Mapping[str, Method], book_ids: torch.Tensor,
                         lengths: list[int], *, segment: int, decode_tokens: int = 16,
                         machine_flops_per_s: float | None = None, warmup: bool = True,
                         on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every method at every length, on the same prefix of `book_ids`, each from a fresh memory. Methods are
    interleaved within each length so that a drift in machine load hits all of them alike; with `warmup`,
    each method first runs one untimed segment (one-off allocation and kernel selection costs)."""
    too_long = [n for n in lengths if n > len(book_ids) or n < 1]
    if too_long:
        raise InputError(f"lengths {too_long} are not within 1..{len(book_ids)} (the tokens given)")
    if warmup:
        for method in methods.values():
            throughput(backbone, method, book_ids[:segment], segment=segment, decode_tokens=min(decode_tokens, 1))
    rows = []
    for n in lengths:
        for name, method in methods.items():
            row = {"name": name, "length": n, **throughput(backbone, method, book_ids[:n], segment=segment,
                                                           decode_tokens=decode_tokens,
                                                           machine_flops_per_s=machine_flops_per_s)}
            rows.append(row)
            release_memory()  # the next method's peak RSS must not include this one's freed heap
            if on_row is not None:
                on_row(row)
    return rows
