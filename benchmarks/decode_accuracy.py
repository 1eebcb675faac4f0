"""How far a generated token's logits in bf16 are from fp32's: with the one-query kernel and with torch's SDPA.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_accuracy.py [--memory 2048] [--steps 64]
        [--data /work/shared/data] [--out benchmarks/results/decode_accuracy.json]

`xl` (4 sinks + memory-4) reads the first --memory tokens of the novels under --data in 512-token segments,
then the next --steps tokens one at a time, teacher-forced (each step is a generated token's forward:
one query over the whole memory). The same run is made three times in one process: fp32 (SDPA, the
reference), bf16 with the one-query kernel (`attend_one_query`, what decoding takes on CPU) and bf16 with
SDPA forced. For each bf16 run: the mean and largest absolute difference of the next-token logits from
fp32's, and how often the greedy choice (argmax) is the same. The text is built at run time (never
committed); its sha256 is recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_speed import method, text_ids  # noqa: E402

import longctx  # noqa: E402
from longctx.bench.record import run_record  # noqa: E402
from longctx.model import attention  # noqa: E402
from longctx.stream import forward_segment  # noqa: E402
from longctx.tasks.decode import ingest, plain_segments  # noqa: E402

SINKS = 4


def step_logits(dtype: str, sdpa: bool, args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, Any], Any]:
    """Next-token logits `[steps, vocab]` (fp32) of one-token steps after --memory tokens, what the text was,
    and the backbone that ran them."""
    kernel_choice = attention._sdpa_slow_for_one_query
    if sdpa:
        attention._sdpa_slow_for_one_query = lambda q: False  # type: ignore[assignment]
    try:
        backbone = longctx.load_backbone(dtype=dtype, threads=1)
        ids, text = text_ids(Path(args.data), backbone, args.memory + args.steps)
        m = method(backbone, "xl", memory=args.memory - SINKS, sinks=SINKS)
        state = ingest(backbone, m, plain_segments(ids[: args.memory], 512)).state
        head = backbone.model.get_output_embeddings().weight.float()
        rows = []
        with torch.inference_mode():
            for seg in plain_segments(ids[args.memory :], 1, start=args.memory):
                state, hidden, _ = forward_segment(backbone, m, state, seg)
                rows.append(hidden[-1].float() @ head.T)
        return torch.stack(rows), text, backbone
    finally:
        attention._sdpa_slow_for_one_query = kernel_choice  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--memory", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--out", default="benchmarks/results/decode_accuracy.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    reference, text, _ = step_logits("fp32", True, args)
    result: dict[str, Any] = {"benchmark": "decode_accuracy", "text": text, "memory": args.memory,
                              "steps": args.steps, "reference": "fp32 sdpa", "bf16": {}}
    for name, sdpa in (("one_query_kernel", False), ("sdpa", True)):
        got, _, backbone = step_logits("bf16", sdpa, args)
        diff = (got - reference).abs()
        result["bf16"][name] = {"mean_abs_logit_diff": float(diff.mean()), "max_abs_logit_diff": float(diff.max()),
                                "argmax_agrees": float((got.argmax(-1) == reference.argmax(-1)).float().mean())}
        print(name, json.dumps(result["bf16"][name]), flush=True)
    result["record"] = run_record(backbone, extra={"command": " ".join(["benchmarks/decode_accuracy.py", *sys.argv[1:]])})
    result["model"] = result["record"]["model"]  # the bf16 runs' model, as measured
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
