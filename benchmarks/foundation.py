"""Foundation benchmark (issue 2): quality, flat cost and streaming overhead of the K/V baselines.

All methods run in one process on the same tokens of one book, with the default model.

    .venv/bin/python benchmarks/foundation.py BOOK.txt [--tokens 32768] [--long 65536] [--threads 2]
        [--dtype auto] [--out benchmarks/results/foundation.json]

Parts:
  quality   window, sinks, xl, full over the first --tokens tokens (segment 512): PPL, PPL by position,
            paired deltas; sinks/xl PPL over 16k-32k vs 0-8k.
  cost      sinks, xl, full over the first 8192 and the first --long tokens: tok/s and peak RSS.
  overhead  xl vs a bare transformers forward (SDPA + DynamicCache) over the same segments with the same
            attention span (sinks + memory + segment), alternating, best of --reps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import longctx
from longctx.model.backbone import Backbone
from longctx.run import build_method, environment
from longctx.text.textio import open_source
from longctx.text.tokens import iter_tokens


def quality(backbone: Backbone, book: str, tokens: int) -> dict:
    report = longctx.perplexity(book, ["window", "sinks", "xl", "full"], backbone=backbone, segment=512,
                                max_tokens=tokens)
    out = report.to_dict()
    spans = {}
    for run in report.runs:
        s = run.result.sums
        spans[run.method] = {"0-8k": s.span_ppl(0, 8192), "8k-16k": s.span_ppl(8192, 16384),
                             "16k-32k": s.span_ppl(16384, 32768)}
    return {"report": out, "spans": spans}


def cost(backbone: Backbone, book: str, lengths: list[int], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        for n in lengths:
            run = longctx.perplexity(book, [method], backbone=backbone, segment=512, max_tokens=n).runs[0].to_dict()
            rows.append({"method": method, "tokens": n, "tokens_per_s": run["tokens_per_s"],
                         "peak_rss_mb": run["peak_rss_mb"], "ppl": run["ppl"], "seconds": run["seconds"]})
            print(f"  cost {method:6s} {n:6d} tok: {run['tokens_per_s']:.0f} tok/s, RSS {run['peak_rss_mb']:.0f} MiB",
                  flush=True)
    return rows


def _ids(backbone: Backbone, book: str, n: int) -> torch.Tensor:
    ids: list[int] = []
    with open_source(book) as src:
        for chunk in iter_tokens(backbone.tokenizer, src.blocks()):
            ids.extend(chunk.ids.tolist())
            if len(ids) >= n:
                break
    return torch.tensor(ids[:n])


def bare_hf(backbone: Backbone, ids: torch.Tensor, span: int, segment: int) -> float:
    """tok/s of plain transformers (SDPA) scoring segments over a cache of `span` earlier tokens."""
    model = backbone.model
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(ids[:span].view(1, -1), past_key_values=cache, use_cache=True)
            t0 = time.perf_counter()
            for s in range(span, len(ids) - segment, segment):
                seg = ids[s:s + segment].view(1, -1)
                out = model.model(seg, past_key_values=cache, use_cache=True)
                logits = model.lm_head(out.last_hidden_state[0]).float()
                F.cross_entropy(logits[:-1], ids[s + 1:s + segment])
                cache.crop(-segment)  # drop this segment again: a constant span, like a full memory
            n = len(range(span, len(ids) - segment, segment)) * segment
            return n / (time.perf_counter() - t0)
    finally:
        model.set_attn_implementation("longctx")


def xl_rate(backbone: Backbone, ids: torch.Tensor, memory: int, sinks: int, segment: int, skip: int) -> float:
    """tok/s of `xl` over the segments after its memory is full (the first `skip` tokens untimed)."""
    from longctx.stream import run_stream
    from longctx.text.segments import iter_segments
    from longctx.text.tokens import TokenChunk

    chunk = TokenChunk(ids=ids.numpy(), byte_starts=torch.arange(len(ids)).numpy(), byte_end=len(ids), words=0)  # bytes unused
    method, _ = build_method("xl", backbone, {"memory": memory, "sinks": sinks})
    segs = list(iter_segments([chunk], segment))
    warm = run_stream(backbone, method, segs[: skip // segment])
    t0 = time.perf_counter()
    run_stream(backbone, method, segs[skip // segment:], state=warm.state)
    return (len(ids) - skip) / (time.perf_counter() - t0)


def overhead(backbone: Backbone, book: str, reps: int) -> dict:
    memory, sinks, segment = 2048, 4, 512
    ids = _ids(backbone, book, 8192 + 1)
    span = memory + sinks
    xl, bare = [], []
    for _ in range(reps):  # alternate so drifting machine load hits both alike
        xl.append(xl_rate(backbone, ids, memory, sinks, segment, skip=3072))  # memory full after 2048
        bare.append(bare_hf(backbone, ids, span, segment))
        print(f"  overhead rep: xl {xl[-1]:.0f} tok/s, bare HF {bare[-1]:.0f} tok/s", flush=True)
    return {"xl_tok_s": xl, "bare_tok_s": bare, "ratio_best": max(xl) / max(bare), "span": span, "segment": segment}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("book")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--long", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parts", default="quality,cost,overhead")
    ap.add_argument("--out", default="benchmarks/results/foundation.json")
    args = ap.parse_args()
    backbone = longctx.load_backbone(dtype=args.dtype, threads=args.threads)
    parts = args.parts.split(",")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"command": " ".join(["benchmarks/foundation.py", *sys.argv[1:]]), "commit": commit,
              "model": backbone.fingerprint, "environment_start": environment()}
    if "quality" in parts:
        result["quality"] = quality(backbone, args.book, args.tokens)
        print(json.dumps(result["quality"]["spans"], indent=1), flush=True)
    if "cost" in parts:
        result["cost"] = cost(backbone, args.book, [8192, args.long], ["sinks", "xl", "full"])
    if "overhead" in parts:
        result["overhead"] = overhead(backbone, args.book, args.reps)
    result["environment_end"] = environment()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
