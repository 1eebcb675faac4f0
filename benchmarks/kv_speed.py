"""The K/V methods against the bare model: a segment's forward with a full memory, and decoding at 8k.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_speed.py [--baseline DIR] [--reps 5]
        [--decode-memory 7680] [--decode-tokens 16] [--dtype bf16] [--data /work/shared/data]
        [--out benchmarks/results/kv_speed.json]

(a) Prefill: one segment (--segment, 512) of `xl` (4 sinks + 2,048 memory) and `sinks` (4 sinks + a 2,044
    window), each with its memory full, read + forward + write, against a bare Hugging Face forward of the
    same 512 tokens after a DynamicCache holding the same number of tokens (2,052 / 2,048), cropped back after
    each forward. The three are timed in turn, --reps times (median).
(b) Decode: greedy tokens after --decode-memory tokens of memory (7,680: `full`, `xl` with 4 sinks + 7,676
    memory, `sinks` with 4 sinks + a 7,676 window; the memory holds every token read, so one prefill with
    `full` serves all three) against Hugging Face `model.generate` (greedy) continuing a DynamicCache
    prefilled with the same tokens. Each method decodes one untimed token first (a copied memory's first
    step builds its room), then --decode-tokens timed ones; --reps rounds, methods in turn (median).

Both run in one process per checkout, the HF model being the backbone's own weights with transformers'
`sdpa` attention switched in for its turns; with --baseline DIR a second process imports `longctx` from the
checkout DIR (the code before a change), run at the same time, --rounds times. Times are CPU seconds of
the one torch thread (the work, whatever share of a loaded machine the process gets) and wall seconds; the
ratios to the bare model are in CPU seconds, within one process, so they compare the two versions. The text is the public-domain novels under
--data (never committed; its sha256 is recorded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SINKS = 4


class Timer:
    """CPU seconds of this thread (the work, whatever share of the machine the process gets: with one torch
    thread every kernel runs in it) and wall seconds, of the block it times."""

    def __enter__(self) -> Timer:
        self.cpu0, self.wall0 = time.thread_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu, self.wall = time.thread_time() - self.cpu0, time.perf_counter() - self.wall0


def summary(cpu: list[float], wall: list[float], count: int) -> dict[str, Any]:
    """Tokens per CPU-second and per wall-second (medians over the reps), and the raw seconds."""
    return {"tok_per_cpu_s": count / statistics.median(cpu), "tok_s": count / statistics.median(wall),
            "cpu_seconds": cpu, "seconds": wall}


def use_checkout(directory: str) -> None:
    """Import `longctx` from the checkout `directory` instead of the installed (editable) one."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path.insert(0, str(Path(directory).resolve()))


def text_ids(data: Path, backbone: Any, tokens: int) -> tuple[Any, dict[str, Any]]:
    """The first `tokens` token ids of the novels under `data` (sorted by name, joined by blank lines)."""
    import torch

    books = sorted(data.glob("*.txt"))
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in books)
    ids = backbone.tokenizer(text[: tokens * 8], add_special_tokens=False)["input_ids"][:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"the novels under {data} hold fewer than {tokens} tokens")
    info = {"books": [p.name for p in books], "tokens": tokens,
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    return torch.tensor(ids, dtype=torch.long), info


class Bare:
    """The backbone's model with transformers' own sdpa attention, for the turns of the bare model."""

    def __init__(self, backbone: Any):
        self.model = backbone.model

    def __enter__(self) -> Any:
        self.model.set_attn_implementation("sdpa")
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.set_attn_implementation("longctx")


def bare_cache(backbone: Any, ids: Any, chunk: int = 512) -> Any:
    """A DynamicCache holding `ids`, filled chunk by chunk (bounds the attention's buffers)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with Bare(backbone) as model, torch.inference_mode():
        for s in range(0, len(ids), chunk):
            model(ids[s : s + chunk].view(1, -1), past_key_values=cache, use_cache=True)
    return cache


def method(backbone: Any, name: str, **options: Any) -> Any:
    from longctx.methods import get_method

    cls = get_method(name)
    return cls(cls.Options.from_mapping(options), backbone)


def filled(backbone: Any, m: Any, ids: Any, segment: int) -> Any:
    """The method's state after reading `ids` in segments of `segment`."""
    from longctx.tasks.decode import ingest, plain_segments

    return ingest(backbone, m, plain_segments(ids, segment)).state


def prefill_rows(backbone: Any, ids: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """(a): seconds per segment of xl, sinks and the bare forward, timed in turn."""
    import torch

    from longctx.stream import forward_segment
    from longctx.tasks.decode import plain_segments

    seg = args.segment
    xl, sinks = method(backbone, "xl", memory=2048, sinks=SINKS), method(backbone, "sinks", window=2044, sinks=SINKS)
    warm = 2048 + 2 * seg  # both memories full before the first timed segment
    runs = {"xl": [xl, filled(backbone, xl, ids[:warm], seg)], "sinks": [sinks, filled(backbone, sinks, ids[:warm], seg)]}
    held = {"xl": SINKS + 2048, "sinks": SINKS + 2044}
    caches = {name: bare_cache(backbone, ids[warm - n : warm]) for name, n in held.items()}
    cpu: dict[str, list[float]] = {k: [] for k in ("xl", "sinks", "bare_xl", "bare_sinks")}
    wall: dict[str, list[float]] = {k: [] for k in cpu}
    segments = list(plain_segments(ids[warm : warm + args.reps * seg], seg, start=warm))
    with torch.inference_mode():
        for s in segments:
            for name, (m, state) in runs.items():
                with Timer() as t:
                    runs[name][1], _, _ = forward_segment(backbone, m, state, s)
                cpu[name].append(t.cpu)
                wall[name].append(t.wall)
                with Bare(backbone) as model:
                    with Timer() as t:
                        model.model(s.ids.view(1, -1), past_key_values=caches[name], use_cache=True)
                    cpu[f"bare_{name}"].append(t.cpu)
                    wall[f"bare_{name}"].append(t.wall)
                    caches[name].crop(held[name] - caches[name].get_seq_length())
    rows = []
    for name in ("xl", "sinks"):
        mine, bare = summary(cpu[name], wall[name], seg), summary(cpu[f"bare_{name}"], wall[f"bare_{name}"], seg)
        rows.append({"part": "prefill", "name": name, "memory": held[name], "segment": seg, "reps": args.reps, **mine,
                     "bare": bare, "ratio_to_bare": mine["tok_per_cpu_s"] / bare["tok_per_cpu_s"],
                     "wall_ratio_to_bare": mine["tok_s"] / bare["tok_s"]})
    return rows


def decode_rows(backbone: Any, ids: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """(b): decode tokens/s of full, xl and sinks at --decode-memory tokens, and of HF generate."""
    import torch

    from longctx.tasks.decode import Ingested, greedy, ingest, plain_segments

    n, t = args.decode_memory, args.decode_tokens
    full = method(backbone, "full")
    methods = {"full": full, "xl": method(backbone, "xl", memory=n - SINKS, sinks=SINKS),
               "sinks": method(backbone, "sinks", window=n - SINKS, sinks=SINKS)}
    done = ingest(backbone, full, plain_segments(ids[:n], args.segment))
    cache = bare_cache(backbone, ids[: n - 1])
    prompt = ids[:n].view(1, -1)
    cpu: dict[str, list[float]] = {k: [] for k in (*methods, "hf_generate")}
    wall: dict[str, list[float]] = {k: [] for k in cpu}
    for _ in range(args.reps):
        for name, m in methods.items():
            start = Ingested(m.fork_state(done.state), done.tokens, done.last_hidden, None)
            _, warm = greedy(backbone, m, start, 1)  # a copied memory's first step builds its room
            with Timer() as timer:
                greedy(backbone, m, warm, t)
            cpu[name].append(timer.cpu)
            wall[name].append(timer.wall)
        with Bare(backbone) as model, torch.inference_mode():
            with Timer() as timer:
                model.generate(prompt, past_key_values=cache, max_new_tokens=t, min_new_tokens=t, do_sample=False)
            cpu["hf_generate"].append(timer.cpu)
            wall["hf_generate"].append(timer.wall)
            cache.crop(n - 1 - cache.get_seq_length())
    hf = summary(cpu["hf_generate"], wall["hf_generate"], t)
    rows = []
    for name in methods:
        mine = summary(cpu[name], wall[name], t)
        rows.append({"part": "decode", "name": name, "memory": n, "tokens": t, "reps": args.reps, **mine,
                     "hf_generate": hf, "ratio_to_hf_generate": mine["tok_per_cpu_s"] / hf["tok_per_cpu_s"],
                     "wall_ratio_to_hf_generate": mine["tok_s"] / hf["tok_s"]})
    return rows


def child(args: argparse.Namespace) -> None:
    """One checkout's measurements in this process, printed as one JSON line."""
    if args.code:
        use_checkout(args.code)
    import longctx

    backbone = longctx.load_backbone(dtype=args.dtype, threads=args.threads)
    ids, text = text_ids(Path(args.data), backbone, max(args.decode_memory, 2048 + (2 + args.reps) * args.segment))
    load0, t0 = os.getloadavg(), time.time()
    rows = prefill_rows(backbone, ids, args) + decode_rows(backbone, ids, args)
    out = {"longctx_path": str(Path(longctx.__file__).parent), "text": text, "rows": rows,
           "load_avg_start": load0, "load_avg_end": os.getloadavg(), "wall_s": time.time() - t0}
    print("RESULT " + json.dumps(out), flush=True)


def child_command(args: argparse.Namespace, code: str | None) -> list[str]:
    cmd = [sys.executable, __file__, "--child", "--reps", str(args.reps), "--segment", str(args.segment),
           "--decode-memory", str(args.decode_memory), "--decode-tokens", str(args.decode_tokens),
           "--dtype", args.dtype, "--threads", str(args.threads), "--data", args.data]
    return cmd + (["--code", code] if code else [])


def run_children(args: argparse.Namespace, codes: list[str | None]) -> list[dict[str, Any]]:
    """One process per checkout, all at once (their ratios are each within one process, in CPU seconds)."""
    procs = [subprocess.Popen(child_command(args, code), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for code in codes]
    runs = []
    for code, proc in zip(codes, procs):
        out, err = proc.communicate()
        lines = [line[7:] for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"the run of {code or 'this checkout'} failed: {err.strip()[-2000:]}")
        runs.append({"code": "baseline" if code else "this", **json.loads(lines[-1])})
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--decode-memory", type=int, default=7680)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--baseline", help="a checkout measured too, in its own process (e.g. an older commit's `git archive`)")
    ap.add_argument("--rounds", type=int, default=1, help="alternations of this checkout and the baseline")
    ap.add_argument("--out", default="benchmarks/results/kv_speed.json")
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import longctx
    from longctx.bench.record import run_record

    record = run_record(longctx.load_backbone(dtype=args.dtype, threads=1),
                        extra={"command": " ".join(["benchmarks/kv_speed.py", *sys.argv[1:]])})
    result: dict[str, Any] = {"benchmark": "kv_speed", "record": record, "model": record["model"] | {"dtype": args.dtype},
                              "threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                              "baseline": str(Path(args.baseline).resolve()) if args.baseline else None, "runs": []}
    codes: list[str | None] = [None, args.baseline] if args.baseline else [None]
    for _ in range(args.rounds):
        for run in run_children(args, codes):
            result["runs"].append(run)
            Path(args.out).write_text(json.dumps(result, indent=1))
            for r in run["rows"]:
                print(json.dumps({"code": run["code"], **{k: v for k, v in r.items() if "seconds" not in k and
                                                          not isinstance(v, dict)}}), flush=True)


if __name__ == "__main__":
    main()
