"""Snapshots: round trips for every method, resume exactness, refusals, damage, faults, memory commands."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from tiny_tokenizers import byte_bpe_tokenizer, sample_text
from typer.testing import CliRunner

import longctx
from longctx.cli import app
from longctx.errors import UsageError
from longctx.interrupts import stop_after
from longctx.methods import METHODS, get_method
from longctx.storage.checkpoint import Interrupted
from longctx.storage.snapshot import SnapshotError, SnapshotStore
from longctx.stream import forward_segment, run_stream
from longctx.text.segments import iter_segments
from longctx.text.tokens import TokenChunk

SMALL_OPTIONS = {"xl": {"memory": 24}, "sinks": {"window": 20}, "full": {"context": 48}, "window": {},
                 "longformer": {"window": 24}, "memorizing": {"window": 16, "memory": 40, "topk": 4, "block": 7},
                 "unimix": {"window": 16, "memory": 40, "topk": 2, "block": 7}, "rmt": {"tokens": 3},
                 "hmt": {"sensory": 4, "cache": 3},
                 "uio": {"memory_tokens": 2, "management": "fifo", "max_memory": 6},
                 "memoryllm": {"pool": 24, "update": 8},
                 "infllm": {"window": 16, "sinks": 2, "block": 8, "memory": 64, "topk": 2, "queries": 4}, "mplus": {"pool": 24, "update": 8, "ltm": 40, "retrieve": 8}}


def small(method: str) -> dict:
    """Options that make every policy (eviction, recompute) trigger within a short document."""
    return SMALL_OPTIONS.get(method, {})


@pytest.fixture
def book(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text(sample_text(2500), encoding="utf-8")
    return str(p)




def round_trip(backbone, method: str, n: int = 120, before: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the segments after the first `before` (of 16 tokens), read on from the live state
    and from its save -> load copy."""
    cls = get_method(method)
    m = cls(cls.Options.from_mapping(small(method)), backbone)
    ids = torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(3))
    segs = list(iter_segments([TokenChunk(ids.numpy(), np.arange(n), n, 0)], 16))
    first = run_stream(backbone, m, segs[:before])
    store = SnapshotStore()
    store.save("rt", m.state_tensors(first.state), {"note": "test"})
    reloaded = m.state_from_tensors(store.load("rt").tensors)
    with torch.inference_mode():
        outs = []
        for state in (first.state, reloaded):
            for seg in segs[before:]:
                state, hidden, _ = forward_segment(backbone, m, state, seg)
            outs.append(hidden)
    return outs[0], outs[1]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_round_trip_gives_identical_logits(tiny_backbone, method):
    """Template every method must pass: save -> load -> continue == never stopped, bit for bit."""
    live, reloaded = round_trip(tiny_backbone, method)
    assert torch.equal(live, reloaded)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_forward_plan_is_freed_by_reference_counting_alone(tiny_backbone, method):
    """A plan holds a segment's keys/values (and captured ones): a callback on it that refers back to it would
    be a reference cycle, keeping every forward's tensors alive until the garbage collector runs."""
    import gc
    import weakref

    cls = get_method(method)
    m = cls(cls.Options.from_mapping(small(method)), tiny_backbone)
    ids = torch.randint(3, 400, (120,), generator=torch.Generator().manual_seed(3))
    segs = list(iter_segments([TokenChunk(ids.numpy(), np.arange(120), 120, 0)], 16))
    state = run_stream(tiny_backbone, m, segs[:6]).state  # stores, pools and long-term stores hold entries now
    gc.disable()
    try:
        with torch.inference_mode():
            state, plan = m.read(state, segs[6])
            tiny_backbone.forward(segs[6].ids, plan, embeds=plan.embeds)
        ref = weakref.ref(plan)
        del plan
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_interrupt_then_resume_equals_uninterrupted(tiny_backbone, book, method):
    opts = {method: small(method)}
    whole = longctx.perplexity(book, [method], backbone=tiny_backbone, segment=16, options=opts,
                               allow_untrained=True)
    for after in (1, 3, 7):
        with pytest.raises(Interrupted, match="--resume") as exc:
            longctx.perplexity(book, [method], backbone=tiny_backbone, segment=16, options=opts,
                               save_memory=f"s{after}", stop=stop_after(after), allow_untrained=True)
        assert exc.value.exit_code == 130
        resumed = longctx.perplexity(book, backbone=tiny_backbone, resume=f"s{after}")
        a, b = whole.runs[0].result.sums, resumed.runs[0].result.sums
        assert (a.nll, a.tokens, a.bytes) == (b.nll, b.tokens, b.bytes)  # exact, not approximate
        assert a.block_nll == b.block_nll


def _same_run(a, b) -> None:
    """Bit for bit: every block's NLL sum, the token, byte and segment counts, the tokens seen."""
    x, y = a.runs[0].result, b.runs[0].result
    assert x.sums.block_nll == y.sums.block_nll and x.sums.block_tokens == y.sums.block_tokens
    assert (x.sums.bytes, x.sums.segments, x.tokens, x.next_byte) == (y.sums.bytes, y.sums.segments, y.tokens,
                                                                      y.next_byte)


@pytest.mark.parametrize("method", ["xl", "sinks", "full", "window", "memorizing"])
def test_finished_run_extends_to_longer_run_exactly(tiny_backbone, book, method):
    """--resume of a finished --max-tokens run continues to a larger --max-tokens (or the end) and equals the
    uninterrupted longer run bit for bit, the prediction past the first run's cut included."""
    opts = {method: small(method)}
    run = functools.partial(longctx.perplexity, book, backbone=tiny_backbone)
    first = run([method], segment=16, max_tokens=64, options=opts, save_memory="short")
    assert first.runs[0].result.sums.tokens == 63  # the token past the cut is predicted, not scored
    longer = run([method], segment=16, max_tokens=160, options=opts)
    _same_run(run(resume="short", max_tokens=160, save_memory="short", overwrite=True), longer)
    assert SnapshotStore().load("short", tensors=False).manifest["method"]["max_tokens"] == 160
    _same_run(run(resume="short", max_tokens="all"), run([method], segment=16, options=opts))


def test_extension_refusals_are_named(tiny_backbone, book, tmp_path):
    run = functools.partial(longctx.perplexity, backbone=tiny_backbone)
    run(book, ["xl"], segment=16, max_tokens=64, save_memory="e")
    with pytest.raises(SnapshotError, match="already read 64 tokens; --max-tokens 32 asks for fewer"):
        run(book, resume="e", max_tokens=32)
    run(book, ["xl"], segment=16, max_tokens=70, save_memory="mid")
    with pytest.raises(SnapshotError, match="ended at token 70, inside a segment of 16"):
        run(book, resume="mid", max_tokens=96)
    run(book, resume="mid")  # the same length: nothing to extend, nothing refused
    changed = tmp_path / "changed.txt"  # the same first 64 tokens, another 65th
    text = Path(book).read_bytes()
    end = SnapshotStore().load("e", tensors=False).manifest["document"]["bytes_consumed"]
    changed.write_bytes(text[:end] + b"###" + text[end:])
    with pytest.raises(SnapshotError, match="token 64 of the document differs"):
        run(str(changed), resume="e", max_tokens=96)
    with pytest.raises(SnapshotError, match="segment: snapshot has 16, this run asks for 32"):
        run(book, resume="e", max_tokens=96, segment=32)  # other set-up changes stay refused by name
    grown = tmp_path / "grown.txt"
    chars = Path(book).read_text(encoding="utf-8")
    grown.write_text(chars[:300], encoding="utf-8")
    run(str(grown), ["xl"], segment=16, save_memory="whole")  # read to its end: no prediction past it
    grown.write_text(chars[:600], encoding="utf-8")
    with pytest.raises(SnapshotError, match="the document is longer now"):
        run(str(grown), resume="whole", max_tokens="all")


def test_save_every_checkpoints_and_final_save(tiny_backbone, book):
    longctx.perplexity(book, ["xl"], backbone=tiny_backbone, segment=16, save_memory="ck", save_every=3,
                       options={"xl": small("xl")})
    snap = SnapshotStore().load("ck")
    assert snap.manifest["document"]["bytes_consumed"] == Path(book).stat().st_size
    assert snap.manifest["method"]["protocol"] == "xl(memory=24, sinks=4, positions=relative)"
    assert len([p for p in (SnapshotStore().root / "ck").iterdir() if p.name.startswith("v")]) == 2


def test_resume_refuses_changed_or_shorter_document(tiny_backbone, book, tmp_path):
    with pytest.raises(Interrupted):
        longctx.perplexity(book, ["xl"], backbone=tiny_backbone, segment=16, save_memory="d", stop=stop_after(4))
    changed = tmp_path / "changed.txt"
    text = Path(book).read_text(encoding="utf-8")
    changed.write_text("X" + text[1:], encoding="utf-8")
    with pytest.raises(SnapshotError, match="differ from those snapshot 'd' consumed"):
        longctx.perplexity(str(changed), backbone=tiny_backbone, resume="d")
    short = tmp_path / "short.txt"
    short.write_text(text[:40], encoding="utf-8")
    with pytest.raises(SnapshotError, match="shorter"):
        longctx.perplexity(str(short), backbone=tiny_backbone, resume="d")


def test_resume_refuses_other_setup_naming_each_difference(tiny_backbone, book):
    from longctx.model.backbone import Backbone, ModelInfo

    with pytest.raises(Interrupted):
        longctx.perplexity(book, ["xl"], backbone=tiny_backbone, segment=16, save_memory="o", stop=stop_after(2))
    with pytest.raises(SnapshotError, match=r"options: snapshot has .*memory': 2048.*memory': 64"):
        longctx.perplexity(book, backbone=tiny_backbone, resume="o", options={"xl": {"memory": 64}})
    with pytest.raises(SnapshotError, match="segment: snapshot has 16, this run asks for 32"):
        longctx.perplexity(book, backbone=tiny_backbone, resume="o", segment=32)
    with pytest.raises(SnapshotError, match="method: snapshot has 'xl'"):
        longctx.perplexity(book, ["sinks"], backbone=tiny_backbone, resume="o")
    other = Backbone(tiny_model(num_hidden_layers=3), byte_bpe_tokenizer(), ModelInfo("other", "test"))
    with pytest.raises(SnapshotError) as exc:
        longctx.perplexity(book, backbone=other, resume="o")
    # the architecture field that differs is named, not a hash; the weights are named by what they are
    assert "num_hidden_layers: snapshot has 2, this run has 3" in str(exc.value)
    assert "weights: snapshot has other weights" in str(exc.value)


def test_damaged_snapshots_are_named_and_left_alone(tiny_backbone):
    store = SnapshotStore()
    store.save("dmg", {"x": torch.arange(1000, dtype=torch.float32)}, {})
    vdir = store.version_dir("dmg")
    state = vdir / "state.safetensors"
    raw = bytearray(state.read_bytes())
    raw[-5] ^= 0xFF
    state.write_bytes(bytes(raw))
    before = sorted((p.name, p.stat().st_size) for p in vdir.iterdir())
    with pytest.raises(SnapshotError, match="state.safetensors is corrupted or was modified"):
        store.load("dmg")
    state.write_bytes(bytes(raw[:100]))
    with pytest.raises(SnapshotError, match="corrupted"):
        store.load("dmg")
    (vdir / "manifest.json").write_text("{not json")
    with pytest.raises(SnapshotError, match="not valid JSON"):
        store.load("dmg")
    (vdir / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(SnapshotError, match="format 99"):
        store.load("dmg")
    assert sorted(p.name for p in vdir.iterdir()) == [n for n, _ in before]
    with pytest.raises(SnapshotError, match="no snapshot named 'nope'"):
        store.load("nope")


def test_full_disk_fails_cleanly_and_keeps_previous(monkeypatch):
    import errno


    store = SnapshotStore()
    store.save("fd", {"x": torch.ones(3)}, {"n": 1})

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", no_space)  # the store imports it when writing
    with pytest.raises(SnapshotError, match="disk is full.*previous version"):
        store.save("fd", {"x": torch.zeros(3)}, {"n": 2})
    monkeypatch.undo()
    snap = store.load("fd")
    assert snap.manifest["n"] == 1 and torch.equal(snap.tensors["x"], torch.ones(3))
    assert not list((store.root / "fd").glob(".tmp-*"))


def test_second_writer_is_refused_not_corrupting():
    store = SnapshotStore()
    store.save("lk", {"x": torch.ones(2)}, {})
    with open(store.root / "lk" / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(SnapshotError, match="being written by another process"):
            store.save("lk", {"x": torch.zeros(2)}, {})
    assert torch.equal(store.load("lk").tensors["x"], torch.ones(2))


WRITER = """
import sys, torch
from longctx.storage.snapshot import SnapshotStore
store = SnapshotStore(sys.argv[1])
i = 0
while True:
    i += 1
    store.save("k", {"x": torch.full((200_000,), float(i)), "i": torch.tensor([i])}, {"i": i})
"""


def test_sigkill_during_writes_always_leaves_a_loadable_latest(tmp_path):
    """Kill a writer at random moments, many times: LATEST always names a complete, verified version."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root = tmp_path / "store"
    rng, last = random.Random(0), 0
    for _ in range(15):
        proc = subprocess.Popen([sys.executable, str(script), str(root)], stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while not (root / "k" / "LATEST").exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        snap = SnapshotStore(root).load("k")
        i = int(snap.tensors["i"][0])
        assert snap.manifest["i"] == i and float(snap.tensors["x"][0]) == float(i)
        assert i >= last
        last = i


def test_sigint_saves_and_exits_130_then_resume_matches(model_dir, tmp_path, isolated_home):
    doc = tmp_path / "long.txt"
    doc.write_text(sample_text(30_000), encoding="utf-8")
    env = {**os.environ, "LONGCTX_HOME": str(isolated_home), "LONGCTX_THREADS": "1"}
    base = [sys.executable, "-m", "longctx.cli", "ppl", str(doc), "--model", model_dir, "--segment", "8"]
    proc = subprocess.Popen(base + ["--jsonl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    for _ in range(3):
        proc.stdout.readline()  # the run is under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume interrupted-xl-" in err
    name = err.split("--resume ")[1].split()[0]
    resumed = subprocess.run(base[:-4] + ["--resume", name, "--json"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run(base + ["--json"], capture_output=True, text=True, env=env, timeout=300)
    a, b = json.loads(resumed.stdout)["runs"][0], json.loads(whole.stdout)["runs"][0]
    assert (a["nll_sum"], a["tokens"], a["bytes"]) == (b["nll_sum"], b["tokens"], b["bytes"])


def test_memory_commands(tiny_backbone, book, tmp_path):
    runner = CliRunner()
    longctx.perplexity(book, ["sinks"], backbone=tiny_backbone, segment=16, save_memory="m1",
                       options={"sinks": {"sinks": 2, "window": 20}})
    r = runner.invoke(app, ["memory", "ls", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["snapshots"][0]["name"] == "m1"
    r = runner.invoke(app, ["memory", "dump", "--json"])
    info = json.loads(r.stdout)
    assert info["source_available"] and [g["kind"] for g in info["groups"]] == ["sinks", "window"]
    assert info["groups"][0]["tokens"] == [0, 2] and info["groups"][0]["excerpt"]
    text = Path(book).read_bytes()
    g = info["groups"][1]
    assert " ".join(text[g["byte_start"]:g["byte_start"] + 20].decode("utf-8", "replace").split())[:10] in g["excerpt"]
    assert "window" in runner.invoke(app, ["memory", "dump", "m1"]).stdout
    assert json.loads(runner.invoke(app, ["memory", "show", "m1", "--json"]).stdout)["method"]["name"] == "sinks"
    out = tmp_path / "exported"
    assert runner.invoke(app, ["memory", "export", "m1", str(out)]).exit_code == 0
    assert runner.invoke(app, ["memory", "export", "m1", str(out)]).exit_code == 2  # never overwrites
    assert runner.invoke(app, ["memory", "import", str(out), "--name", "m2"]).exit_code == 0
    assert runner.invoke(app, ["memory", "rm", "m1"]).exit_code == 0
    names = [s["name"] for s in json.loads(runner.invoke(app, ["memory", "ls", "--json"]).stdout)["snapshots"]]
    assert names == ["m2"]
    assert runner.invoke(app, ["memory", "dump", "m1"]).exit_code == 2


def test_memory_ls_lists_the_healthy_snapshots_and_marks_a_damaged_one(tiny_backbone, book):
    with pytest.raises(Interrupted):
        longctx.perplexity(book, ["xl"], backbone=tiny_backbone, segment=16, save_memory="good", stop=stop_after(2))
    store = SnapshotStore()
    store.save("bad", {"x": torch.ones(8)}, {})
    (store.version_dir("bad") / "manifest.json").write_text("{not json")
    r = CliRunner().invoke(app, ["memory", "ls", "--json"])
    assert r.exit_code == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)["snapshots"]}
    assert rows["good"]["tokens"] == 32 and "damaged" not in rows["good"]
    assert "not valid JSON" in rows["bad"]["damaged"] and "longctx memory rm bad" in rows["bad"]["damaged"]
    table = CliRunner().invoke(app, ["memory", "ls"])
    assert table.exit_code == 0 and "DAMAGED" in table.stdout and "good" in table.stdout


def test_short_version_flag():
    r = CliRunner().invoke(app, ["-V"])
    assert r.exit_code == 0 and r.stdout.startswith("longctx ")


def test_save_memory_refuses_a_name_that_holds_another_document(tiny_backbone, book, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("A different text, read into memory under the same name. " * 20, encoding="utf-8")
    longctx.perplexity(book, ["xl"], backbone=tiny_backbone, segment=16, max_tokens=48, save_memory="m")
    before = SnapshotStore().load("m", tensors=False).manifest["document"]["path"]
    with pytest.raises(UsageError, match="snapshot 'm' already holds the memory of .*book.txt.*--overwrite"):
        longctx.perplexity(str(other), ["xl"], backbone=tiny_backbone, segment=16, max_tokens=48, save_memory="m")
    assert SnapshotStore().load("m", tensors=False).manifest["document"]["path"] == before  # nothing written
    longctx.perplexity(book, ["xl"], backbone=tiny_backbone, segment=16, max_tokens=48, save_memory="m")  # same doc
    longctx.perplexity(str(other), ["xl"], backbone=tiny_backbone, segment=16, max_tokens=48, save_memory="m",
                       overwrite=True)
    assert SnapshotStore().load("m", tensors=False).manifest["document"]["path"] == str(other.resolve())
