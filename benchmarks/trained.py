"""Trained memories on the held-out novel: PPL of the trained methods (with their adapters) vs xl and window on
the same tokens in one process, recall accuracy on the synthetic task at 2-16 segments, training throughput,
and (with --throughput-lengths) prefill tokens/s and peak RSS vs document length.

    .venv/bin/python benchmarks/trained.py --heldout ../shared/data/austen_persuasion.txt \
        --ppl-tokens 32768 --recall-samples 10 -o benchmarks/results/trained.json
    .venv/bin/python benchmarks/trained.py --heldout ../shared/data/austen_persuasion.txt \
        --ppl-methods xl,uio,memoryllm,mplus --recall-methods '' --throughput-lengths 2048,8192,32768 \
        --adapters uio=smollm2-uio,memoryllm=smollm2-memoryllm,mplus=smollm2-mplus -o benchmarks/results/compressive.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import longctx
from longctx.bench.throughput import throughput_vs_length
from longctx.run import build_method, environment
from longctx.storage.adapters import find_adapter
from longctx.tasks.recall import recall_accuracy, recall_task_for
from longctx.tasks.samples import TokenCorpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--ppl-methods", default="window,xl,rmt,hmt")
    ap.add_argument("--recall-methods", default="window,xl,rmt,hmt")
    ap.add_argument("--adapters", default="rmt=smollm2-rmt,hmt=smollm2-hmt", help="method=adapter pairs")
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--recall-segments", default="2,4,8,16")
    ap.add_argument("--recall-samples", type=int, default=10)
    ap.add_argument("--throughput-lengths", default="", help="comma-separated lengths; empty = skip")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    backbone = longctx.load_backbone(threads=a.threads)
    adapters = dict(pair.split("=") for pair in a.adapters.split(",") if pair)
    out = {"command": " ".join(["python", *sys.argv]), "git": _git(), "model": dict(backbone.fingerprint),
           "environment": environment(), "segment": a.segment, "heldout": a.heldout,
           "adapters": {m: _adapter_summary(n) for m, n in adapters.items()}}
    t0 = time.perf_counter()
    report = longctx.perplexity(a.heldout, a.ppl_methods.split(","), backbone=backbone, segment=a.segment,
                                max_tokens=a.ppl_tokens)
    out["ppl"] = report.to_dict()
    out["ppl_seconds"] = time.perf_counter() - t0
    _save(a.out, out)
    filler = TokenCorpus.from_files([a.heldout], backbone.tokenizer).docs[0]
    task = recall_task_for(backbone.tokenizer, filler)
    out["recall"] = {"keys": len(task.keys), "samples": a.recall_samples, "cells": []}
    for name in filter(None, a.recall_methods.split(",")):
        method, _ = build_method(name, backbone)
        for n in (int(x) for x in a.recall_segments.split(",")):
            t = time.perf_counter()
            cell = recall_accuracy(backbone, method, task, segments=n, segment=a.segment, samples=a.recall_samples)
            cell.update(protocol=method.describe(), seconds=time.perf_counter() - t)
            out["recall"]["cells"].append(cell)
            print(f"recall {name} {n} segments: {cell['correct']}/{cell['samples']}", file=sys.stderr)
            _save(a.out, out)
    if a.throughput_lengths:
        out["throughput"] = _throughput(backbone, a, filler)
        _save(a.out, out)
    out["environment_end"] = environment()
    _save(a.out, out)


def _throughput(backbone, a: argparse.Namespace, ids: torch.Tensor) -> list[dict]:
    """Prefill tok/s and peak RSS of each PPL method vs length, interleaved per length (bench/throughput.py)."""
    methods = {name: build_method(name, backbone)[0] for name in a.ppl_methods.split(",")}
    lengths = [int(x) for x in a.throughput_lengths.split(",")]
    return throughput_vs_length(backbone, methods, ids, lengths, segment=a.segment, decode_tokens=4,
                                on_row=lambda r: print(f"throughput {r['name']} {r['length']}: {r}", file=sys.stderr))


def _adapter_summary(name: str) -> dict:
    man = find_adapter(name, tensors=False).manifest
    tr = man["training"]
    return {"name": name, "tune": man["tune"], "steps": tr["steps"], "tokens": tr["tokens"], "seconds": tr["seconds"],
            "tokens_per_s": tr["tokens_per_s"], "validation_ppl": tr["validation_ppl"], "command": tr["command"],
            "data": [Path(f["path"]).name for f in tr["data"]], "device": tr["device"],
            "threads": tr["environment"]["threads"], "load_avg_1m": tr["environment"]["load_avg_1m"]}


def _git() -> str | None:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def _save(path: str, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
