"""What choosing blocks costs over a huge `infllm` store on disk: the choosing layers' keys read from the page
files every time, or from a copy kept in RAM (`score_keys`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/score_keys.py [--lengths 262144,1048576] [--reps 5]
        [--score-layers 0.58-0.63] [--out benchmarks/results/score_keys.json]

The default model is loaded (its shapes and dtype), but no text is read: the store is filled with random
keys/values in int8 (infllm's default `store_dtype`) on disk (`store: disk`), to each length in turn, and at each
length `InfLLM.recall` (exact scoring over every stored key of the choosing layers, then the chosen blocks read
at every layer) runs --reps times per path, the paths alternating so that machine load hits them alike. Both
paths share one store (the same files); the disk path is that store without its RAM copy. Times are CPU
seconds of this process (one torch thread; user + system, and system alone: the page-file reads are system
calls, and so are the page faults of large fresh buffers), medians. The disk path reads from the kernel's
page cache (the store was just written); from a cold disk it would cost more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import longctx
from longctx.bench.record import run_record
from longctx.methods.infllm import InfLLM, InfLLMOptions
from longctx.methods.knnstore import KNNStore

BATCH = 8192  # entries added at a time while filling


def fill(store: KNNStore, upto: int, gen: torch.Generator) -> None:
    """Add random entries until the store holds `upto`."""
    layers, heads, _, dim = store.keys.shape
    while store.written < upto:
        e = min(BATCH, upto - store.written)
        k, v = (torch.randn(layers, heads, e, dim, generator=gen, dtype=torch.bfloat16) for _ in range(2))
        idx = torch.arange(store.written, store.written + e)
        store.add(k, v, idx, idx, idx)


def cpu_seconds(fn) -> tuple[float, float]:
    """User and system CPU seconds of this process while `fn` runs."""
    t0 = os.times()
    fn()
    t1 = os.times()
    return t1.user - t0.user, t1.system - t0.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="262144,1048576")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--score-layers", default="0.58-0.63")
    ap.add_argument("--out", default="benchmarks/results/score_keys.json")
    args = ap.parse_args()
    lengths = sorted(int(n) for n in args.lengths.split(","))
    backbone = longctx.load_backbone(dtype="bf16", threads=1)
    method = InfLLM(InfLLMOptions(memory=lengths[-1], store="disk", score_layers=args.score_layers,
                                  score_keys="ram"), backbone)
    state = method.init_state()
    store = state.store
    gen = torch.Generator().manual_seed(0)
    heads = int(backbone.config.num_attention_heads)
    queries = torch.randn(backbone.num_layers, heads, method.options.queries, backbone.head_dim, generator=gen,
                          dtype=backbone.dtype)
    rows = []
    for length in lengths:
        t0 = time.process_time()
        fill(store, length, gen)
        fill_s = time.process_time() - t0
        # the disk path: the same store (files, indices, score buffer) without its RAM copy of keys
        paths = {"ram": store, "disk": replace(store, ram_layers=(), ram_keys=None, ram_key_scale=None)}
        chosen = {name: method.recall(s, queries).token_index for name, s in paths.items()}  # warm-up, checked
        assert torch.equal(chosen["ram"], chosen["disk"])
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for _ in range(args.reps):
            for name, s in paths.items():
                times[name].append(cpu_seconds(lambda s=s: method.recall(s, queries)))
        row: dict = {"length": length, "fill_cpu_s": fill_s, "ram_copy_bytes": store.nbytes() - paths["disk"].nbytes()}
        for name, t in times.items():
            row[f"{name}_cpu_s"] = statistics.median(u + s for u, s in t)
            row[f"{name}_sys_s"] = statistics.median(s for _, s in t)
            row[f"{name}_user_sys_s_all"] = t
        row["disk_over_ram"] = row["disk_cpu_s"] / row["ram_cpu_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    record = run_record(backbone, extra={"command": " ".join(["benchmarks/score_keys.py", *sys.argv[1:]])})
    result = {"benchmark": "score_keys", "record": record, "score_layers": method.score_layers,
              "options": asdict(method.options), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
