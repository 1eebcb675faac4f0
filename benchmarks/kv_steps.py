"""What one write step of a bounded K/V memory costs: the room (in place) against concatenate-then-select.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_steps.py [--steps 200] [--out benchmarks/results/kv_steps.json]

No model runs: the keys and values are random tensors of the default model's shapes (30 layers, 3 KV heads,
head_dim 64, bf16), so only the memory management is timed, not the forward. Each case appends a segment
(512 tokens, or 1 token as in generation) to a window of `xl`'s default size (4 sinks + 2,048 tokens) and
evicts the oldest, --steps times after a warm-up that fills the window; the two paths alternate step by
step so that machine load hits them alike. The old path is the code the room replaced: torch.cat of the
whole window with the new entries, then an index select of what stays.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from longctx.methods.kvstate import KVState
from longctx.run import environment

LAYERS, KV_HEADS, HEAD_DIM, SINKS, WINDOW = 30, 3, 64, 4, 2048


def entries(first: int, n: int) -> tuple[torch.Tensor, ...]:
    kv = torch.randn(LAYERS, KV_HEADS, n, HEAD_DIM, dtype=torch.bfloat16)
    idx = torch.arange(first, first + n)
    return kv, kv.clone(), idx, idx.clone(), idx.clone()


def old_step(state: KVState, new: tuple[torch.Tensor, ...]) -> KVState:
    """The replaced path: concatenate everything, then select sinks + the newest WINDOW."""
    names = ("keys", "values", "token_index", "token_ids", "byte_start")
    held = state.tensors()
    grown = KVState.from_tensors({k: torch.cat((held[k], t), dim=2 if t.dim() == 4 else 0) for k, t in zip(names, new)})
    keep, _ = grown.fifo_split(SINKS, WINDOW)
    return grown.select(keep) if len(keep) < len(grown) else grown


def run(segment: int, steps: int) -> dict[str, float]:
    fresh = KVState.empty(LAYERS, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=torch.device("cpu"))
    room, old, first = fresh, fresh, 0
    while first < SINKS + WINDOW + segment:  # warm-up: both windows full
        new = entries(first, segment)
        room, old, first = room.append(*new).fifo(SINKS, WINDOW), old_step(old, new), first + segment
    times: dict[str, list[float]] = {"room": [], "concat_select": []}
    for _ in range(steps):
        new = entries(first, segment)
        t0 = time.perf_counter()
        room = room.append(*new).fifo(SINKS, WINDOW)
        t1 = time.perf_counter()
        old = old_step(old, new)
        t2 = time.perf_counter()
        times["room"].append(t1 - t0)
        times["concat_select"].append(t2 - t1)
        first += segment
    assert torch.equal(room.keys, old.keys) and torch.equal(room.token_index, old.token_index)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"segment": segment, "steps": steps, "room_median_ms": 1e3 * med["room"],
            "concat_select_median_ms": 1e3 * med["concat_select"], "speedup": med["concat_select"] / med["room"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/kv_steps.json")
    args = ap.parse_args()
    load0 = os.getloadavg()
    rows = [run(segment, args.steps) for segment in (512, 1)]
    for r in rows:
        print(json.dumps(r), flush=True)
    result = {"benchmark": "kv_steps", "command": " ".join(["benchmarks/kv_steps.py", *sys.argv[1:]]),
              "model": {"model": "smollm2-135m (its K/V shapes only; no weights loaded)", "dtype": "bfloat16"},
              "shapes": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "sinks": SINKS, "window": WINDOW},
              "environment": environment(), "load_avg_start": load0, "load_avg_end": os.getloadavg(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
