"""Wall time of short `longctx` commands in fresh processes (what a user waits for before anything happens).

    .venv/bin/python benchmarks/cli_startup.py [--reps 5] [--out benchmarks/results/cli_startup.json] [--tree T]

Each command runs --reps times as its own process (`.venv/bin/longctx ARGS`, output discarded); the
median and the minimum are reported with the machine's load. Commands that need no model must not import
torch (tests/test_cli.py checks that). `--tree` names the longctx source measured when it is not this
checkout (another tree put first on PYTHONPATH, e.g. an earlier commit's `git archive`); it is recorded
with PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["--version"], ["memory", "ls"], ["ppl", "--help"], ["methods"], ["presets", "list"])


def wall_times(exe: str, args: list[str], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/cli_startup.json")
    ap.add_argument("--tree", default="this checkout", help="what source tree is measured (recorded)")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("longctx"))
    load0 = os.getloadavg()
    rows = []
    for cmd in COMMANDS:
        t = wall_times(exe, cmd, args.reps)
        rows.append({"command": "longctx " + " ".join(cmd), "median_s": statistics.median(t), "min_s": min(t),
                     "reps": args.reps})
        print(f"{rows[-1]['command']:<24} median {rows[-1]['median_s']:.2f} s  min {rows[-1]['min_s']:.2f} s")
    result = {"schema_version": 1, "benchmark": "cli_startup", "rows": rows, "cpus": os.cpu_count(),
              "load_avg_start": load0, "load_avg_end": os.getloadavg(), "python": sys.version.split()[0],
              "tree": args.tree, "pythonpath": os.environ.get("PYTHONPATH"),
              "command": " ".join(sys.argv), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
