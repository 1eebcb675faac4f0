"""The README's first command, timed step by step from a fresh clone (what a new user waits for).

    python3 benchmarks/first_run.py [--repo .] [--out benchmarks/results/first_run.json]

Clones `--repo` (its committed HEAD) into a temporary directory, points LONGCTX_HOME at an empty temporary
directory (so the one-time model conversion is counted), and runs the README's first command split at its
`&&`s: set-up, the book, the scoring. The scoring step gets `--json` added (its only change) so that the
result file records the model, the environment and each method's tok/s. Set-up reuses pip's cache where this
machine has one: on a machine that never downloaded the wheels it takes longer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_COMMAND = re.compile(r"```bash\n(.+?)\n", re.S)


def readme_first_command(repo: Path) -> str:
    """The first line of the README's first bash block."""
    match = FIRST_COMMAND.search((repo / "README.md").read_text(encoding="utf-8"))
    if not match:
        raise SystemExit("README.md has no ```bash block")
    return match.group(1).strip()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


def timed(step: str, cwd: Path, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run(["bash", "-c", step], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=".")
    ap.add_argument("--out", default="benchmarks/results/first_run.json")
    args = ap.parse_args()
    command = readme_first_command(Path(args.repo))
    steps = [s.strip() for s in command.split("&&")]
    work, home = Path(tempfile.mkdtemp(prefix="longctx-fresh-")), Path(tempfile.mkdtemp(prefix="longctx-home-"))
    subprocess.run(["git", "clone", "-q", str(Path(args.repo).resolve()), str(work / "clone")], check=True)
    env = {**os.environ, "LONGCTX_HOME": str(home)}
    load0, rows, report = os.getloadavg(), [], None
    for i, step in enumerate(steps):
        run = step + (" --json" if i == len(steps) - 1 else "")
        seconds, done = timed(run, work / "clone", env)
        rows.append({"step": step, "ran": run, "seconds": round(seconds, 1), "exit": done.returncode,
                     "load_avg_1m_after": os.getloadavg()[0]})
        print(f"{seconds:7.1f} s  {step}", file=sys.stderr)
        if done.returncode:
            raise SystemExit(f"step failed ({done.returncode}): {step}\n{done.stderr[-2000:]}")
        if i == len(steps) - 1:
            report = json.loads(done.stdout)
            rows[-1]["stderr"] = done.stderr
    assert report is not None
    scoring = sum(r["seconds"] for r in report["runs"])
    out = {"benchmark": "first_run", "command": " ".join(shlex.quote(a) for a in sys.argv),
           "readme_command": command, "steps": rows, "total_seconds": round(sum(r["seconds"] for r in rows), 1),
           "scoring_seconds": round(scoring, 1), "cpu": cpu_model(), "cpus": os.cpu_count(),
           "load_avg_before": list(load0), "model": report["model"], "environment": report["environment"],
           "runs": [{k: r[k] for k in ("method", "ppl", "ppl_se", "tokens", "seconds", "tokens_per_s")}
                    for r in report["runs"]]}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"total {out['total_seconds']} s, scoring {out['scoring_seconds']} s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
