"""Training curves of a `longctx train --task facts` run, with the answer losses apart from the language-modelling
samples that `--lm-share` mixes in (the step records hold one mean loss per step and do not say which kind of
sample it came from; each sample's kind is drawn again here from its (seed, step, lane) generator through the
trainer's own `Mixed` source, so the split is the run's, not a guess).

    .venv/bin/python benchmarks/recall_curves.py run.json [more.json] --window 100 -o curves.json

`run.json` is the JSON that `longctx train ... --json` printed (or an adapter's manifest.json, which holds the
same `config` and `history`). The table prints, per stage and per `--window` steps inside it, the mean answer
loss (nats per answer token, one mean per sample) and the mean LM loss, and the validation records.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from statistics import mean
from typing import Any

from longctx.tasks.facts import Mixed
from longctx.tasks.trainer import sample_generator


class _Kind:
    """A sample source that hands back its own name: `Mixed.draw` then says which source a step drew from."""

    def __init__(self, name: str) -> None:
        self.name = name

    def draw(self, n: int, segment: int, gen: Any) -> Any:
        return self.name


def sample_kinds(task: str, config: dict[str, Any], steps: int) -> list[str]:
    """The kind ("facts" or "lm") of each step's sample (one per step: --accumulate 1), drawn as the trainer
    drew it."""
    if task != "facts":
        return ["lm"] * steps
    mixed = Mixed(_Kind("facts"), _Kind("lm"), config.get("lm_share", 0.0))
    return [mixed.draw(1, 1, sample_generator(config["seed"], step, 0)) for step in range(steps)]


def curves(run: dict[str, Any], window: int) -> list[dict[str, Any]]:
    """Rows of (stage segments, first step, last step, mean answer loss, mean LM loss, counts), `window` steps each."""
    config, history = run["config"], run["history"]
    if config.get("accumulate", 1) != 1:
        raise SystemExit("the step records hold one mean per step: the split needs --accumulate 1")
    kinds = sample_kinds(run.get("task", "lm"), config, len(history))
    rows: list[dict[str, Any]] = []
    for rec, kind in zip(history, kinds, strict=True):
        row = rows[-1] if rows else None
        if row is None or row["segments"] != rec["segments"] or rec["step"] - row["first_step"] >= window:
            row = {"segments": rec["segments"], "first_step": rec["step"], "answer": [], "lm": []}
            rows.append(row)
        row["last_step"] = rec["step"]
        row["answer" if kind == "facts" else "lm"].append(rec["loss"])
    return [{"segments": r["segments"], "steps": [r["first_step"], r["last_step"]],
             "answer_loss": mean(r["answer"]) if r["answer"] else None, "answer_samples": len(r["answer"]),
             "answer_below_0.1": sum(x < 0.1 for x in r["answer"]),
             "lm_loss": mean(r["lm"]) if r["lm"] else None, "lm_samples": len(r["lm"])} for r in rows]


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="JSON printed by `longctx train --json`, or an adapter manifest")
    ap.add_argument("--window", type=int, default=100, help="steps per row inside a stage")
    ap.add_argument("-o", "--out", help="write the rows as JSON here")
    a = ap.parse_args()
    out = []
    for path in a.runs:
        run = json.loads(Path(path).read_text())
        run = run.get("training", run)  # a manifest keeps the run's record under "training"
        rows = curves(run, a.window)
        out.append({"run": path, "command": run.get("command"), "rows": rows,
                    "validation": run.get("validation_ppl") or run.get("validation")})
        print(f"# {path}\n| segments | steps | answer loss | answers < 0.1 nats | LM loss |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['segments']} | {r['steps'][0]}–{r['steps'][1]} | {_fmt(r['answer_loss'])} "
                  f"| {r['answer_below_0.1']}/{r['answer_samples']} | {_fmt(r['lm_loss'])} |")
    if a.out:  # the runs' files carry their model and machine; this one only re-reads them
        record = {"benchmark": "recall_curves", "command": " ".join(["python", *sys.argv]),
                  "python": platform.python_version(), "window": a.window, "runs": out}
        Path(a.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
