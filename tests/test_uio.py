"""`uio` (UIO-LLMs) on tiny random Llamas: the decoder without memory is the base model, the encoder's mask and
positions are the paper's, incremental optimisation equals full BPTT when the reservoir holds every chunk,
the reservoir keeps each past chunk with probability W/t, importance weighting, memory management, exact
state round trips, and training through `longctx.tasks.trainer.Trainer` with adapters that round-trip."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizers import byte_bpe_tokenizer

from longctx.errors import UsageError
from longctx.methods import get_method
from longctx.methods.reservoir import Reservoir
from longctx.methods.uio import UIO, ChunkGraph, UIOOptions
from longctx.model.attention import ForwardPlan
from longctx.model.backbone import Backbone, ModelInfo
from longctx.model.lora import LoraSpec, add_lora, lora_parameters
from longctx.storage.adapters import attach_adapter, role_spec, save_adapter
from longctx.storage.snapshot import SnapshotStore
from longctx.stream import forward_segment, run_stream, step_nll
from longctx.tasks.samples import TokenCorpus, window_segments
from longctx.tasks.trainconfig import TrainConfig
from longctx.tasks.trainer import Trainer, unroll


def make(backbone: Backbone, **options) -> UIO:
    return UIO(UIOOptions.from_mapping(options), backbone)


def new_backbone(**overrides) -> Backbone:
    return Backbone(tiny_model(**overrides), byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))


def doc(segments: int, length: int, seed: int = 1) -> list:
    ids = torch.randint(3, 256, (segments * length + 1,), generator=torch.Generator().manual_seed(seed))
    return window_segments(ids, length)


def with_adapters(method: UIO, seed: int = 7) -> dict[str, list[torch.nn.Parameter]]:
    """Encoder and decoder LoRA (r=2) with random non-zero A and B, as a trained adapter has; base frozen."""
    b, gen = method.backbone, torch.Generator().manual_seed(seed)
    for p in b.model.parameters():
        p.requires_grad_(False)
    params = {}
    for role in method.lora_roles:
        name = f"test-{role}"
        params[role] = add_lora(b, name, role_spec(LoraSpec(r=2, alpha=4), method, role))
        b.lora_names.add(name)
        method.loras[role] = name
        with torch.no_grad():
            for p in params[role]:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    for p in (*params["encoder"], *params["decoder"], method.params.memory):  # adding a LoRA freezes the others
        p.requires_grad_(True)
    return params


def grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def clear(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def groups(method: UIO, loras: dict[str, list[torch.nn.Parameter]]) -> dict[str, list[torch.nn.Parameter]]:
    return {"memory vector": [method.params.memory], **loras}


def close(a: list[torch.Tensor], b: list[torch.Tensor], scale: float = 1.0) -> bool:
    return all(torch.allclose(x * scale, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))


# ---- decoder --------------------------------------------------------------------------------------------------
def test_without_memory_the_decoder_is_exactly_the_base_model(tiny_backbone):
    """First segment: logits equal a plain backbone's, even with non-zero encoder and decoder LoRA (their B
    is random); from the second segment on, memory changes them."""
    m = make(tiny_backbone, memory_tokens=4)
    with_adapters(m)
    plain = new_backbone()
    segs = doc(2, 16)
    pos = torch.arange(16)
    with torch.inference_mode():
        state, hidden, _ = forward_segment(tiny_backbone, m, m.init_state(), segs[0])
        reference = plain.forward(segs[0].ids, ForwardPlan(query_pos=pos, key_pos=pos))
        assert torch.equal(tiny_backbone.model.lm_head(hidden), plain.model.lm_head(reference))
        m.use_lora("decoder")  # the adapter is real: routed through it, the same forward differs
        with_lora = tiny_backbone.forward(segs[0].ids, ForwardPlan(query_pos=pos, key_pos=pos))
        m.use_lora(None)
        assert not torch.allclose(with_lora, reference)
        _, second, _ = forward_segment(tiny_backbone, m, state, segs[1])
        alone = plain.forward(segs[1].ids, ForwardPlan(query_pos=pos, key_pos=pos))
        assert not torch.allclose(second, alone, atol=1e-3)
    assert m.memory_size(state) == 4 and m.lora is None


# ---- encoder --------------------------------------------------------------------------------------------------
def test_encoder_mask_and_positions_are_the_papers(tiny_backbone):
    """Memory token i sits at (i+1)L//M and sees exactly tokens [0, (i+1)L//M) and itself; tokens are causal."""
    m = make(tiny_backbone, memory_tokens=4)
    length, ends = 10, [2, 5, 7, 10]
    plan = m.encoder_plan(length)
    assert plan.query_pos.tolist() == plan.key_pos.tolist() == list(range(length)) + ends
    for i in range(length):
        assert plan.mask[i].tolist() == [j <= i for j in range(length)] + [False] * 4
    for i, end in enumerate(ends):
        assert plan.mask[length + i].tolist() == [j < end for j in range(length)] + [k == i for k in range(4)]


def test_encoder_memory_is_each_layers_attention_input_of_the_memory_tokens(tiny_backbone):
    """h^0_mem is the first layer's input norm of the memory vector; changing token 5 of an 8-token segment
    (spans end at 2, 4, 6, 8) leaves memory tokens 0 and 1 unchanged at every layer and changes 2 and 3."""
    m = make(tiny_backbone, memory_tokens=4)
    with_adapters(m)
    seg = doc(1, 8)[0]
    with torch.inference_mode():
        h = m.encode(seg)
        assert h.shape == (2, 4, tiny_backbone.config.hidden_size)
        first = tiny_backbone.layer_norm_input(0, m.params.memory.expand(4, -1))
        assert torch.allclose(h[0], first, atol=1e-6)
        seg.ids = seg.ids.clone()
        seg.ids[5] = (seg.ids[5] + 1) % 256
        changed = m.encode(seg)
    assert torch.equal(h[:, :2], changed[:, :2])
    assert not torch.allclose(h[1, 2:], changed[1, 2:])
    assert tiny_backbone.active_lora is None  # back to base weights after the encoder


# ---- training ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["all", "last"])
def test_reservoir_holding_every_chunk_equals_full_bptt(tiny_backbone, loss):
    """W >= chunks: the gradients of backward_sample (encoder and decoder LoRA, memory vector) and its loss
    equal full BPTT's (`training.unroll(...)[0].backward()`)."""
    m = make(tiny_backbone, memory_tokens=2, reservoir=4)
    params = groups(m, with_adapters(m))
    every = [p for ps in params.values() for p in ps]
    segs = doc(4, 8)
    full_loss, _ = unroll(tiny_backbone, m, segs, bptt=None, loss=loss)
    full_loss.backward()
    reference = {k: grads(ps) for k, ps in params.items()}
    clear(every)
    value = m.backward_sample(segs, step_nll(tiny_backbone, m), loss=loss, weight=1.0, gen=torch.Generator().manual_seed(0))
    assert math.isclose(value, float(full_loss.detach()), rel_tol=1e-6)
    for k, ps in params.items():
        got = grads(ps)
        assert sum(float(g.abs().sum()) for g in reference[k]) > 0, k  # (the encoder's last layer gets none)
        assert close(reference[k], got), f"{k} gradients differ from full BPTT"


def test_small_reservoir_truncates_encoder_gradients_and_releases_each_graph_once(tiny_backbone, monkeypatch):
    """W = 1 < chunks: encoder gradients lose contributions (differ from full BPTT), decoder LoRA gradients
    stay exact, and every encoded chunk's graph is released exactly once."""
    m = make(tiny_backbone, memory_tokens=2, reservoir=1)
    params = groups(m, with_adapters(m))
    every = [p for ps in params.values() for p in ps]
    segs = doc(5, 8)
    unroll(tiny_backbone, m, segs, bptt=None, loss="all")[0].backward()
    reference = {k: grads(ps) for k, ps in params.items()}
    clear(every)
    released, release = [], ChunkGraph.release

    def spy(chunk: ChunkGraph) -> None:
        released.append(chunk.index)
        release(chunk)

    monkeypatch.setattr(ChunkGraph, "release", spy)
    m.backward_sample(segs, step_nll(tiny_backbone, m), loss="all", weight=1.0, gen=torch.Generator().manual_seed(0))
    assert sorted(released) == [0, 1, 2, 3]  # the last chunk is never encoded: nobody reads it
    assert not close(reference["encoder"], grads(params["encoder"]))
    assert not close(reference["memory vector"], grads(params["memory vector"]))
    assert close(reference["decoder"], grads(params["decoder"]))
    chunk = ChunkGraph(0, None, torch.zeros(1, requires_grad=True), torch.zeros(1, 4))
    with pytest.raises(RuntimeError, match="already released"):
        release(chunk)


def test_reservoir_keeps_every_past_chunk_with_probability_w_over_t():
    """Algorithm R: after t offers, chunk s < t is alive with probability min(1, W/t), whatever t - s
    (W=2, 12 chunks, 20,000 runs, each within 4 standard errors)."""
    size, chunks, runs = 2, 12, 20_000
    gen = torch.Generator().manual_seed(0)
    alive = [[0] * chunks for _ in range(chunks + 1)]
    for _ in range(runs):
        r: Reservoir[int] = Reservoir(size, gen)
        for c in range(chunks):
            leaving = r.offer(c)
            assert (leaving is None) == (c < size) and leaving not in r.items and len(r.items) == min(c + 1, size)
            for s in r.items:
                alive[c + 1][s] += 1
    for t in range(1, chunks + 1):
        p = min(1.0, size / t)
        se = math.sqrt(p * (1 - p) / runs)
        for s in range(t):
            assert abs(alive[t][s] / runs - p) <= 4 * se, (s, t, alive[t][s] / runs, p)
    assert r.drain() and not r.items


def test_importance_scales_the_gradient_reaching_memories_by_t_over_w(tiny_backbone, monkeypatch):
    """W=2, 4 segments, loss on the last: it reads t=3 memories, so with `importance` the leaves' gradients
    (and the encoder's and memory vector's) are 3/2 times those without; the decoder LoRA's are unchanged."""
    m = make(tiny_backbone, memory_tokens=2, reservoir=2)
    loras = with_adapters(m)
    weighted = make(tiny_backbone, memory_tokens=2, reservoir=2, importance=True)
    weighted.loras, weighted.params = m.loras, m.params
    params = groups(m, loras)
    every = [p for ps in params.values() for p in ps]
    leaves: dict[bool, dict[int, torch.Tensor]] = {False: {}, True: {}}
    release = ChunkGraph.release
    segs = doc(4, 8)
    out = {}
    for method in (m, weighted):
        on = method.options.importance

        def spy(chunk: ChunkGraph, on=on) -> None:
            if chunk.leaf.grad is not None:
                leaves[on][chunk.index] = chunk.leaf.grad.clone()
            release(chunk)

        monkeypatch.setattr(ChunkGraph, "release", spy)
        clear(every)
        method.backward_sample(segs, step_nll(method.backbone, method), loss="last", weight=1.0, gen=torch.Generator().manual_seed(3))
        out[on] = {k: grads(ps) for k, ps in params.items()}
    assert leaves[False].keys() == leaves[True].keys() and len(leaves[True]) == 2
    for i in leaves[True]:
        assert torch.allclose(leaves[False][i] * 1.5, leaves[True][i], rtol=1e-5, atol=1e-7)
    for k in ("encoder", "memory vector"):
        assert close(out[False][k], out[True][k], scale=1.5), k
    assert close(out[False]["decoder"], out[True]["decoder"])


# ---- management, options, state ---------------------------------------------------------------------------------
def test_fifo_keeps_the_newest_max_memory_entries_as_whole_segments(tiny_backbone):
    """max_memory 5 with 2 tokens per segment keeps the last 2 segments' memories, equal to an unbounded
    run's newest entries; `memory dump` names their segments and spans."""
    fifo = make(tiny_backbone, memory_tokens=2, management="fifo", max_memory=5)
    unbounded = make(tiny_backbone, memory_tokens=2)
    segs = doc(6, 8)
    kept, grown = (run_stream(tiny_backbone, m, segs).state for m in (fifo, unbounded))
    assert fifo.memory_size(kept) == 4 and unbounded.memory_size(grown) == 12
    assert torch.equal(kept.hidden, grown.hidden[:, -4:])
    assert torch.equal(kept.keys, grown.keys[:, :, -4:]) and torch.equal(kept.values, grown.values[:, :, -4:])
    rows = fifo.dump(kept)
    assert [r["kind"] for r in rows] == ["memory of segment 4", "memory of segment 5"]
    assert [r["tokens"] for r in rows] == [[32, 40], [40, 48]] and all(r["entries"] == 2 for r in rows)
    assert "FIFO of 5" in fifo.unimem().management and "grows by 2" in unbounded.unimem().management


def test_fifo_memory_in_its_room_equals_concatenation_step_by_step(tiny_backbone):
    """At inference the fifo memory lives in a preallocated room (rowroom.py): 40 segments through a memory of
    3 segments equal the autograd path's concatenate-then-slice at every step (hidden states of every
    segment and the memory itself), while most writes append in place; a fork continued second copies."""
    fifo = make(tiny_backbone, memory_tokens=2, management="fifo", max_memory=6)
    segs = doc(40, 4)
    room_state, plain_state, rooms = fifo.init_state(), fifo.init_state(), set()
    for seg in segs:
        with torch.inference_mode():
            room_state, h_room, _ = forward_segment(tiny_backbone, fifo, room_state, seg)
        with torch.enable_grad():
            plain_state, h_plain, _ = forward_segment(tiny_backbone, fifo, plain_state, seg)
        assert plain_state.room is None and room_state.room is not None
        assert torch.equal(h_room, h_plain.detach())
        assert torch.equal(room_state.hidden, plain_state.hidden.detach())
        assert torch.equal(room_state.keys, plain_state.keys.detach())
        rooms.add(id(room_state.room))
    assert len(rooms) <= 40 // 5  # re-allocated only when full
    with torch.inference_mode():
        fork = fifo.fork_state(room_state)
        first, _, _ = forward_segment(tiny_backbone, fifo, room_state, segs[0])
        second, _, _ = forward_segment(tiny_backbone, fifo, fork, segs[1])
        assert second.room is not first.room  # the second writer copied: the first's rows are untouched
        again, _, _ = forward_segment(tiny_backbone, fifo, fifo.fork_state(room_state), segs[0])
    assert torch.equal(first.hidden[:, :-2], room_state.hidden[:, 2:])
    assert torch.equal(again.hidden, first.hidden)


def test_unbounded_memory_refuses_a_read_past_the_trained_positions():
    """64 trained positions, 16-token segments, 8 memory tokens each: segment 7 would need 56 + 16 = 72."""
    backbone = new_backbone(max_position_embeddings=64)
    m = make(backbone, memory_tokens=8)
    segs = doc(10, 16)
    with pytest.raises(UsageError, match=r"reached 56 memory entries after 7 segments.*72 positions, past the "
                                         r"model's trained 64.*management: fifo"):
        run_stream(backbone, m, segs)
    fifo = make(backbone, memory_tokens=8, management="fifo", max_memory=48)
    assert run_stream(backbone, fifo, segs).sums.tokens == 160
    m.check_segment(56)
    with pytest.raises(UsageError, match="65 positions"):
        m.check_segment(57)
    with pytest.raises(UsageError, match="keeps up to 48 memory entries"):
        fifo.check_segment(17)


@pytest.mark.parametrize("options, key", [({"memory_tokens": 0}, "memory_tokens"), ({"reservoir": 0}, "reservoir"),
                                          ({"management": "fifo", "memory_tokens": 4, "max_memory": 3}, "max_memory"),
                                          ({"management": "lru"}, "management"), ({"importance": 2}, "importance")])
def test_bad_options_are_refused_naming_the_key(options, key):
    with pytest.raises(UsageError, match=key):
        UIOOptions.from_mapping(options)


def test_declared_roles_and_untrained_protocol(tiny_backbone):
    m = get_method("uio")(UIOOptions(), tiny_backbone)
    assert m.lora_roles == {"encoder": ("q_proj", "v_proj"), "decoder": ("k_proj", "v_proj")}
    assert m.main_role is None and m.param_options == () and m.writes_per_segment
    assert "UNTRAINED" in m.describe() and m.options.memory_tokens == 16 and m.options.reservoir == 2
    eos = tiny_backbone.model.get_input_embeddings().weight[tiny_backbone.tokenizer.eos_token_id]
    assert torch.equal(m.params.memory[0], eos.detach().float())


def test_state_round_trip_recomputes_memory_kv_exactly_with_a_trained_adapter(tiny_backbone):
    """Only the hidden states are persisted; reloading recomputes K/V through the decoder adapter bit for bit
    (not through the base weights), and the continuation is identical."""
    m = make(tiny_backbone, memory_tokens=2)
    with_adapters(m)
    segs = doc(5, 8)
    first = run_stream(tiny_backbone, m, segs[:3]).state
    store = SnapshotStore()
    store.save("u", m.state_tensors(first), {"note": "test"})
    tensors = store.load("u").tensors
    assert set(tensors) == {"hidden", "spans", "counters"}
    reloaded = m.state_from_tensors(tensors)
    assert torch.equal(reloaded.keys, first.keys) and torch.equal(reloaded.values, first.values)
    base = make(tiny_backbone, memory_tokens=2).state_from_tensors(tensors)  # no adapter: base k/v weights
    assert not torch.allclose(base.keys, first.keys)
    with torch.inference_mode():
        outs = []
        for state in (first, reloaded):
            for seg in segs[3:]:
                state, hidden, _ = forward_segment(tiny_backbone, m, state, seg)
            outs.append(hidden)
    assert torch.equal(outs[0], outs[1])


def test_generation_past_a_segment_writes_memory_as_ingesting_the_text_would(tiny_backbone):
    from longctx.tasks.decode import greedy, ingest, plain_segments

    m = make(tiny_backbone, memory_tokens=2)
    with_adapters(m)
    prompt = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(2))
    done = ingest(tiny_backbone, m, plain_segments(prompt, 16))
    out, after = greedy(tiny_backbone, m, done, 12)
    assert len(after.pending) == 4 and m.memory_size(after.state) == 6
    full = ingest(tiny_backbone, m, plain_segments(torch.cat((prompt, torch.tensor(out[:8], dtype=torch.long))), 16))
    a, b = m.state_tensors(after.state), m.state_tensors(full.state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- end to end ---------------------------------------------------------------------------------------------------
def test_trainer_trains_uio_and_the_adapter_round_trips_both_roles(tmp_path):
    """Two Trainer steps with tune=lora: finite loss; both LoRA roles and the memory vector change; the saved
    adapter, attached to a fresh method on a fresh backbone, gives identical logits."""
    backbone = new_backbone()
    m = make(backbone, memory_tokens=2)
    corpus = TokenCorpus([torch.randint(3, 256, (400,), generator=torch.Generator().manual_seed(4))], [])
    cfg = TrainConfig(segment=8, curriculum=((3, 2),), tune="lora", lora=LoraSpec(r=2, alpha=4), warmup=1,
                      lr=1e-2, backbone_lr=1e-2)
    trainer = Trainer(backbone, m, corpus, cfg)
    lora_b = {role: [p for n, p in backbone.model.named_parameters() if f".{m.loras[role]}." in n and "lora_B" in n]
              for role in m.lora_roles}
    before = {role: [p.detach().clone() for p in ps] for role, ps in lora_b.items()}
    memory = m.params.memory.detach().clone()
    result = trainer.run()
    assert result.steps == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    for role, ps in lora_b.items():
        assert ps and any(not torch.equal(p, q) for p, q in zip(ps, before[role])), f"{role} LoRA did not train"
    assert not torch.equal(m.params.memory, memory) and m.params.memory.grad.abs().sum() > 0
    out = str(tmp_path / "adapters" / "tiny-uio")
    save_adapter(out, m, backbone, "lora", cfg.lora, {"steps": 2})
    fresh_backbone = new_backbone()
    fresh = make(fresh_backbone, memory_tokens=2)
    attach_adapter(fresh, out, fresh_backbone)
    assert set(fresh.loras) == {"encoder", "decoder"} and "adapter=tiny-uio@" in fresh.describe()
    for role in fresh.loras:
        assert len(lora_parameters(fresh_backbone, fresh.loras[role])) == len(lora_parameters(backbone, m.loras[role]))
    segs = doc(3, 8, seed=9)
    with torch.inference_mode():
        logits = []
        for b, method in ((backbone, m), (fresh_backbone, fresh)):
            state = method.init_state()
            for seg in segs:
                state, hidden, _ = forward_segment(b, method, state, seg)
            logits.append(b.model.lm_head(hidden))
    assert torch.equal(logits[0], logits[1])
