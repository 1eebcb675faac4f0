"""The parts of `longctx bench` result files: run records, the FLOP model and roofline, throughput rows."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from longctx.bench.record import run_record
from longctx.bench.roofline import (
    attended_keys,
    forward_flops,
    linear_params,
    measure_matmul_flops,
    roofline_ratio,
)
from longctx.bench.throughput import throughput, throughput_vs_length
from longctx.model.attention import ForwardOutputs, ForwardPlan
from longctx.run import build_method, environment

REPO = Path(__file__).resolve().parents[1]


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed))


# --- run_record --------------------------------------------------------------------------------------------


def test_run_record_has_every_field_and_is_json(tiny_backbone):
    rec = run_record(tiny_backbone, seed=7, extra={"suite": "unit"})
    for key in ("model", "dtype", "device", "versions", "git", "cpu_model", "cpus", "threads", "load_avg",
                "ram_total_mb", "gpu", "command", "timestamp_utc", "seed", "python"):
        assert key in rec, key
    assert set(environment()) <= set(rec)  # extends environment(), keys unchanged
    assert rec["seed"] == 7 and rec["suite"] == "unit"
    assert rec["model"]["model"] == "tiny-llama" and rec["dtype"] == "float32" and rec["device"] == "cpu"
    for lib in ("torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "longctx"):
        assert lib in rec["versions"]
    assert len(rec["load_avg"]) == 3
    json.loads(json.dumps(rec))  # serialisable as is, no default= needed


def test_run_record_git_commit_matches_the_checkout(tiny_backbone):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    git = run_record(tiny_backbone)["git"]
    assert git["commit"] == head.stdout.strip()
    porcelain = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    assert git["dirty"] == bool(porcelain.stdout.strip())


def test_git_state_is_none_outside_a_checkout(tmp_path):
    from longctx.bench.record import git_state

    assert git_state(tmp_path) is None


# --- FLOP model --------------------------------------------------------------------------------------------


def test_linear_params_match_the_models_linear_layers(tiny_backbone):
    model = tiny_backbone.model
    counted = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    params = linear_params(model.config)
    assert params["layers"] == counted
    assert params["lm_head"] == model.lm_head.weight.numel()


def test_forward_flops_formula(tiny_backbone):
    cfg = tiny_backbone.config  # 2 layers, 4 heads of 16 dims
    p = linear_params(cfg)
    attn = 2 * 2 * 4 * 16 * 2  # per (query, key) pair, all layers
    assert forward_flops(cfg, 10, 0.0, with_logits=False) == 2 * p["layers"] * 10
    assert forward_flops(cfg, 10, 5.5) == 2 * (p["layers"] + p["lm_head"]) * 10 + attn * 10 * 5.5


def test_smollm2_weights_flops_per_token():
    """The roofline anchor for SmolLM2-135M: 0.269 GFLOP per token, 69,120 FLOPs per attended key."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, vocab_size=49152)
    assert forward_flops(cfg, 1, 0.0) == pytest.approx(0.269e9, rel=2e-3)
    assert forward_flops(cfg, 1, 1.0) - forward_flops(cfg, 1, 0.0) == 69_120


def _plan(q: int, memory: list[int | None], mask: torch.Tensor | None = None,
          retrieved: dict[int, int] | None = None) -> ForwardPlan:
    m = max((x for x in memory if x is not None), default=0)
    keys = [None if x is None else torch.zeros(2, x, 16) for x in memory]
    picked = {layer: torch.zeros(4, q, k, dtype=torch.long) for layer, k in (retrieved or {}).items()}
    return ForwardPlan(query_pos=torch.arange(q), key_pos=torch.arange(m + q), mask=mask, memory_keys=keys,
                       out=ForwardOutputs(retrieved=picked))


def test_attended_keys_causal_memory_and_retrieval():
    q = 4
    assert attended_keys(_plan(q, [None, None]), q) == pytest.approx(2.5)  # (q+1)/2
    assert attended_keys(_plan(q, [6, 6]), q) == pytest.approx(6 + 2.5)
    # memory at one layer of two, 3 entries retrieved per query at the other
    assert attended_keys(_plan(q, [6, None], retrieved={1: 3}), q) == pytest.approx(2.5 + 6 / 2 + 3 / 2)


def test_attended_keys_counts_a_mask_exactly():
    q, m = 4, 6
    mask = torch.zeros(q, m + q, dtype=torch.bool)
    mask[:, :2] = True  # two sinks
    mask[:, m:] = torch.ones(q, q, dtype=torch.bool).tril()  # causal over the segment
    expected_mem = 2 + 2.5
    assert attended_keys(_plan(q, [m, None], mask=mask), q) == pytest.approx((expected_mem + 2.5) / 2)


def _windowed(q_pos: range, k_pos: range, window: int | None) -> float:
    """Keys per query by brute force: causal (key position <= query's), and within `window` of the query."""
    return sum(sum(1 for k in k_pos if k <= p and (window is None or p - k < window)) for p in q_pos) / len(q_pos)


@pytest.mark.parametrize("family", ["gemma3", "mistral", "llama"])
def test_attended_keys_counts_a_local_layer_only_within_its_window(family):
    """Gemma 3 (local next to global layers) and Mistral (every layer local): a local layer's keys are those
    within its sliding window of each query, with memory keys and without; a global layer counts them all."""
    from tiny_families import WINDOW, family_backbone

    backbone = family_backbone(family)
    windows = [backbone.layer_window(i) for i in range(backbone.num_layers)]
    assert windows == {"gemma3": [WINDOW, None], "mistral": [WINDOW, WINDOW], "llama": [None, None]}[family]
    m, q = 20, 32  # 20 memory keys at positions 0-19, then a 32-token segment at 20-51
    plain = ForwardPlan(query_pos=torch.arange(q), key_pos=torch.arange(q), memory_keys=[None, None])
    memory = _plan(q, [m, m])
    memory.query_pos = torch.arange(m, m + q)
    for plan, k_pos in ((plain, range(q)), (memory, range(m + q))):
        q_pos = range(int(plan.query_pos[0]), int(plan.query_pos[-1]) + 1)
        expected = sum(_windowed(q_pos, k_pos, w) for w in windows) / len(windows)
        assert attended_keys(plan, q, windows=windows) == pytest.approx(expected)
        if family != "llama":  # the window bites: fewer keys than the same plan on global layers
            assert attended_keys(plan, q, windows=windows) < attended_keys(plan, q, num_layers=2)
    # a band mask from the plan and the window together: both limits apply
    band = (torch.arange(m, m + q)[:, None] - torch.arange(m + q)[None, :]).abs() < 16
    memory.mask = band & (torch.arange(m + q)[None, :] <= torch.arange(m, m + q)[:, None])
    expected = sum(_windowed(range(m, m + q), range(m + q), min(w or 16, 16)) for w in windows) / len(windows)
    assert attended_keys(memory, q, windows=windows) == pytest.approx(expected)


def test_throughput_counts_local_layers_within_their_window():
    """The prefill FLOPs of a long plain read on Gemma 3's tiny config: its local layer attends at most its
    window, so xl with everything in memory costs less attention than the same read counted as all-global."""
    from tiny_families import WINDOW, family_backbone

    backbone = family_backbone("gemma3")
    ids, seg = _ids(48), 16
    xl, _ = build_method("xl", backbone, {"memory": 1024, "sinks": 0})
    r = throughput(backbone, xl, ids, segment=seg, decode_tokens=0)
    cfg = backbone.config
    per_segment = [(s + (seg + 1) / 2 + _windowed(range(s, s + seg), range(s + seg), WINDOW)) / 2
                   for s in range(0, 48, seg)]  # global layer: all earlier tokens + causal; local: its band
    assert r["prefill_flops"] == pytest.approx(sum(forward_flops(cfg, seg, k, with_logits=False) for k in per_segment))


def test_attended_keys_needs_layers_when_only_retrieval_says():
    plan = ForwardPlan(query_pos=torch.arange(2), key_pos=torch.arange(2),
                       out=ForwardOutputs(retrieved={1: torch.zeros(4, 2, 3, dtype=torch.long)}))
    with pytest.raises(ValueError):
        attended_keys(plan, 2)
    assert attended_keys(plan, 2, num_layers=2) == pytest.approx(1.5 + 1.5)


def test_measure_matmul_flops_is_quick_and_positive():
    t0 = time.perf_counter()
    r = measure_matmul_flops(torch.float32, "cpu", size=128, seconds=0.05, threads=1)
    assert time.perf_counter() - t0 < 2.0
    assert r["flops_per_s"] > 0 and math.isfinite(r["flops_per_s"])
    assert r["size"] == 128 and r["dtype"] == "float32" and r["device"] == "cpu" and r["repeats"] >= 1
    assert r["threads"] == 1


def test_roofline_ratio():
    assert roofline_ratio(100.0, 2e9, 1e12) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        roofline_ratio(1.0, 1.0, 0.0)


# --- throughput --------------------------------------------------------------------------------------------

FIELDS = ("method", "protocol", "segment", "prefill_tokens", "prefill_s", "prefill_tok_s", "prefill_flops",
          "prefill_flops_per_token", "decode_tokens", "decode_s", "decode_tok_s", "first_token_s",
          "decode_flops_per_token", "memory_entries", "peak_rss_mb", "peak_gpu_mb", "load_avg_1m",
          "machine_flops_per_s", "prefill_roofline", "decode_roofline", "prefill_cpu_s", "prefill_tok_per_cpu_s",
          "tail_tokens", "tail_tok_s", "tail_tok_per_cpu_s")


def test_throughput_rows_are_consistent(tiny_backbone):
    ids = _ids(96)
    xl, _ = build_method("xl", tiny_backbone, {"memory": 1024, "sinks": 4})
    window, _ = build_method("window", tiny_backbone)
    rows = {name: throughput(tiny_backbone, m, ids, segment=16, decode_tokens=5, machine_flops_per_s=1e12)
            for name, m in (("xl", xl), ("window", window))}
    for name, r in rows.items():
        assert set(FIELDS) <= set(r), name
        assert r["prefill_tokens"] == len(ids) and r["decode_tokens"] == 5
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["first_token_s"] >= r["prefill_s"]
        assert 0 < r["prefill_roofline"] < 1 and 0 < r["decode_roofline"] < 1
        json.dumps(r)
    assert rows["xl"]["memory_entries"] == len(ids) + 5  # everything fits: all prefill and decoded tokens
    assert rows["window"]["memory_entries"] == 0
    assert rows["window"]["prefill_flops_per_token"] < rows["xl"]["prefill_flops_per_token"]
    assert rows["window"]["decode_flops_per_token"] < rows["xl"]["decode_flops_per_token"]


def test_throughput_tail_covers_the_last_tokens_only(tiny_backbone, monkeypatch):
    """The tail rate is measured over whole segments at the end of the read, at least TAIL tokens of them."""
    from longctx.bench import throughput as tp

    monkeypatch.setattr(tp._Marks, "TAIL", 40)
    window, _ = build_method("window", tiny_backbone)
    r = throughput(tiny_backbone, window, _ids(96), segment=16, decode_tokens=0)
    assert r["tail_tokens"] == 48  # three 16-token segments: the fewest that hold 40 tokens
    assert r["tail_tok_s"] > 0 and r["prefill_tok_per_cpu_s"] > 0 and 0 < r["prefill_cpu_s"]


def test_throughput_prefill_flops_match_the_formula(tiny_backbone):
    """xl with room for everything reads [all earlier tokens; causal segment]: sum over segments by hand."""
    ids, seg = _ids(48), 16
    xl, _ = build_method("xl", tiny_backbone, {"memory": 1024, "sinks": 0})
    r = throughput(tiny_backbone, xl, ids, segment=seg, decode_tokens=0)
    cfg = tiny_backbone.config
    expected = sum(forward_flops(cfg, seg, s + (seg + 1) / 2, with_logits=False) for s in range(0, 48, seg))
    assert r["prefill_flops"] == pytest.approx(expected)
    assert r["decode_tokens"] == 0 and r["decode_tok_s"] is None and r["prefill_roofline"] is None


def test_throughput_vs_length_interleaves_methods(tiny_backbone):
    methods = {"window": build_method("window", tiny_backbone)[0], "xl": build_method("xl", tiny_backbone)[0]}
    seen = []
    rows = throughput_vs_length(tiny_backbone, methods, _ids(64), [32, 64], segment=16, decode_tokens=2,
                                on_row=seen.append)
    assert [(r["length"], r["name"]) for r in rows] == [(32, "window"), (32, "xl"), (64, "window"), (64, "xl")]
    assert rows == seen
    assert all(r["prefill_tokens"] == r["length"] and r["decode_tokens"] == 2 for r in rows)
    # fresh memory each run: xl holds exactly this length's tokens plus the decoded ones
    assert [r["memory_entries"] for r in rows if r["name"] == "xl"] == [34, 66]
    with pytest.raises(Exception, match="lengths"):
        throughput_vs_length(tiny_backbone, methods, _ids(10), [32], segment=16)


def test_readers_table_puts_a_length_just_under_a_column_in_it_and_says_so():
    """The in-window ceiling at "32k" reads 32,000-token documents (32,768 plus the question frame overflows a
    32k window): the readers table counts it in the 32k column and names the length it read."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("to_markdown", REPO / "benchmarks" / "to_markdown.py")
    assert spec is not None and spec.loader is not None
    to_markdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(to_markdown)

    def needle(length: int, correct: int) -> dict:
        return {"benchmark": "needle", "model": {"model": "qwen2.5-coder-1.5b", "dtype": "bfloat16"},
                "environment": {"load_avg_1m": 1.0},
                "cells": [{"method": "full", "length": length, "kind": "needle", "items": 4, "correct": correct,
                           "ingest_tokens_per_s": 20.0, "first_token_s": 2.0, "decode_tokens_per_s": 0.5},
                          {"method": "full", "length": length, "kind": "absent", "items": 1, "correct": 0}]}

    rows = to_markdown.readers([("a/x_8k.json", needle(8192, 4)), ("a/x_32000.json", needle(32000, 3))])
    row = next(r for r in rows if r.startswith("| qwen2.5-coder-1.5b"))
    assert "| 4/4 | 3/4 (32,000 tok) | not measured | not measured |" in row
    short = needle(8192, 0)  # a reader trained on 8,192 positions has no in-window ceiling at 32k
    short["model"] = {"model": "smollm2-135m", "dtype": "bfloat16", "arch": {"max_position_embeddings": 8192}}
    row = next(r for r in to_markdown.readers([("a/s.json", short)]) if r.startswith("| smollm2-135m"))
    assert "| 0/4 | — (window 8,192) | not measured | — (window 8,192) |" in row
    assert to_markdown._reader_column(16384) == 16384  # far from every column: a column of its own
    # a passkey file names the method (`infllm`), the command the preset it ran (`-m infllm-qa`): one row
    passkey = {"benchmark": "passkey", "model": {"model": "gemma-3-270m", "dtype": "bfloat16"},
               "methods": {"infllm": "infllm(queries=32, ...)"},
               "environment": {"command": ["longctx", "bench", "passkey", "emma.txt", "-m", "infllm-qa"]},
               "cells": [{"method": "infllm", "length": 8192, "trials": 2, "correct": 2}]}
    needle_qa = needle(8192, 4)
    needle_qa["model"]["model"] = "gemma-3-270m"
    for cell in needle_qa["cells"]:
        cell["method"] = "infllm-qa"
    rows = to_markdown.readers([("a/n.json", needle_qa), ("a/p.json", passkey)])
    assert [r.split(" | ")[1] for r in rows if r.startswith("| gemma")] == ["infllm-qa"]
    assert "| 4/4 | not measured | 2/2 | not measured |" in rows[2]
