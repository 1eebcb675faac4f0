"""Does a trained memory carry the fact, or does the model guess the answer's kind? Teacher-forced answers of
fixed fact samples (the training generator's templates over a novel the run never read), each read three ways
in one process: with its own memory, with another sample's memory (`swapped`) and with the initial memory
(`reset`), in one pass over each sample's earlier segments; see `longctx.tasks.facts.answer_scores`. Only `own` can know the fact; the gap to the other two is
what the memory carries.

    .venv/bin/python benchmarks/recall_probe.py ../shared/data/austen_emma.txt \
        --methods rmt=rmt,rmt-recall=/path/rmt-recall.yaml --segment 256 --segments 2,4,8 --samples 32 \
        --threads 1 -o benchmarks/results/recall_probe.json

`--methods` takes label=preset pairs (a preset name or a YAML path whose `adapter:` names the adapter).
The default seed (1000) is not the training probe's (4321, on the validation novel).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import longctx
from longctx.bench.record import run_record
from longctx.run import build_method
from longctx.tasks.facts import FactRecall, answer_scores
from longctx.tasks.samples import TokenCorpus
from longctx.text.prompts import qa_frame

MODES = {"own": "", "swapped": "_swapped", "reset": "_reset"}  # reading -> suffix of its scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("novel", help="filler text the training never read (the report set's: Emma)")
    ap.add_argument("--methods", required=True, help="label=preset pairs, comma-separated")
    ap.add_argument("--segment", type=int, default=256)
    ap.add_argument("--segments", default="2,4,8", help="segments per sample: the fact is n - 1 writes back")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    backbone = longctx.load_backbone(threads=a.threads)
    source = FactRecall(backbone.tokenizer, TokenCorpus.from_files([a.novel], backbone.tokenizer).docs[0],
                        qa_frame(backbone.tokenizer))
    out = {"benchmark": "recall_probe", "novel": a.novel, "segment": a.segment, "samples": a.samples,
           "seed": a.seed, "record": run_record(backbone, seed=a.seed), "protocols": {}, "cells": []}
    for label, spec in (pair.split("=", 1) for pair in a.methods.split(",")):
        method, _ = build_method(spec, backbone)
        out["protocols"][label] = method.describe()
        for n in (int(x) for x in a.segments.split(",")):
            t = time.perf_counter()
            scores = answer_scores(backbone, method, source, segments=n, segment=a.segment, samples=a.samples,
                                   seed=a.seed, controls=("swapped", "reset"))
            seconds = time.perf_counter() - t  # one pass reads all three
            for mode, suffix in MODES.items():
                cell = {"recall_segments": n, "recall_samples": a.samples,
                        "answer_accuracy": scores[f"answer_accuracy{suffix}"], "answer_nll": scores[f"answer_nll{suffix}"]}
                out["cells"].append({"label": label, "memory": mode, **cell, "pass_seconds": seconds})
                print(f"{label} {n} segments {mode}: {cell['answer_accuracy']:.3f} exact, "
                      f"{cell['answer_nll']:.3f} nats", file=sys.stderr)
            Path(a.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    out["record_end"] = run_record(backbone, seed=a.seed)
    Path(a.out).write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
