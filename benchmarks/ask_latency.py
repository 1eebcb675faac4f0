"""Time to the first answer token of `longctx ask`, first reading vs reused memory (issue 7).

For each method, the same command runs twice as a fresh process on the same document: the first reads
the document into memory and stores it, the second loads that memory. Both record the process's wall
time until the first answer token appeared on stdout, the library's own `first_token_s` (from the
`ask()` call: model and memory loading included, Python and library imports not), and the reading speed.

    .venv/bin/python benchmarks/ask_latency.py BOOK.txt [--tokens 32768] [--methods memorizing-fast,xl,rag]
        [--threads 2] [--out benchmarks/results/ask_latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from longctx.bench.record import run_record
from longctx.model.models import load_backbone

QUESTION = "Who is the story about?"


def excerpt(book: str, tokens: int, tokenizer, out: Path) -> Path:
    """The first `tokens` tokens of the book as a text file."""
    text = Path(book).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    out.write_text(tokenizer.decode(ids), encoding="utf-8")
    return out


def timed_ask(doc: Path, method: str, threads: int) -> dict:
    """One `longctx ask` process: wall time to the first stdout byte and to exit; the library's own
    first-token time and memory line, from its stderr."""
    cmd = [sys.executable, "-m", "longctx", "ask", str(doc), QUESTION, "--method", method, "--threads", str(threads),
           "--max-new-tokens", "16"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    first_s = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.decode()[-400:]}")
    log = err.decode()
    library = re.search(r"first answer token ([0-9.]+) s", log)
    memory = re.search(r"^memory: .*$", log, re.M)
    return {"process_first_output_s": first_s, "process_seconds": time.perf_counter() - t0,
            "first_token_s": float(library.group(1)) if library else None,
            "memory_line": memory.group(0) if memory else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("book")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--methods", default="memorizing-fast,xl,rag")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/ask_latency.json")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="longctx-latency-")  # a fresh store: the first run must read
    os.environ["LONGCTX_HOME"] = home
    backbone = load_backbone(None, dtype="auto", threads=args.threads)
    doc = excerpt(args.book, args.tokens, backbone.tokenizer, Path(home) / "doc.txt")
    rows = []
    for method in args.methods.split(","):
        first, again = timed_ask(doc, method, args.threads), timed_ask(doc, method, args.threads)
        rows.append({"method": method, "first": first, "reused": again})
        print(f"{method}: first reading {first['process_first_output_s']:.1f} s to first output "
              f"(library {first['first_token_s']:.2f} s); reused {again['process_first_output_s']:.1f} s "
              f"(library {again['first_token_s']:.2f} s)", flush=True)
    result = {"benchmark": "ask_latency", "book": args.book, "tokens": args.tokens, "question": QUESTION,
              "rows": rows, "record": run_record(backbone)}
    Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
