"""Which layers' heads find the pass key's block: the rank of that block under `infllm`'s exact scoring, per layer.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/infllm_score_layers.py books/austen_persuasion.txt \
        [--length 8192] [--trials 5] [--model NAME] [--preset infllm] \
        [--out benchmarks/results/infllm_score_layers_tuning_8k.json]

Tuning set only (Persuasion filler, the tuning seeds and key wording): this chooses `score_layers`, so it
must not look at the report set. Each trial builds the passkey prompt `bench passkey` builds, reads the
haystack with the `infllm` preset's options, then lets the question's own queries (the probe forward `ask`
makes) score every stored block at each layer separately, as `InfLLM.recall` does for all layers at once:
softmax of q·k over every stored key, mean over the queries, mass per block, the sharpest head. A rank of 0
means that layer alone would choose the key's block first.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import longctx
from longctx.bench.passkey import Filler, make_trial, prompt_frame
from longctx.bench.record import run_record
from longctx.bench.splits import eval_set
from longctx.presets import load_preset
from longctx.run import build_method
from longctx.tasks.decode import ingest, plain_segments

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def layer_ranks(backbone, method, trial, segment: int) -> list[int]:
    """Per layer, the rank of the best-ranked block overlapping the key's line."""
    cut = len(trial.ids) - trial.question
    done = ingest(backbone, method, plain_segments(trial.ids[:cut], segment))
    question = next(iter(plain_segments(trial.ids[cut:], segment, start=cut, prompt=True)))
    block = method.options.block
    with torch.inference_mode():
        queries = method._probe(done.state, question)
        store = done.state.store
        n = len(store) // block * block
        starts = store.token_index[:n:block]
        target = [i for i, s in enumerate(starts.tolist()) if s < trial.needle[1] and s + block > trial.needle[0]]
        ranks = []
        for layer in range(backbone.num_layers):
            mass = method._key_mass(store, queries[layer], layer, n)
            best = mass.view(mass.shape[0], -1, block).sum(-1).amax(0)
            order = best.argsort(descending=True).tolist()
            ranks.append(min(order.index(b) for b in target))
    return ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("filler")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--model", default=None, help="reader (a catalog name, HF id or directory; default: the default model)")
    ap.add_argument("--preset", default="infllm", help="the infllm preset whose options read the haystack")
    ap.add_argument("--out", default="benchmarks/results/infllm_score_layers_tuning_8k.json")
    args = ap.parse_args()
    backbone = longctx.load_backbone(args.model, dtype="auto", threads=1)
    method, _ = build_method(load_preset(args.preset), backbone)
    split = eval_set("tuning")
    split.check_filler(args.filler)
    filler = Filler.from_file(args.filler, backbone.tokenizer)
    rng = random.Random(split.seed(None))
    frame = prompt_frame(backbone.tokenizer, False, split.wording)
    trials = []
    for t in range(args.trials):
        trial = make_trial(backbone.tokenizer, filler, args.length, DEPTHS[t % len(DEPTHS)], rng, frame, split.wording)
        ranks = layer_ranks(backbone, method, trial, 512)
        trials.append({"depth": trial.depth, "key": trial.key, "ranks": ranks})
        print(trial.depth, ranks, flush=True)
    first = [sum(t["ranks"][layer] == 0 for t in trials) for layer in range(backbone.num_layers)]
    record = run_record(backbone)
    result = {"benchmark": "infllm_score_layers", "record": record, "model": record["model"] | {"dtype": record["dtype"]},
              "protocol": method.describe(),
              "length": args.length, "set": split.describe(), "trials": trials, "ranked_first": first}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("ranked first, per layer:", first)


if __name__ == "__main__":
    main()
