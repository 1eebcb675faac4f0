"""A segment's cost near the start of a long text and far into it, measured in turn in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost_at_length.py --method memorizing-fast --at 1048576
        [--near 8192] [--warm 131072 | --warm 0] [--pairs 32] [--segment 512] [--dtype bf16]
        [--data /work/shared/data] [--out benchmarks/results/cost_at_length.json]

`scale.py` takes a run's rate at 8k and at 1M hours apart, and this machine's speed drifts by more than the
differences looked for: two 24k-token reads of `memorizing-fast` (at document positions 0 and 1M) went at
142 and 122 tokens per CPU-second side by side, and at 118 and 146 when rerun one after the other. Here two
memories of one method are built in one process: A reads the first --near tokens of the text (scale.py's
text: the novels under --data, repeated), B reaches --at tokens. Then A and B read their next segment in
turn, --pairs times each (A the tokens after --near, B those after --at), and each segment's process CPU
time is taken: drift and other jobs hit both sides alike. The result is B's tokens per CPU-second over A's
(over all pairs, and the median and spread of the pair-by-pair ratios).

B reads all --at tokens with `--warm 0`. With `--warm W` it reads the text's first segment and then only the
W tokens that end at --at, at their document positions: a bounded memory (a window, a FIFO store, attention
sinks) that holds fewer than W tokens then holds what it would after reading everything; only where its
rings' seams fall differs. The entries each memory holds are recorded, so this can be checked; an
unbounded memory needs `--warm 0`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import chain
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import method_spec, text_ids  # noqa: E402

import longctx  # noqa: E402
from longctx.bench.record import run_record  # noqa: E402
from longctx.run import build_method  # noqa: E402
from longctx.stream import forward_segment  # noqa: E402
from longctx.tasks.decode import ingest, plain_segments  # noqa: E402


def read_to(backbone, method, ids: torch.Tensor, start: int, end: int, segment: int) -> Any:
    """A fresh memory after reading the first segment and then `ids[start:end]`, at their document positions."""
    segments = plain_segments(ids[:end], segment)
    if start > segment:
        segments = chain(plain_segments(ids[:segment], segment), plain_segments(ids[start:end], segment, start=start))
    return ingest(backbone, method, segments, segment=segment).state


def timed_segment(backbone, method, state: Any, ids: torch.Tensor, start: int, segment: int) -> tuple[Any, float]:
    """`state` after the segment at `start`, and that segment's process CPU seconds."""
    seg = next(plain_segments(ids[start : start + segment], segment, start=start))
    t = time.process_time()
    with torch.inference_mode():
        state, _, _ = forward_segment(backbone, method, state, seg)
    return state, time.process_time() - t


def interleave(backbone, method, ids: torch.Tensor, near: Any, far: Any, args: argparse.Namespace) -> list[tuple[float, float]]:
    """CPU seconds of `pairs` (near, far) segment pairs, read in turn."""
    times, seg = [], args.segment
    for i in range(args.pairs):
        near, a = timed_segment(backbone, method, near, ids, args.near + i * seg, seg)
        far, b = timed_segment(backbone, method, far, ids, args.at + i * seg, seg)
        times.append((a, b))
    return times


def summary(times: list[tuple[float, float]], segment: int) -> dict[str, Any]:
    """Tokens per CPU-second on each side and far/near: over all pairs and pair by pair."""
    near, far = sum(a for a, _ in times), sum(b for _, b in times)
    pairs = sorted(a / b for a, b in times)
    return {"near_tok_per_cpu_s": len(times) * segment / near, "far_tok_per_cpu_s": len(times) * segment / far,
            "ratio": near / far, "pair_ratio_median": statistics.median(pairs),
            "pair_ratio_min": pairs[0], "pair_ratio_max": pairs[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, help="a method or preset, with overrides as NAME:key=value")
    ap.add_argument("--at", type=int, default=1_048_576)
    ap.add_argument("--near", type=int, default=8192)
    ap.add_argument("--warm", type=int, default=131_072, help="tokens B reads before --at (0: all of them)")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--out", default="benchmarks/results/cost_at_length.json")
    args = ap.parse_args()
    backbone = longctx.load_backbone(dtype=args.dtype, threads=1)
    span = args.pairs * args.segment
    all_ids, text = text_ids(Path(args.data), backbone.tokenizer, args.at + span)
    ids = torch.tensor(all_ids[: args.at + span])
    name, options = method_spec(args.method)
    method, _ = build_method(name, backbone, options)
    from_ = max(0, args.at - args.warm) if args.warm else 0
    t0 = time.perf_counter()
    near = read_to(backbone, method, ids, 0, args.near, args.segment)
    far = read_to(backbone, method, ids, from_, args.at, args.segment)
    held = {"near": method.memory_size(near), "far": method.memory_size(far)}
    ready_s = time.perf_counter() - t0
    times = interleave(backbone, method, ids, near, far, args)
    result = {"benchmark": "cost_at_length", "method": args.method, "protocol": method.describe(), "text": text,
              "near": args.near, "at": args.at, "far_read_from": from_, "segment": args.segment, "pairs": args.pairs,
              "memory_entries": held, "setup_s": ready_s, "segment_cpu_s": times,
              **summary(times, args.segment),
              "record": run_record(backbone, extra={"command": " ".join(["benchmarks/cost_at_length.py", *sys.argv[1:]])})}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("method", "memory_entries", "near_tok_per_cpu_s", "far_tok_per_cpu_s",
                                             "ratio", "pair_ratio_median", "pair_ratio_min", "pair_ratio_max")}))


if __name__ == "__main__":
    main()
