"""Forward speed of one reader in fp32 and bf16 on this machine, and what `--dtype auto` picks here.

    .venv/bin/python benchmarks/dtype_speed.py BOOK.txt [--model DIR|ID | --gguf FILE] [--tokens 512]
        [--reps 3] [--threads 1] [--out benchmarks/results/dtype_NAME.json]

One segment of --tokens tokens of BOOK (from character 20,000 on) is read and scored through the longctx
backbone (the `window` path: one forward plus the chunked NLL), --reps times per dtype, alternating the
dtypes so that a change in machine load hits both; the median tok/s is reported with every repetition. The
bf16 model is the fp32 one cast (a GGUF is de-quantised to fp32 by transformers first), so both score the
same weights; the NLL per token of each is recorded too.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from longctx.bench.record import run_record
from longctx.cpus import load_averages
from longctx.model.attention import ForwardPlan
from longctx.model.backbone import Backbone, ModelInfo
from longctx.model.identity import weights_sha256
from longctx.model.models import _cpu_has_native_bf16, auto_dtype, load_backbone, set_threads

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_models(args) -> tuple[dict[str, Backbone], str]:
    """A backbone per dtype over the same weights, and the model's name."""
    if args.gguf is None:
        return {name: load_backbone(args.model, dtype=name) for name in DTYPES}, args.model or "smollm2-135m"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    fp32 = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    sha = weights_sha256(fp32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    info = ModelInfo(model_id=gguf.stem, source=f"gguf:{gguf.name}", weights_sha256=sha)
    return {"fp32": Backbone(fp32, tok, info), "bf16": Backbone(bf16, tok, info)}, gguf.stem


def read_once(backbone: Backbone, ids: torch.Tensor) -> tuple[float, float]:
    """Seconds for one forward + NLL over `ids`, and the mean NLL per scored token."""
    pos = torch.arange(len(ids))
    t0 = time.perf_counter()
    with torch.inference_mode():
        hidden = backbone.forward(ids, ForwardPlan(query_pos=pos, key_pos=pos))
        nll = backbone.token_nll(hidden[:-1], ids[1:])
    return time.perf_counter() - t0, float(nll.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("book")
    ap.add_argument("--model", default=None, help="HF directory or id (default: the embedded model)")
    ap.add_argument("--gguf", default=None, help="a GGUF file to de-quantise and measure instead")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    load_start = load_averages()
    models, name = load_models(args)
    text = Path(args.book).read_text(encoding="utf-8")[20_000:]
    ids = torch.tensor(models["fp32"].tokenizer(text)["input_ids"][: args.tokens])
    times: dict[str, list[float]] = {d: [] for d in DTYPES}
    nll: dict[str, float] = {}
    for _ in range(args.reps):
        for d, backbone in models.items():
            seconds, nll[d] = read_once(backbone, ids)
            times[d].append(seconds)
    rows = [{"dtype": d, "tok_s_median": round(len(ids) / statistics.median(times[d]), 1),
             "tok_s_each": [round(len(ids) / s, 1) for s in times[d]], "nll_per_token": round(nll[d], 4)}
            for d in DTYPES]
    result = {"model_name": name, "tokens": len(ids), "reps": args.reps,
              "native_bf16_cpu": _cpu_has_native_bf16(),
              "auto_picks": str(auto_dtype(torch.device("cpu"))).removeprefix("torch."),
              "rows": rows, "load_avg_start": load_start, "load_avg_end": load_averages(),
              "record": run_record(models["fp32"])}
    for r in rows:
        print(f"{name} {r['dtype']}: {r['tok_s_median']} tok/s (each {r['tok_s_each']}), NLL/token {r['nll_per_token']}")
    print(f"--dtype auto picks {result['auto_picks']} here (native bf16 matmuls: {result['native_bf16_cpu']})")
    out = Path(args.out or f"benchmarks/results/dtype_{name}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
