"""Trainable memories on tiny random Llamas: BPTT depth, memory that really learns, resumable training,
adapters that round-trip and refuse what does not fit, and the `train` / `adapters` commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model
from tiny_tokenizers import byte_bpe_tokenizer, sample_text
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

import longctx
from longctx.cli import app
from longctx.errors import UsageError
from longctx.methods import get_method
from longctx.model.backbone import Backbone, ModelInfo
from longctx.model.lora import LoraSpec
from longctx.run import build_method
from longctx.storage.adapters import attach_adapter, save_adapter
from longctx.storage.snapshot import SnapshotError, SnapshotStore
from longctx.stream import run_stream
from longctx.tasks.recall import RecallTask, recall_accuracy
from longctx.tasks.samples import window_segments
from longctx.tasks.trainconfig import TrainConfig, parse_curriculum
from longctx.tasks.trainer import Trainer, unroll

runner = CliRunner()
ROOT = Path(__file__).parents[1]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
TASK = RecallTask(fact=[290], question=[291], keys=list(range(300, 308)))


def trainable_backbone(seed: int = 0, **overrides) -> Backbone:
    """A tiny Llama with transformers' default (trainable) initialisation."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval()
    return Backbone(model, byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))


def make(name: str, backbone: Backbone, **options):
    cls = get_method(name)
    return cls(cls.Options.from_mapping(options), backbone)


def memory_tensor(state) -> torch.Tensor:
    if hasattr(state, "local"):  # unimix: its RMT part
        return state.tokens.memory
    return state.memory if hasattr(state, "memory") else state.cache


UNIMIX = {"rmt_tokens": 2, "window": 4, "memory": 8, "topk": 2, "sinks": 0}


@pytest.mark.parametrize("name, options", [("rmt", {"tokens": 2}), ("hmt", {"sensory": 2, "cache": 3}),
                                           ("unimix", UNIMIX)])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_bptt_depth_gradient_reaches_exactly_the_last_k_segments(tiny_backbone, name, options, k):
    """Loss on the last of 5 segments: the memory entering segment i has a gradient iff i >= 5 - k; the
    learned initial memory gets one only when the chain reaches segment 0 (k >= 4)."""
    m = make(name, tiny_backbone, **options)
    ids = torch.randint(3, 256, (5 * 8 + 1,), generator=torch.Generator().manual_seed(1))
    entering = {}

    def keep(i, state):
        t = memory_tensor(state)
        if t.requires_grad and t.shape[0]:
            t.retain_grad()
        entering[i] = t

    loss, _ = unroll(tiny_backbone, m, window_segments(ids, 8), bptt=k, loss="last", on_enter=keep)
    loss.backward()
    for i in range(1, 5):
        g = entering[i].grad
        if i >= 5 - k:
            assert g is not None and g.abs().sum() > 0, f"segment {i} lost its gradient at k={k}"
        else:
            assert g is None and not entering[i].requires_grad, f"segment {i} kept a gradient at k={k}"
    init = m.params.memory.grad
    if k >= 4:
        assert init is not None and init.abs().sum() > 0
    else:
        assert init is None or torch.count_nonzero(init) == 0


@pytest.mark.parametrize("name, options", [("rmt", {"tokens": 4}), ("hmt", {"sensory": 0, "cache": 4}),
                                           ("unimix", {**UNIMIX, "rmt_tokens": 4, "memory": 0})])
def test_memory_learns_the_recall_task_the_no_memory_model_cannot(name, options):
    """Key in segment 1, question at the end of segment 3 (8-token segments): trained with memory, recall is
    near perfect; the same backbone fine-tuned the same way without memory stays near chance (1/8)."""
    cfg = TrainConfig(segment=8, curriculum=((1, 200), (2, 200), (3, 400)), loss="answer", tune="full", lr=3e-3,
                      backbone_lr=3e-3, warmup=20)
    accuracy = {}
    for method, opts in ((name, options), ("window", {})):
        backbone = trainable_backbone()
        m = make(method, backbone, **opts)
        Trainer(backbone, m, TASK, cfg).run()
        accuracy[method] = recall_accuracy(backbone, m, TASK, segments=3, segment=8, samples=100)["accuracy"]
    assert accuracy[name] >= 0.9, accuracy
    assert accuracy["window"] <= 0.3, accuracy


def test_checkpoint_resume_is_bit_identical(tiny_backbone):
    cfg = TrainConfig(segment=8, curriculum=((1, 2), (2, 4)), tune="lora", lora=LoraSpec(r=2, alpha=4), warmup=2)
    task = RecallTask(fact=[290], question=[291], keys=list(range(300, 308)))

    def run(stop_at: int | None) -> list[torch.Tensor]:
        backbone = Backbone(tiny_model(), byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))
        store = SnapshotStore(SnapshotStore().root.parent / "ckpt")
        t = Trainer(backbone, make("rmt", backbone, tokens=2), task, cfg, checkpoints=store, checkpoint_name="c")
        t.load_checkpoint()
        while t.step < (stop_at or cfg.steps):
            t.train_step()
        if stop_at:
            t.save_checkpoint()
        return [p.detach().clone() for p in t.params]

    straight = run(None)
    SnapshotStore(SnapshotStore().root.parent / "ckpt").root.mkdir(parents=True, exist_ok=True)
    run(3)
    resumed = run(None)
    assert len(straight) == len(resumed) > 2
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))



def test_stop_at_ends_a_bounded_run_validated_and_going_on_trains_as_one_run(tiny_backbone):
    """`--stop-at`: the run ends at that step with a validation there, keeping the whole curriculum's
    schedule, so going on afterwards gives exactly the parameters of one straight run."""
    cfg = TrainConfig(segment=8, curriculum=((1, 2), (2, 4)), tune="lora", lora=LoraSpec(r=2, alpha=4), warmup=2)
    task = RecallTask(fact=[290], question=[291], keys=list(range(300, 308)))
    val = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(3))

    def trainer() -> Trainer:
        backbone = Backbone(tiny_model(), byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))
        return Trainer(backbone, make("rmt", backbone, tokens=2), task, cfg, validation=val)

    bounded = trainer()
    first = bounded.run(stop_at=3)
    assert first.steps == 3 and [v["step"] for v in first.validation] == [0, 3]
    bounded.run()
    straight = trainer()
    straight.run()
    assert bounded.step == straight.step == cfg.steps
    assert all(torch.equal(a, b) for a, b in zip(bounded.params, straight.params))


def trained_adapter(tmp_path, tune: str = "lora") -> tuple[Backbone, object, str]:
    backbone = Backbone(tiny_model(), byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))
    m = make("rmt", backbone, tokens=2)
    cfg = TrainConfig(segment=8, curriculum=((2, 3),), tune=tune, lora=LoraSpec(r=2, alpha=4), warmup=1)
    Trainer(backbone, m, TASK, cfg).run()
    out = str(tmp_path / "adapters" / "tiny-rmt")
    save_adapter(out, m, backbone, tune, cfg.lora if tune == "lora" else None, {"steps": 3})
    return backbone, m, out


def test_adapter_round_trip_reproduces_the_trained_method(tmp_path):
    backbone, trained, path = trained_adapter(tmp_path)
    ids = torch.randint(3, 256, (41,), generator=torch.Generator().manual_seed(5))
    before = run_stream(backbone, trained, window_segments(ids, 8)).sums.nll
    fresh = Backbone(tiny_model(), byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))
    loaded, _ = build_method("rmt", fresh, {"tokens": 2}, adapter=path)
    assert loaded.adapter["name"] == "tiny-rmt" and "adapter=tiny-rmt@" in loaded.describe()
    assert run_stream(fresh, loaded, window_segments(ids, 8)).sums.nll == before
    reference_backbone = Backbone(tiny_model(), byte_bpe_tokenizer(), ModelInfo("tiny-llama", "test"))
    reference = run_stream(reference_backbone, build_method("xl", reference_backbone)[0], window_segments(ids, 8)).sums.nll
    # the LoRA is off for methods without it: right after loading (before the trained method ever ran) ...
    other = Backbone(tiny_model(), byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))
    build_method("rmt", other, {"tokens": 2}, adapter=path)
    assert run_stream(other, build_method("xl", other)[0], window_segments(ids, 8)).sums.nll == reference
    # ... and after it ran
    plain, _ = build_method("xl", fresh)
    assert run_stream(fresh, plain, window_segments(ids, 8)).sums.nll == reference


def test_untrained_method_refuses_unless_allowed(tiny_backbone):
    with pytest.raises(UsageError, match="--allow-untrained"):
        build_method("hmt", tiny_backbone)
    m, _ = build_method("hmt", tiny_backbone, allow_untrained=True)
    assert "UNTRAINED" in m.describe()


def test_adapter_that_does_not_fit_is_refused_naming_the_difference(tmp_path):
    _, _, path = trained_adapter(tmp_path)
    other = Backbone(tiny_model(hidden_size=32, intermediate_size=64), byte_bpe_tokenizer(), ModelInfo("tiny-llama", "test"))
    with pytest.raises(SnapshotError, match="hidden_size: adapter was trained on 64, this model has 32"):
        build_method("rmt", other, {"tokens": 2}, adapter=path)
    with pytest.raises(SnapshotError, match="option tokens"):
        build_method("rmt", Backbone(tiny_model(), byte_bpe_tokenizer(), ModelInfo("tiny-llama", "test")),
                     {"tokens": 3}, adapter=path)
    with pytest.raises(SnapshotError, match="method"):
        m = make("hmt", Backbone(tiny_model(), byte_bpe_tokenizer(), ModelInfo("tiny-llama", "test")))
        attach_adapter(m, path, m.backbone)


def test_train_honours_the_environment_and_the_user_config(model_dir, tmp_path, isolated_home, monkeypatch):
    """`train` resolves its settings like every command: LONGCTX_* env, then LONGCTX_HOME/config.yaml."""
    import longctx.run

    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.yaml").write_text("threads: 1\ndtype: fp16\n")
    monkeypatch.setenv("LONGCTX_DTYPE", "bf16")  # env beats the user config
    monkeypatch.setenv("LONGCTX_MODEL", model_dir)
    seen = {}

    class Loaded(Exception):
        pass

    def load(model, **kwargs):
        seen.update(model=model, **kwargs)
        raise Loaded

    monkeypatch.setattr(longctx.run, "load_backbone", load)
    with pytest.raises(Loaded):
        longctx.train([str(tmp_path / "unused.txt")], "rmt", str(tmp_path / "out"), TrainConfig())
    assert seen == {"model": model_dir, "dtype": "bf16", "device": "cpu", "threads": 1}


def test_curriculum_parsing_and_schedule():
    cfg = TrainConfig(curriculum=parse_curriculum("1:2, 4:3"))
    assert [cfg.segments_at(s) for s in range(6)] == [1, 1, 4, 4, 4, 4] and cfg.steps == 5
    for bad in ("", "2", "a:b", "1:2:3"):
        with pytest.raises(UsageError):
            parse_curriculum(bad)


@pytest.mark.parametrize("flag, value, allowed", [("--task", "qa", "lm, recall, facts"), ("--loss", "first", "all, last, answer"),
                                                   ("--tune", "bias", "memory, lora, full")])
def test_cli_train_refuses_an_unknown_choice(tmp_path, flag, value, allowed):
    """--task/--loss/--tune are checked against their Literals before a model is loaded (exit 2, the choices)."""
    r = runner.invoke(app, ["train", str(tmp_path / "none.txt"), "--method", "rmt", "--out", "x", flag, value])
    assert r.exit_code == 2 and f"{flag} must be one of {allowed} (got '{value}')" in r.stderr


def test_cli_train_then_ppl_with_the_adapter(model_dir, tmp_path):
    book, val = tmp_path / "train.txt", tmp_path / "val.txt"
    book.write_text(sample_text(4000), encoding="utf-8")
    val.write_text(sample_text(1500, seed=3), encoding="utf-8")
    r = runner.invoke(app, ["train", str(book), "--method", "rmt", "--out", "mine", "--model", model_dir, "--segment",
                            "16", "--curriculum", "1:2,2:2", "--tune", "memory", "--validation", str(val),
                            "--val-tokens", "64", "--json", "--no-progress", "-o", "tokens=2", "--dtype", "fp32"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["steps"] == 4 and out["tokens"] == 16 * (2 + 4) and len(out["validation_ppl"]) == 2
    assert out["data"][0]["sha256"] and out["command"].startswith("longctx")
    assert out["config"]["curriculum"] == [[1, 2], [2, 2]] and out["config"]["tune"] == "memory"
    listed = json.loads(runner.invoke(app, ["adapters", "--json"]).stdout)["adapters"]
    assert [a["name"] for a in listed if a["where"] == "user"] == ["mine"]
    base = ["ppl", str(val), "--model", model_dir, "--method", "rmt", "--segment", "16", "-o", "tokens=2", "--json"]
    refused = runner.invoke(app, base)
    assert refused.exit_code == 2 and "--allow-untrained" in refused.stderr
    ok = runner.invoke(app, [*base, "--adapter", "mine"])
    assert ok.exit_code == 0, ok.output
    assert "adapter=mine@" in json.loads(ok.stdout)["runs"][0]["protocol"]
    untrained = runner.invoke(app, [*base, "--allow-untrained"])
    assert untrained.exit_code == 0 and json.loads(untrained.stdout)["runs"][0]["untrained"] is True
    assert "UNTRAINED" in untrained.stderr


def test_resume_of_an_adapter_run_reattaches_the_same_adapter(tmp_path):
    backbone, _, path = trained_adapter(tmp_path)
    doc = tmp_path / "doc.txt"
    doc.write_text(sample_text(1500), encoding="utf-8")
    opts = {"rmt": {"tokens": 2}}
    whole = longctx.perplexity(str(doc), ["rmt"], backbone=backbone, segment=16, options=opts, adapter=path)
    from longctx.interrupts import stop_after
    from longctx.storage.checkpoint import Interrupted

    with pytest.raises(Interrupted):
        longctx.perplexity(str(doc), ["rmt"], backbone=backbone, segment=16, options=opts, adapter=path,
                           save_memory="a", stop=stop_after(2))
    resumed = longctx.perplexity(str(doc), backbone=backbone, resume="a")
    assert resumed.runs[0].result.sums.nll == whole.runs[0].result.sums.nll


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")
def test_train_under_ddp_two_processes_equals_one_with_the_same_global_batch(model_dir, tmp_path, isolated_home):
    """2 CPU processes x 1 sample per step (gradients averaged by DDP) == 1 process x 2 samples per step."""
    book = tmp_path / "train.txt"
    book.write_text(sample_text(5000), encoding="utf-8")
    common = ["train", str(book), "--method", "rmt", "--model", model_dir, "--segment", "16", "--curriculum",
              "1:2,2:2", "--tune", "lora", "--lora-r", "2", "-o", "tokens=2", "--dtype", "fp32", "--no-progress",
              "--json"]
    one = runner.invoke(app, [*common, "--out", str(tmp_path / "one" / "a"), "--accumulate", "2"])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "LONGCTX_HOME": str(isolated_home), "LONGCTX_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "longctx", *common, "--out",
                        str(tmp_path / "two" / "a")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout)  # rank 0 alone reports
    assert two["processes"] == 2 and json.loads(one.stdout)["processes"] == 1
    assert two["tokens"] == json.loads(one.stdout)["tokens"]
    a = SnapshotStore(tmp_path / "one").load("a").tensors
    b = SnapshotStore(tmp_path / "two").load("a").tensors
    assert a.keys() == b.keys() and any(k.startswith("lora.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_memory_dump_of_hmt_lists_each_cached_segment_with_its_text(tiny_backbone, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(sample_text(1500), encoding="utf-8")
    longctx.perplexity(str(book), ["hmt"], backbone=tiny_backbone, segment=32, save_memory="h", allow_untrained=True,
                       options={"hmt": {"sensory": 4, "cache": 3}})
    info = json.loads(runner.invoke(app, ["memory", "dump", "h", "--json"]).stdout)
    groups = info["groups"]
    assert [g["kind"].split(" of ")[0] for g in groups] == ["memory", "memory", "memory", "sensory tokens"]
    last = groups[2]
    assert last["tokens"][1] == info["tokens_consumed"] and groups[3]["tokens"] == [last["tokens"][1] - 4, last["tokens"][1]]
    text = book.read_bytes()
    assert " ".join(text[last["byte_start"]:last["byte_start"] + 10].decode("utf-8", "replace").split())[:5] in last["excerpt"]
    assert "UNTRAINED" in info["method"]


@pytest.mark.parametrize("name, options", [("rmt", {"tokens": 2}), ("hmt", {"sensory": 3, "cache": 4}),
                                           ("unimix", UNIMIX)])
def test_generation_past_a_segment_writes_memory_as_ingesting_the_text_would(tiny_backbone, name, options):
    """Memory-token methods hold a pending segment while generating: each token equals what re-reading the
    whole text so far predicts, and crossing the segment length writes exactly the memory ingestion writes."""
    from longctx.tasks.decode import greedy, ingest, plain_segments

    m = make(name, tiny_backbone, **options)
    prompt = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(2))
    done = ingest(tiny_backbone, m, plain_segments(prompt, 16))
    assert len(done.pending) == 8
    out, after = greedy(tiny_backbone, m, done, 12)
    assert len(after.pending) == 4 and after.tokens == 52
    for t in range(12):  # the reference re-reads everything from scratch
        again = ingest(tiny_backbone, m, plain_segments(torch.cat((prompt, torch.tensor(out[:t], dtype=torch.long))), 16))
        with torch.inference_mode():
            assert int(tiny_backbone.model.lm_head(again.last_hidden).argmax()) == out[t]
    full = ingest(tiny_backbone, m, plain_segments(torch.cat((prompt, torch.tensor(out[:8], dtype=torch.long))), 16))
    a, b = m.state_tensors(after.state), m.state_tensors(full.state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, options, cached", [("rmt", {"tokens": 2}, True), ("hmt", {"sensory": 3, "cache": 4}, True),
                                                   ("hmt", {"sensory": 3, "cache": 4, "summary": "current"}, False),
                                                   ("unimix", UNIMIX, False)])
def test_a_pending_segment_continues_from_its_keys_and_values_where_the_method_allows(tiny_backbone, name, options,
                                                                                      cached):
    """Generating into a pending segment runs only the new token after the kept keys/values of the rows before
    it, where those rows do not depend on the segment's tokens; each step's hidden state equals a full re-read."""
    from longctx.tasks import decode

    m = make(name, tiny_backbone, **options)
    prompt = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(2))
    done = decode.ingest(tiny_backbone, m, decode.plain_segments(prompt, 16))
    assert (done.pending_kv is not None) == cached
    for token in torch.randint(3, 256, (7,), generator=torch.Generator().manual_seed(3)).tolist():
        with torch.inference_mode():
            nxt = decode._advance(tiny_backbone, m, done, token)
            reread = decode._advance(tiny_backbone, m, replace(done, pending_kv=None), token)
        assert (nxt.pending_kv is not None) == cached
        if cached:
            assert nxt.last_plan.embeds.shape[0] == 1 and nxt.pending_kv.rows == done.pending_kv.rows + 1
        torch.testing.assert_close(nxt.last_hidden, reread.last_hidden, rtol=1e-5, atol=1e-5)
        done = nxt


@pytest.mark.parametrize("name, options", [("rmt", {"tokens": 2}), ("hmt", {"sensory": 2, "cache": 3}),
                                           ("unimix", UNIMIX)])
def test_validation_between_steps_leaves_training_usable(tiny_backbone, name, options):
    """Validation runs in inference mode; nothing it caches may break the next training step."""
    cfg = TrainConfig(segment=8, curriculum=((3, 4),), tune="memory", validate_every=2, val_tokens=40)
    held_out = torch.randint(3, 256, (100,), generator=torch.Generator().manual_seed(4))
    result = Trainer(tiny_backbone, make(name, tiny_backbone, **options), TASK, cfg, validation=held_out).run()
    assert [v["step"] for v in result.validation] == [0, 2, 4] and result.steps == 4


def test_many_documents_and_passkey_take_the_adapter_flags(model_dir, tmp_path):
    docs = []
    for i in range(2):
        p = tmp_path / f"d{i}.txt"
        p.write_text(sample_text(1200 if i else 4000, seed=i), encoding="utf-8")
        docs.append(str(p))
    base = ["ppl", *docs, "--model", model_dir, "-m", "rmt", "--segment", "16", "-o", "tokens=2", "--json"]
    refused = runner.invoke(app, base)
    assert refused.exit_code == 2 and "--allow-untrained" in refused.stderr
    r = runner.invoke(app, [*base, "--allow-untrained"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kind"] == "corpus" and "UNTRAINED" in r.stdout
    pk = ["bench", "passkey", docs[0], "--model", model_dir, "-m", "rmt", "--lengths", "200", "--trials", "1",
          "--segment", "64", "--max-new-tokens", "2", "--json", "-o", "tokens=2"]
    refused = runner.invoke(app, pk)
    assert refused.exit_code == 2 and "--allow-untrained" in refused.stderr
    ok = runner.invoke(app, [*pk, "--allow-untrained"])
    assert ok.exit_code == 0, ok.output
    assert "UNTRAINED" in json.loads(ok.stdout)["methods"]["rmt"]


def test_switching_adapters_never_changes_which_weights_train(tiny_backbone):
    """peft's adapter switch freezes the adapters it turns off; a method with two adapters (UIO, MemoryLLM)
    trains the one it has just switched away from, so `activate` must leave requires_grad as it was."""
    from longctx.model.lora import activate, add_lora, lora_parameters

    for name in ("a", "b"):
        for p in add_lora(tiny_backbone, name, LoraSpec(r=2, alpha=4)):
            p.requires_grad_(True)
    frozen = next(p for n, p in tiny_backbone.model.named_parameters() if "base_layer" in n)
    for name in ("a", None, "b", "a"):
        activate(tiny_backbone, name)
        assert all(p.requires_grad for n in ("a", "b") for p in lora_parameters(tiny_backbone, n))
        assert not frozen.requires_grad
