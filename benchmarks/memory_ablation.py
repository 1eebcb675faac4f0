"""How much of a trained method's PPL gain is its memory, and how much its LoRA's domain adaptation?

Each trained method runs twice on the same held-out tokens, in one process: as trained, and with its
memory forgotten before every segment (the state reset to the learned initial memory), which keeps the
LoRA, the memory slots and the learned initial memory but carries nothing across segments. `window`
(base weights, no memory) is the reference.

    .venv/bin/python benchmarks/memory_ablation.py ../shared/data/austen_persuasion.txt --tokens 32768 \
        -o benchmarks/results/memory_ablation.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import longctx
from longctx.run import build_method, environment
from longctx.stream import run_stream
from longctx.text.segments import iter_segments
from longctx.text.textio import open_source
from longctx.text.tokens import iter_tokens


class Forgetful:
    """`method` with its memory reset before every segment (what it does without recurrence)."""

    def __init__(self, method):
        self.inner, self.name, self.lora = method, method.name + " (memory reset every segment)", method.lora

    def __getattr__(self, key):
        return getattr(self.inner, key)

    def write(self, state, seg, plan):
        return self.inner.init_state()


def score(backbone, method, path: str, segment: int, tokens: int) -> dict:
    with open_source(path) as src:
        segs = iter_segments(iter_tokens(backbone.tokenizer, src.blocks()), segment, max_tokens=tokens)
        res = run_stream(backbone, method, segs)
    return {"method": method.name, "tokens": res.sums.tokens, "nll_sum": res.sums.nll,
            "ppl": math.exp(res.sums.nll / res.sums.tokens), "token_sha256": res.token_digest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("heldout")
    ap.add_argument("--methods", default="rmt,hmt")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    backbone = longctx.load_backbone(threads=a.threads)
    runs = [score(backbone, build_method("window", backbone)[0], a.heldout, a.segment, a.tokens)]
    for name in a.methods.split(","):
        method = build_method(name, backbone)[0]
        runs.append({**score(backbone, method, a.heldout, a.segment, a.tokens), "protocol": method.describe()})
        runs.append(score(backbone, Forgetful(method), a.heldout, a.segment, a.tokens))
        print(runs[-2]["method"], runs[-2]["ppl"], runs[-1]["ppl"], file=sys.stderr)
    assert len({r["token_sha256"] for r in runs}) == 1, "methods saw different tokens"
    out = {"command": " ".join(["python", *sys.argv]), "heldout": a.heldout, "segment": a.segment,
           "model": dict(backbone.fingerprint), "environment": environment(), "runs": runs}
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
