"""Retrieval-memory cost benchmark (issue 4): tokens/s of `memorizing` with a full store vs `xl`, and RSS.

    .venv/bin/python benchmarks/retrieval.py BOOK.txt [--fill 67584] [--measure 4096] [--threads 2]
        [--out benchmarks/results/retrieval_cost.json]

Protocol. Each method's memory is first filled from the book's first --fill tokens through the method's
own `write` (so the store holds --fill - sinks - window real entries of real text), with keys and values
captured by a memory-less forward: this makes filling cost the same as `window` instead of hours, and does
not change the cost of what is timed. Then the next --measure tokens are timed through read -> forward ->
write, segment 512, methods alternating segment by segment so that machine load hits them alike; the
figure per method is the median segment time. A synthetic part times one exact and one blocks search at
one layer over a 10^6-entry bf16 store (random keys: only the cost is measured) and states its RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from longctx.methods.knnstore import KNNStore
from longctx.model.attention import ForwardPlan
from longctx.model.models import load_backbone
from longctx.resources import peak_rss_mb
from longctx.run import build_method, environment
from longctx.tasks.decode import plain_segments
from longctx.text.textio import open_source
from longctx.text.tokens import iter_tokens

VARIANTS = {
    "xl": ("xl", {}),
    "memorizing (exact, upper half)": ("memorizing", {}),
    "memorizing (blocks, upper half)": ("memorizing", {"index": "blocks"}),
    "memorizing (exact, top quarter)": ("memorizing", {"layers": "0.75-1"}),
    "memorizing (blocks, top quarter)": ("memorizing", {"index": "blocks", "layers": "0.75-1"}),
    "infllm": ("infllm", {}),
    "infllm (representative)": ("infllm", {"scoring": "representative"}),
}


def book_ids(backbone, path: str, n: int) -> torch.Tensor:
    parts, have = [], 0
    with open_source(path) as src:
        for chunk in iter_tokens(backbone.tokenizer, src.blocks()):
            parts.append(torch.from_numpy(chunk.ids))
            have += len(chunk.ids)
            if have >= n:
                break
    return torch.cat(parts)[:n]


def fill(backbone, methods: dict, ids: torch.Tensor, segment: int) -> dict:
    """Each method's memory after `ids`, written by its own `write` from one memory-less forward's K/V."""
    states = {name: m.init_state() for name, m in methods.items()}
    with torch.inference_mode():
        for seg in plain_segments(ids, segment):
            pos = torch.arange(len(seg))
            plan = ForwardPlan(query_pos=pos, key_pos=pos, capture=True)
            backbone.forward(seg.ids, plan)
            for name, m in methods.items():
                states[name] = m.write(states[name], seg, plan)
    return states


def measure(backbone, methods: dict, states: dict, ids: torch.Tensor, start: int, segment: int) -> dict:
    times = {name: [] for name in methods}
    with torch.inference_mode():
        for seg in plain_segments(ids, segment, start=start):
            for name, m in methods.items():
                t0 = time.perf_counter()
                states[name], plan = m.read(states[name], seg)
                backbone.forward(seg.ids, plan)
                states[name] = m.write(states[name], seg, plan)
                times[name].append(time.perf_counter() - t0)
    return {name: {"median_segment_s": statistics.median(t), "tokens_per_s": segment / statistics.median(t),
                   "segments": len(t)} for name, t in times.items()}


def synthetic_million(threads: int) -> dict:
    """One layer's 10^6-entry bf16 store (random keys): RSS and one search of a 512-token segment."""
    kv_heads, dim, n = 3, 64, 1_000_000
    before = peak_rss_mb()
    store = KNNStore.empty(n, 1, kv_heads, dim, dtype=torch.bfloat16, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for s in range(0, n, 65536):
        e = min(65536, n - s)
        idx = torch.arange(s, s + e)
        store.add(torch.randn(1, kv_heads, e, dim, generator=g), torch.randn(1, kv_heads, e, dim, generator=g),
                  idx, idx, idx)
    q = torch.randn(kv_heads, 3 * 512, dim, generator=g)
    out = {"entries": n, "store_mib": store.nbytes() / 2**20, "rss_growth_mib": peak_rss_mb() - before}
    for name, fn in (("exact", lambda: store.search(0, q, 32, 8192)),
                     ("blocks", lambda: store.search_blocks(0, q, 32, block=64, probes=4, candidates=64, voters=q))):
        fn()
        t0 = time.perf_counter()
        fn()
        out[f"{name}_search_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("book")
    ap.add_argument("--fill", type=int, default=67584)
    ap.add_argument("--measure", type=int, default=4096)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--variant", action="append", choices=list(VARIANTS),
                    help="a name from VARIANTS (repeatable, xl first); default: all")
    ap.add_argument("--skip-million", action="store_true", help="skip the synthetic 10^6-entry search")
    ap.add_argument("--out", default="benchmarks/results/retrieval_cost.json")
    args = ap.parse_args()
    backbone = load_backbone(None, dtype=args.dtype, threads=args.threads)
    ids = book_ids(backbone, args.book, args.fill + args.measure)
    chosen = {name: VARIANTS[name] for name in args.variant or VARIANTS}
    methods = {name: build_method(method, backbone, opts)[0] for name, (method, opts) in chosen.items()}
    states = fill(backbone, methods, ids[: args.fill], args.segment)
    print(f"filled: RSS {peak_rss_mb():.0f} MiB, entries {[m.memory_size(states[n]) for n, m in methods.items()]}",
          flush=True)
    timed = measure(backbone, methods, states, ids[args.fill :], args.fill, args.segment)
    for name, row in timed.items():
        row["vs_xl"] = row["tokens_per_s"] / timed["xl"]["tokens_per_s"]
        row["protocol"] = methods[name].describe()
        store = getattr(states[name], "store", None)
        row["store_entries"] = len(store) if store is not None else 0
        row["store_mib"] = store.nbytes() / 2**20 if store is not None else 0.0
        print(f"{name:34s} {row['tokens_per_s']:6.0f} tok/s  x{row['vs_xl']:.2f} of xl  store {row['store_mib']:.0f} MiB",
              flush=True)
    result = {"fill_tokens": args.fill, "measure_tokens": args.measure, "segment": args.segment,
              "peak_rss_mib_all_variants": peak_rss_mb(), "timed": timed,
              "million": None if args.skip_million else synthetic_million(args.threads), "model": backbone.fingerprint, "environment": environment()}
    if result["million"]:
        print(json.dumps(result["million"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
