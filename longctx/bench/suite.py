"""`longctx bench --suite`: every method side by side on every axis, one process, the same tokens and items.

Parts (each optional): long-text PPL by position with paired deltas against `sinks`; passkey past the
window; needle QA (with `rag`); retention vs distance (one fact at the start, the question N tokens later);
bAbI qa1-style reasoning; prefill/decode throughput and peak memory vs input length with the roofline
ratio. Sizes come from the suite: `cpu-small` fits about 15 minutes on a 2-core CPU with the default model
in bf16, `gpu` is sized for a lent GPU. Trained methods load their presets' adapters; a method that would
run untrained says so in its protocol. Every accuracy comparison against the reference method is paired
over the same items, with a standard error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..errors import UsageError
from ..model.backbone import Backbone

ALL_METHODS = ("sinks", "window", "xl", "full", "longformer", "memorizing", "memorizing-fast", "unimix",
               "unimix-rmt", "rmt", "hmt")
# the compressive memories read each segment twice (a write pass): in the GPU suite, not in cpu-small's 15 min
COMPRESSIVE = ("uio", "memoryllm", "mplus")
LATER = ("infllm",)  # added after cpu-small's 15-minute budget was measured: GPU suite (or --method) until re-measured
REFERENCE = "sinks"  # the strongest training-free peer (StreamingLLM), so deltas say what memory adds
PARTS = ("ppl", "passkey", "needle", "retention", "babi", "throughput")
QA_PARTS = ("needle", "retention", "babi")  # answered through `ask`, so `rag` can take part


@dataclass(frozen=True)
class Suite:
    """The sizes of every part."""

    name: str
    segment: int = 512
    ppl_tokens: int = 8192
    passkey_lengths: tuple[int, ...] = (4096,)
    passkey_trials: int = 2
    needle_lengths: tuple[int, ...] = (4096,)
    needle_documents: int = 1
    needles: int = 2
    retention_distances: tuple[int, ...] = (1024, 4096)
    babi_lengths: tuple[int, ...] = (1024,)
    babi_samples: int = 2
    throughput_lengths: tuple[int, ...] = (1024, 4096)
    decode_tokens: int = 8
    max_new_tokens: int = 32
    seed: int = 0
    methods: tuple[str, ...] = ALL_METHODS  # run when --method is not given


SUITES = {
    "cpu-small": Suite("cpu-small"),
    "gpu": Suite("gpu", ppl_tokens=32768, passkey_lengths=(16384, 32768), passkey_trials=5,
                 needle_lengths=(8192, 32768), needle_documents=2, needles=4, retention_distances=(2048, 8192, 32768),
                 babi_lengths=(2048, 8192), babi_samples=5, throughput_lengths=(1024, 8192, 32768), decode_tokens=32,
                 max_new_tokens=48, methods=ALL_METHODS + LATER + COMPRESSIVE),
}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise UsageError(f"unknown suite '{name}'; available: {', '.join(SUITES)}") from None


@dataclass
class SuiteResult:
    suite: Suite
    methods: list[str]
    parts: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "benchmark": "suite", "suite": asdict(self.suite), "methods": self.methods,
                "reference": REFERENCE, "parts": self.parts, "seconds": self.seconds,
                "leaders": leaders(self.parts, self.methods), "record": self.record}


def run_suite(name: str | Suite, book: str, *, methods: Sequence[str] | None = None,
              parts: Sequence[str] | None = None, rag: bool = True, model: str | None = None,
              dtype: str | None = None, device: str | None = None, threads: int | None = None,
              backbone: Backbone | None = None, on_part: Callable[[str, float], None] | None = None) -> SuiteResult:
    """Run the suite's parts over `book` (text for PPL, filler for the synthetic tasks) with every method;
    the question-answering parts also run the `rag` baseline unless `rag` is False."""
    from ..cpus import load_averages
    from ..text.textio import open_source
    from .record import bench_backbone, run_record

    suite = name if isinstance(name, Suite) else get_suite(name)
    with open_source(book):  # a missing or unreadable book fails now, not after the model has loaded
        pass
    names = list(methods or suite.methods)
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    names.sort(key=lambda m: m != REFERENCE)  # the reference first: PPL deltas are against the first method
    chosen = list(parts or PARTS)
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        raise UsageError(f"unknown suite part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    backbone = bench_backbone(backbone, model=model, dtype=dtype, device=device, threads=threads)
    result = SuiteResult(suite, names, record=run_record(backbone, seed=suite.seed, extra={"suite": suite.name}))
    qa = [*names, "rag"] if rag else names
    for part in chosen:
        t0 = time.perf_counter()
        result.parts[part] = RUNNERS[part](backbone, suite, qa if part in QA_PARTS else names, book)
        result.seconds[part] = time.perf_counter() - t0
        if on_part is not None:
            on_part(part, result.seconds[part])
    result.record["load_avg_end"] = load_averages()
    return result


# ---- parts --------------------------------------------------------------------------------------------------

def _ppl(backbone: Backbone, suite: Suite, names: list[str], book: str) -> dict[str, Any]:
    from ..tasks.perplexity import perplexity

    report = perplexity(book, names, backbone=backbone, segment=suite.segment, max_tokens=suite.ppl_tokens)
    out = report.to_dict()
    return {"runs": out["runs"], "deltas": out["deltas"], "source": out["source"]}


def _built(backbone: Backbone, names: list[str]):
    from ..run import build_method

    return [build_method(n, backbone)[0] for n in names]


def _passkey(backbone: Backbone, suite: Suite, names: list[str], book: str) -> dict[str, Any]:
    from .passkey import PasskeyConfig, passkey

    config = PasskeyConfig(lengths=suite.passkey_lengths, depths=(0.25, 0.5, 0.75), trials=suite.passkey_trials,
                           seed=suite.seed, segment=suite.segment)
    return passkey(backbone, _built(backbone, names), book, config, labels=names).to_dict()


def _needle(backbone: Backbone, suite: Suite, names: list[str], book: str) -> dict[str, Any]:
    from .needle import NeedleConfig, needle_qa

    config = NeedleConfig(lengths=suite.needle_lengths, trials=suite.needle_documents, needles=suite.needles,
                          seed=suite.seed, max_new_tokens=suite.max_new_tokens)
    return needle_qa(backbone, names, book, config).to_dict()


def _retention(backbone: Backbone, suite: Suite, names: list[str], book: str) -> dict[str, Any]:
    from .needle import NeedleConfig, needle_qa

    config = NeedleConfig(lengths=suite.retention_distances, trials=1, needles=1, seed=suite.seed + 1,
                          max_new_tokens=suite.max_new_tokens, depths=(0.0,))
    return needle_qa(backbone, names, book, config).to_dict()


def _babi(backbone: Backbone, suite: Suite, names: list[str], book: str) -> dict[str, Any]:
    from .babi import BabiConfig, babi_qa

    config = BabiConfig(lengths=suite.babi_lengths, samples=suite.babi_samples, seed=suite.seed,
                        max_new_tokens=suite.max_new_tokens)
    return babi_qa(backbone, names, book, config).to_dict()


def _throughput(backbone: Backbone, suite: Suite, names: list[str], book: str) -> dict[str, Any]:
    from ..text.textio import open_source
    from .roofline import measure_matmul_flops
    from .throughput import throughput_vs_length

    machine = measure_matmul_flops(backbone.dtype, backbone.device.type)
    with open_source(book) as src:
        text = "".join(b.text for b in src.blocks())
    need = max(suite.throughput_lengths)
    ids = torch.tensor(backbone.tokenizer(text[: need * 8], add_special_tokens=False)["input_ids"][:need])
    methods = dict(zip(names, _built(backbone, names)))
    rows = throughput_vs_length(backbone, methods, ids, list(suite.throughput_lengths), segment=suite.segment,
                                decode_tokens=suite.decode_tokens, machine_flops_per_s=machine["flops_per_s"])
    return {"machine": machine, "rows": rows}


RUNNERS: dict[str, Callable[[Backbone, Suite, list[str], str], dict[str, Any]]] = {
    "ppl": _ppl, "passkey": _passkey, "needle": _needle, "retention": _retention, "babi": _babi,
    "throughput": _throughput}


# ---- comparisons --------------------------------------------------------------------------------------------

def paired_accuracy(items: list[dict[str, Any]], method: str, reference: str) -> dict[str, Any] | None:
    """Accuracy difference of `method` minus `reference` over the items both answered, ± its standard error
    (the items are paired: the same prompt for both)."""
    def key(r):
        return (r.get("length"), r.get("trial"), r.get("question") or r.get("key"), r.get("depth"))

    ref = {key(r): bool(r["correct"]) for r in items if r["method"] == reference}
    diffs = [int(bool(r["correct"])) - int(ref[key(r)]) for r in items if r["method"] == method and key(r) in ref]
    if not diffs:
        return None
    n, mean = len(diffs), sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    return {"items": n, "difference": mean, "se": se}


def _accuracy_by_method(part: dict[str, Any], kind: str | None = None) -> dict[str, float]:
    cells = [c for c in part.get("cells", []) if kind is None or c.get("kind") == kind]
    out: dict[str, list[int]] = {}
    for c in cells:
        n = c.get("trials", c.get("items", c.get("samples", 0)))
        ok = c["correct"]
        tot = out.setdefault(c["method"], [0, 0])
        tot[0] += ok
        tot[1] += n
    return {m: ok / n for m, (ok, n) in out.items() if n}


def leaders(parts: dict[str, Any], methods: list[str]) -> list[dict[str, Any]]:
    """Which method leads each axis, its value, and the reference's, with the paired difference."""
    rows = []
    if "ppl" in parts:
        ppl = {r["method"]: r["ppl"] for r in parts["ppl"]["runs"]}
        best = min(ppl, key=ppl.__getitem__)
        delta = next((d for d in parts["ppl"]["deltas"] if d["method"] == best), None)
        rows.append({"axis": "PPL (lower is better)", "leader": best, "value": ppl[best],
                     "reference": ppl.get(REFERENCE), "vs_reference": delta})
    for part, kind in (("passkey", None), ("needle", "needle"), ("needle", "absent"), ("retention", "needle"),
                       ("babi", None)):
        if part not in parts:
            continue
        acc = _accuracy_by_method(parts[part], kind)
        if not acc:
            continue
        best = max(acc, key=acc.__getitem__)
        items = parts[part].get("trials") or parts[part].get("items") or []
        items = [r for r in items if kind is None or r.get("kind") == kind]
        label = part if kind in (None, "needle") else f"{part} ({kind} fact)"
        rows.append({"axis": f"{label} accuracy", "leader": _tied(acc, best), "value": acc[best],
                     "reference": acc.get(REFERENCE), "vs_reference": paired_accuracy(items, best, REFERENCE)})
    if "throughput" in parts:
        longest = max(r["prefill_tokens"] for r in parts["throughput"]["rows"])
        at = {r.get("name", r["method"]): r for r in parts["throughput"]["rows"] if r["prefill_tokens"] == longest}
        for metric, label, better in (("prefill_tok_s", "prefill tok/s", max), ("decode_tok_s", "decode tok/s", max),
                                      ("peak_rss_mb", "peak RSS MiB (lower is better)", min)):
            vals = {m: r[metric] for m, r in at.items() if r.get(metric) is not None}
            if vals:
                best = better(vals, key=vals.__getitem__)
                rows.append({"axis": f"{label} at {longest:,} tokens", "leader": best, "value": vals[best],
                             "reference": vals.get(REFERENCE), "vs_reference": None})
    return rows


def _tied(values: dict[str, float], best: str) -> str:
    """The leader's name, or every method sharing its value ("none" when that value is 0: nobody leads)."""
    tied = [m for m, v in values.items() if v == values[best]]
    if values[best] == 0:
        return "none (all 0)"
    return best if len(tied) == 1 else ", ".join(tied) + " (tie)"


def with_overrides(suite: Suite, **sizes: Any) -> Suite:
    """The suite with some sizes replaced (e.g. for a quick smoke run)."""
    return replace(suite, **{k: v for k, v in sizes.items() if v is not None})
