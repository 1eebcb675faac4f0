"""Snapshot benchmark (issue 3): size and save/load time of `xl` after --long tokens; resume exactness.

    .venv/bin/python benchmarks/snapshots.py BOOK.txt [--long 65536] [--tokens 32768] [--stops 13,31,50]

Resume exactness: one uninterrupted `xl` run over --tokens tokens, then for each stop point a run stopped
after that many segments (saved) and resumed; the final NLL sums must be equal to the bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import longctx
from longctx.interrupts import stop_after
from longctx.run import environment
from longctx.storage.checkpoint import Interrupted
from longctx.storage.snapshot import SnapshotStore


def size_and_timing(backbone, book: str, tokens: int) -> dict:
    """Run xl over `tokens` tokens saving its memory, then time one more save and a verified load of it."""
    store = SnapshotStore()
    run = longctx.perplexity(book, ["xl"], backbone=backbone, max_tokens=tokens, save_memory="bench-xl").runs[0]
    snap = store.load("bench-xl")
    t0 = time.perf_counter()
    store.save("bench-xl-copy", snap.tensors, {k: v for k, v in snap.manifest.items() if k != "files"})
    save_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    store.load("bench-xl-copy")  # checks size + sha256, then reads the tensors
    load_s = time.perf_counter() - t1
    size = sum(p.stat().st_size for p in store.version_dir("bench-xl").iterdir())
    return {"tokens": tokens, "snapshot_bytes": size, "save_s": save_s, "load_verify_s": load_s,
            "memory_entries": snap.manifest["memory"]["entries"], "ppl": run.to_dict()["ppl"]}


def exactness(backbone, book: str, tokens: int, stops: list[int]) -> dict:
    whole = longctx.perplexity(book, ["xl"], backbone=backbone, max_tokens=tokens).runs[0].result.sums
    rows = []
    for k in stops:
        name = f"bench-stop-{k}"
        try:
            longctx.perplexity(book, ["xl"], backbone=backbone, max_tokens=tokens, save_memory=name,
                               stop=stop_after(k))
        except Interrupted:
            pass
        resumed = longctx.perplexity(book, backbone=backbone, resume=name).runs[0].result.sums
        rows.append({"stopped_after_segments": k, "nll_sum_whole": whole.nll, "nll_sum_resumed": resumed.nll,
                     "tokens_whole": whole.tokens, "tokens_resumed": resumed.tokens,
                     "bit_identical": whole.nll == resumed.nll and whole.block_nll == resumed.block_nll})
        print(f"  stop after {k} segments: bit-identical = {rows[-1]['bit_identical']}", flush=True)
    return {"tokens": tokens, "runs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("book")
    ap.add_argument("--long", type=int, default=65536)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--stops", default="13,31,50")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/snapshots.json")
    args = ap.parse_args()
    os.environ.setdefault("LONGCTX_HOME", tempfile.mkdtemp(prefix="longctx-bench-"))
    backbone = longctx.load_backbone(threads=args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"command": " ".join(["benchmarks/snapshots.py", *sys.argv[1:]]), "commit": commit,
              "model": backbone.fingerprint, "environment": environment(),
              "size_and_timing": size_and_timing(backbone, args.book, args.long)}
    print(json.dumps(result["size_and_timing"], indent=1), flush=True)
    result["exactness"] = exactness(backbone, args.book, args.tokens, [int(s) for s in args.stops.split(",")])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
