"""Generating into a pending segment: `rmt`/`hmt` continuing from kept keys/values against re-reading it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pending_decode.py books/austen_persuasion.txt \
        [--pending 64,448] [--tokens 16] [--out benchmarks/results/pending_decode.json]

Memory-token methods write memory once per segment, so the tokens generated after a document's last full
segment form a pending segment. Each row reads the preset (with its trained adapter), ingests 4 segments
plus `pending` tokens of the book, and generates `tokens` tokens greedily twice: continuing from the
pending segment's keys/values (one token per forward) and re-reading the whole pending segment per token
(the method's `pending_cacheable` switched off on that instance). CPU seconds of the process (one torch
thread), so other load on the machine moves them little; `xl` generating after the same text is the
key/value method's reference.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import longctx
from longctx.bench.record import run_record
from longctx.run import build_method
from longctx.tasks.decode import continue_text, fork, ingest, plain_segments

SEGMENT = 512


def timed(backbone, method, done, tokens: int) -> tuple[float, list[int]]:
    """CPU seconds per generated token, and the tokens."""
    t0 = time.process_time()
    out = continue_text(backbone, method, fork(method, done), tokens)
    return (time.process_time() - t0) / tokens, out.tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text")
    ap.add_argument("--pending", default="64,448")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/pending_decode.json")
    args = ap.parse_args()
    backbone = longctx.load_backbone(dtype="bf16", threads=1)
    ids = torch.tensor(backbone.tokenizer.encode(Path(args.text).read_text(encoding="utf-8")[:200_000],
                                                 add_special_tokens=False))
    rows = []
    for pending in (int(p) for p in args.pending.split(",")):
        text = ids[: 4 * SEGMENT + pending]
        for name in ("rmt", "hmt", "xl"):
            method, _ = build_method(name, backbone)
            done = ingest(backbone, method, plain_segments(text, SEGMENT))
            cached_s, cached = timed(backbone, method, done, args.tokens)
            row = {"method": name, "protocol": method.describe(), "pending": pending, "s_per_token": cached_s}
            if method.writes_per_segment:
                method.pending_cacheable = lambda: False  # type: ignore[method-assign]  # this instance re-reads
                reread_s, reread = timed(backbone, method, replace(done, pending_kv=None), args.tokens)
                row.update({"reread_s_per_token": reread_s, "speedup": reread_s / cached_s,
                            "same_tokens": sum(a == b for a, b in zip(cached, reread, strict=True))})
            print(row, flush=True)
            rows.append(row)
    record = run_record(backbone)
    result = {"benchmark": "pending_decode", "record": record, "segment": SEGMENT, "tokens": args.tokens,
              "text": args.text, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
