"""Cost of reading one very long text: prefill tokens/s and peak RSS at growing lengths, one process per run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py [--methods window,sinks,xl,infllm,infllm:store_dtype=int8]
        [--lengths 8192,65536,262144,1048576] [--segment 512] [--dtype bf16] [--threads 1]
        [--data /work/shared/data] [--decode 8] [--baseline ../main] [--out benchmarks/results/scale.json]
    .venv/bin/python benchmarks/scale.py --plot DIR RESULT.json [RESULT.json ...]   # needs matplotlib ('.[plot]')

The text is the public-domain novels under --data (every *.txt, sorted by name), joined and repeated until it
holds the longest length asked for; it is built and tokenized at run time (never committed) and its sha256 is
recorded. Every (length, method) pair runs in a fresh process (`--child`), so each peak RSS is that run's own;
methods are interleaved within each length, so a drift in machine load hits them alike. Each run reads the
first `length` tokens in segments of --segment from an empty memory (`bench.throughput`: prefill, then 8
greedy tokens) after one untimed warm-up segment. The result file is rewritten after every run, so a long
sweep can be stopped and its finished runs kept; `ratios` compares each length with the shortest one: the
average tokens/s, the tokens/s over the last 8,192 tokens (the cost at that length), and both per CPU-second of
the run's process, which other work on the machine does not dilute (with one thread).
A method is a preset (its options and adapter: `uio-fifo`, `memorizing-fast`) and may carry option overrides
(`NAME:key=value[:key=value]`); every row also records the
bytes its memory holds at the end, in RAM (allocated) and as a snapshot would write them (filled).
With --baseline DIR, every run is repeated right after with the `longctx` package of the checkout DIR (rows
with "code": "baseline"), so the two versions are measured side by side under the same load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def build_text(data: Path, tokens_needed: int, chars_per_token: float = 3.5) -> str:
    """The novels joined (blank line between), repeated whole until they surely hold `tokens_needed` tokens."""
    books = [p.read_text(encoding="utf-8") for p in sorted(data.glob("*.txt"))]
    if not books:
        raise SystemExit(f"no *.txt novels under {data}")
    text = "\n\n".join(books)
    repeats = max(1, int(tokens_needed * chars_per_token * 1.2 // len(text)) + 1)
    return "\n\n".join([text] * repeats)


def text_ids(data: Path, tokenizer: Any, tokens_needed: int) -> tuple[list[int], dict[str, Any]]:
    """Token ids of the built text (all of them, at least `tokens_needed`), and what the text was."""
    from longctx.text.tokens import tokenize_text

    text = build_text(data, tokens_needed)
    ids = tokenize_text(tokenizer, text).ids
    if len(ids) < tokens_needed:
        raise SystemExit(f"the text built from {data} has {len(ids)} tokens, fewer than {tokens_needed}")
    books = sorted(p.name for p in data.glob("*.txt"))
    info = {"books": books, "chars": len(text), "tokens": int(len(ids)),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    return ids, info


def tokenize(data: Path, tokens_needed: int, dtype: str, work: Path) -> tuple[Path, dict[str, Any]]:
    """Token ids of the built text in `work/ids.npy`, and what the text was."""
    import longctx

    ids, info = text_ids(data, longctx.load_backbone(dtype=dtype, threads=1).tokenizer, tokens_needed)
    path = work / "ids.npy"
    np.save(path, np.asarray(ids, dtype=np.int64))
    return path, info


def use_checkout(directory: str) -> None:
    """Import `longctx` from the checkout `directory` instead of the installed (editable) one."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path.insert(0, str(Path(directory).resolve()))


def child(method: str, length: int, ids_path: str, args: argparse.Namespace) -> None:
    """One run in this process: print its throughput row as one JSON line."""
    segment, dtype, threads = args.segment, args.dtype, args.threads
    if args.code:
        use_checkout(args.code)
    import torch

    import longctx
    from longctx.bench.throughput import throughput
    from longctx.run import build_method

    backbone = longctx.load_backbone(dtype=dtype, threads=threads)
    ids = torch.from_numpy(np.load(ids_path, mmap_mode="r")[:length].copy())
    name, options = method_spec(method)
    m, _ = build_method(name, backbone, options)  # a preset: its options and trained adapter, then the overrides
    throughput(backbone, m, ids[:segment], segment=segment, decode_tokens=1)  # warm-up, untimed
    row = throughput(backbone, m, ids, segment=segment, decode_tokens=args.decode)
    row["longctx_path"] = str(Path(longctx.__file__).parent)
    print("ROW " + json.dumps(row, default=str), flush=True)


def method_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`infllm:store_dtype=int8:topk=8` -> ("infllm", {"store_dtype": "int8", "topk": "8"})."""
    name, *pairs = spec.split(":")
    options = dict(pair.split("=", 1) for pair in pairs)
    return name, options


def run_child(args: argparse.Namespace, method: str, length: int, ids_path: Path, code: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", method, str(length), str(ids_path), "--segment", str(args.segment),
           "--dtype", args.dtype, "--threads", str(args.threads), "--decode", str(args.decode)]
    cmd += ["--code", code] if code else []
    load0, t0 = os.getloadavg(), time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    rows = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
    if out.returncode != 0 or not rows:
        return {"name": method, "length": length, "code": "baseline" if code else "this",
                "error": out.stderr.strip().splitlines()[-1:]}
    return {"name": method, "length": length, "code": "baseline" if code else "this", **json.loads(rows[-1]),
            "wall_s": time.time() - t0,
            "load_avg_start": load0, "load_avg_end": os.getloadavg()}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method, tokens/s and peak RSS at each length over those at the shortest length."""
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = sorted((r for r in rows if r["name"] == name and r.get("code") != "baseline" and "error" not in r),
                      key=lambda r: r["length"])
        if not mine:
            continue
        base = mine[0]
        for r in mine[1:]:
            row = {"name": name, "length": r["length"], "vs_length": base["length"],
                   "prefill_tok_s_ratio": r["prefill_tok_s"] / base["prefill_tok_s"],
                   "peak_rss_ratio": r["peak_rss_mb"] / base["peak_rss_mb"]}
            for key in ("prefill_tok_per_cpu_s", "tail_tok_s", "tail_tok_per_cpu_s"):  # rows of older runs lack them
                if r.get(key) and base.get(key):
                    row[f"{key}_ratio"] = r[key] / base[key]
            out.append(row)
    return out


def plot(files: list[str], out_dir: Path) -> list[Path]:
    """Tokens per CPU-second over the last 8,192 tokens, and peak RSS, against length (log scale), one line
    per method, from the rows of every result file given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for f in files for r in json.loads(Path(f).read_text())["rows"]
            if "error" not in r and r.get("code") != "baseline" and r.get("tail_tok_per_cpu_s")]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label, name in (("tail_tok_per_cpu_s", "tokens per CPU-second (last 8,192 tokens)", "scale_speed.png"),
                             ("peak_rss_mb", "peak RSS (MiB)", "scale_rss.png")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for method in dict.fromkeys(r["name"] for r in rows):
            pts = sorted((r["length"], r[key]) for r in rows if r["name"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method.replace(":", " "))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens read")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="window,sinks,xl,infllm")
    ap.add_argument("--lengths", default="8192,65536,262144,1048576")
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--decode", type=int, default=8, help="greedy tokens timed after each prefill")
    ap.add_argument("--baseline", help="a checkout whose longctx is measured too, run by run (e.g. ../main)")
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "LENGTH", "IDS"), help=argparse.SUPPRESS)
    ap.add_argument("--plot", nargs="+", metavar=("DIR", "RESULT"), help="draw speed and RSS vs length from result files")
    args = ap.parse_args()
    if args.plot:
        print("\n".join(str(p) for p in plot(args.plot[1:], Path(args.plot[0]))))
        return
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2], args)
        return
    import longctx
    from longctx.bench.record import run_record

    methods, lengths = args.methods.split(","), sorted(int(n) for n in args.lengths.split(","))
    work = Path(tempfile.mkdtemp(prefix="longctx-scale-"))
    ids_path, text = tokenize(Path(args.data), max(lengths), args.dtype, work)
    record = run_record(longctx.load_backbone(dtype=args.dtype, threads=1),
                        extra={"command": " ".join(["benchmarks/scale.py", *sys.argv[1:]])})
    result: dict[str, Any] = {"benchmark": "scale", "record": record, "model": record["model"] | {"dtype": args.dtype},
                              "text": text, "segment": args.segment, "threads": args.threads, "decode": args.decode,
                              "baseline": str(Path(args.baseline).resolve()) if args.baseline else None,
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": [], "ratios": []}
    for length in lengths:
        for method in methods:
            for code in (None, args.baseline) if args.baseline else (None,):
                row = run_child(args, method, length, ids_path, code)
                result["rows"].append(row)
                result["ratios"] = ratios(result["rows"])
                Path(args.out).write_text(json.dumps(result, indent=1, default=str))
                shown = ("name", "length", "code", "prefill_tok_s", "tail_tok_per_cpu_s", "peak_rss_mb", "decode_tok_s",
                         "load_avg_end", "error")
                print(json.dumps({k: row.get(k) for k in shown}), flush=True)


if __name__ == "__main__":
    main()
