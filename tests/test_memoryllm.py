"""`memoryllm` and `mplus` on tiny random Llamas: the null memory is the base model after BOS, random drops
keep exactly N in order and replay from the state, short segments are not written, positions, the long-term
store (provenance, pruning, retrieval, recall counts), the retriever's detached BCE, training both adapters
and the adapter round trip."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizers import byte_bpe_tokenizer

from longctx.errors import UsageError
from longctx.methods import get_method
from longctx.methods.memoryllm import SEGMENT, UPDATE
from longctx.methods.mplus import LongTerm
from longctx.model.attention import ForwardPlan
from longctx.model.backbone import Backbone, ModelInfo
from longctx.model.lora import LoraSpec, add_lora, lora_parameters
from longctx.run import build_method
from longctx.storage.adapters import role_spec, save_adapter
from longctx.storage.snapshot import SnapshotStore
from longctx.stream import forward_segment, run_stream, scored_nll
from longctx.tasks.samples import TokenCorpus, window_segments
from longctx.tasks.trainconfig import TrainConfig
from longctx.tasks.trainer import Trainer

SMALL = {"pool": 6, "update": 4}
PLUS = {**SMALL, "ltm": 100, "retrieve": 5}


def make(name: str, backbone: Backbone, **options):
    cls = get_method(name)
    return cls(cls.Options.from_mapping(options), backbone)


def fresh_backbone() -> Backbone:
    return Backbone(tiny_model(), byte_bpe_tokenizer(), ModelInfo(model_id="tiny-llama", source="test"))


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed))


def tagged(backbone: Backbone, first: int, k: int) -> torch.Tensor:
    """`[layers, k, d]` random slots whose channel 0 holds their id (first, first+1, ...) in every layer."""
    delta = torch.randn(backbone.num_layers, k, backbone.config.hidden_size, generator=torch.Generator().manual_seed(first))
    delta[:, :, 0] = torch.arange(first, first + k, dtype=torch.float32)
    return delta


def fill(m, state, updates: int, k: int | None = None):
    """`updates` self-updates of synthetic tagged slots (ids 0, 1, ...), each from its own fake segment."""
    k = k or m.options.update
    for u in range(updates):
        row = torch.tensor([state.segments, state.updates, 16 * u, 16 * u + 16, 100 * u, 100 * u + 90])
        state = m.add_slots(state, tagged(m.backbone, u * k, k), row)
    return state


@pytest.mark.parametrize("name", ["memoryllm", "mplus"])
def test_empty_pool_untrained_is_the_base_model_reading_after_bos(tiny_backbone, name):
    m = make(name, tiny_backbone, **(PLUS if name == "mplus" else SMALL))
    x = ids(20)
    seg = window_segments(torch.cat((x, x[:1])), 20)[0]
    with torch.inference_mode():
        _, hidden, plan = forward_segment(tiny_backbone, m, m.init_state(), seg)
        bos = torch.tensor([byte_bpe_tokenizer().bos_token_id])
        pos = torch.arange(21)
        base = tiny_backbone.forward(torch.cat((bos, x)), ForwardPlan(query_pos=pos, key_pos=pos))[1:]
        logits, expected = tiny_backbone.model.lm_head(hidden), tiny_backbone.model.lm_head(base)
    assert plan.memory_len == 1
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_random_drop_keeps_exactly_n_in_order_the_same_slots_per_layer_and_replays(tiny_backbone):
    m = make("memoryllm", tiny_backbone, **SMALL)
    state = m.init_state()
    sizes = []
    for u in range(8):
        state = fill(m, state, 1) if u == 0 else m.add_slots(state, tagged(tiny_backbone, 4 * u, 4),
                                                             torch.tensor([u, u, 0, 16, 0, 15]))
        sizes.append(len(state))
        held = state.pool[:, :, 0]
        assert torch.equal(held, held[:1].expand_as(held))  # every layer dropped the same slots
        assert bool((held[0][1:] > held[0][:-1]).all())  # the survivors keep their order
        assert held[0][-4:].tolist() == list(range(4 * u, 4 * u + 4))  # the new slots come last
        assert torch.equal(state.origin[:, UPDATE], (held[0] // 4).long())  # provenance follows each slot
    assert sizes == [4, 6, 6, 6, 6, 6, 6, 6]
    assert state.updates == 8

    def drops(seed: int, start=None) -> list[list[int]]:
        mm = make("memoryllm", tiny_backbone, **SMALL, init_seed=seed)
        st = start if start is not None else fill(mm, mm.init_state(), 2)
        out = []
        for u in range(2, 6):
            st = mm.add_slots(st, tagged(tiny_backbone, 4 * u, 4), torch.tensor([u, u, 0, 16, 0, 15]))
            out.append(st.pool[0, :, 0].long().tolist())
        return out

    assert drops(0) == drops(0) and drops(0) != drops(1)
    # a state saved mid-way replays the rest of the draws exactly
    mid = fill(m, m.init_state(), 2)
    mid = m.add_slots(mid, tagged(tiny_backbone, 8, 4), torch.tensor([2, 2, 0, 16, 0, 15]))
    reloaded = m.state_from_tensors({k: v.clone() for k, v in m.state_tensors(mid).items()})
    a, b = mid, reloaded
    for u in range(3, 7):
        a = m.add_slots(a, tagged(tiny_backbone, 4 * u, 4), torch.tensor([u, u, 0, 16, 0, 15]))
        b = m.add_slots(b, tagged(tiny_backbone, 4 * u, 4), torch.tensor([u, u, 0, 16, 0, 15]))
    assert all(torch.equal(x, y) for x, y in zip(m.state_tensors(a).values(), m.state_tensors(b).values()))


def test_segments_shorter_than_min_context_are_read_but_not_written(tiny_backbone):
    m = make("memoryllm", tiny_backbone, **SMALL)
    short, long = window_segments(ids(6), 5)[0], window_segments(ids(21), 20)[0]
    with torch.inference_mode():
        state, _, _ = forward_segment(tiny_backbone, m, m.init_state(), short)
        assert len(state) == 0 and (state.skipped, state.updates, state.segments) == (1, 0, 1)
        assert torch.equal(state.rng, m.init_state().rng)
        state, _, _ = forward_segment(tiny_backbone, m, state, long)
    assert len(state) == 4 and (state.skipped, state.updates) == (1, 1)
    assert state.origin[0, SEGMENT] == 1  # the segment index counts the skipped one
    with pytest.raises(UsageError, match="min_context"):
        m.check_segment(12)
    m.check_segment(16)
    assert make("memoryllm", tiny_backbone, **SMALL, min_context=4).write(m.init_state(), window_segments(ids(6), 5)[0],
                                                                         None).updates == 1


def test_positions_and_keys_of_read_and_write(tiny_backbone, monkeypatch):
    """Read: [bos 0; pool 1..n; text n+1..]; write: [bos 0; e 1..|e|; text after], e = the last K slots +
    the positional vectors, their keys through the layer's own projections; k = min(K, |x|) new slots."""
    m = make("memoryllm", tiny_backbone, pool=12, update=4, min_context=2)
    with torch.no_grad():
        m.params.new_memory_pos.normal_()
    state = fill(m, m.init_state(), 2, k=3)  # n = 6 slots
    seg = window_segments(ids(11), 10)[0]
    _, plan = m.read(state, seg)
    assert plan.key_pos.tolist() == list(range(17)) and plan.query_pos.tolist() == list(range(7, 17))
    assert all(k.shape[1] == 7 for k in plan.memory_keys)
    plans = []
    real = tiny_backbone.forward
    monkeypatch.setattr(tiny_backbone, "forward", lambda ids, p, embeds=None: plans.append(p) or real(ids, p, embeds))
    with torch.no_grad():
        after = m.write(state, seg, plan)
        short = m.write(state, window_segments(ids(4), 3)[0], plan)
    w = plans[0]
    assert w.key_pos.tolist() == list(range(15)) and w.query_pos.tolist() == list(range(5, 15))
    for layer in range(tiny_backbone.num_layers):
        e = state.pool[layer, -4:] + m.params.new_memory_pos
        h = torch.cat((m.params.bos[layer : layer + 1], e))
        k, v = tiny_backbone.layer_kv(layer, tiny_backbone.layer_norm_input(layer, h))
        assert torch.equal(w.memory_keys[layer], k) and torch.equal(w.memory_values[layer], v)
    assert len(after) == 10 and len(short) == 6 + 3  # min(K, |x|) new slots


@pytest.mark.parametrize("name, options, key", [
    ("memoryllm", {"pool": 0}, "pool"), ("memoryllm", {"update": 0}, "update"),
    ("memoryllm", {"pool": 8, "update": 9}, "update"), ("memoryllm", {"min_context": 0}, "min_context"),
    ("mplus", {"ltm": 0}, "ltm"), ("mplus", {"retrieve": 0}, "retrieve"),
    ("mplus", {"retriever_dim": 0}, "retriever_dim"), ("mplus", {"retriever_loss": -1.0}, "retriever_loss"),
    ("mplus", {"pool": 4, "update": 5}, "update"), ("memoryllm", {"slots": 3}, "slots")])
def test_bad_options_are_refused_naming_the_key(name, options, key):
    with pytest.raises(UsageError, match=key):
        get_method(name).Options.from_mapping(options)


def test_segment_checks_count_every_memory_position(tiny_backbone):
    make("memoryllm", tiny_backbone, pool=8000).check_segment(191)
    with pytest.raises(UsageError, match="8193 positions"):
        make("memoryllm", tiny_backbone, pool=8000).check_segment(192)
    with pytest.raises(UsageError, match="8193 positions"):
        make("mplus", tiny_backbone, pool=7000, retrieve=1000).check_segment(192)


def test_dump_shows_occupancy_and_one_row_per_source_segment(tiny_backbone):
    m = make("mplus", tiny_backbone, **PLUS)
    state = fill(m, m.init_state(), 4)
    rows = m.dump(state)
    assert rows[0]["kind"].startswith("pool occupancy 6/6") and rows[0]["entries"] == 6
    pool_rows = [r for r in rows if r["kind"].startswith("pool slots from segment")]
    assert sum(r["entries"] for r in pool_rows) == 6 and pool_rows[-1]["entries"] == 4
    assert pool_rows[-1]["tokens"] == [48, 64] and pool_rows[-1]["byte_start"] == 300
    ltm = next(r for r in rows if r["kind"].startswith("long-term store"))
    assert ltm["entries"] == 10 and "10/100" in ltm["kind"] and sum(b["slots"] for b in ltm["age_histogram"]) == 10
    assert sum(r["entries"] for r in rows if r["kind"].startswith("long-term slots")) == 10


# ---- M+ -------------------------------------------------------------------------------------------------------
def test_dropped_slots_move_to_the_long_term_store_with_their_provenance(tiny_backbone):
    m = make("mplus", tiny_backbone, **PLUS)
    state = fill(m, m.init_state(), 5)  # 20 slots written, 6 kept
    ltm = state.ltm
    assert len(state) == 6 and len(ltm) == 14 and ltm.merges == 4
    assert sorted(state.pool[0, :, 0].long().tolist() + ltm.hidden[:, 0, 0].long().tolist()) == list(range(20))
    for row in range(len(ltm)):
        slot = int(ltm.hidden[row, 0, 0])
        original = tagged(tiny_backbone, slot - slot % 4, 4)[:, slot % 4]
        assert torch.equal(ltm.hidden[row], original)  # every layer's hidden state, moved whole
        assert ltm.origin[row, UPDATE] == slot // 4 and ltm.origin[row, SEGMENT] == slot // 4
    with torch.no_grad():
        for layer in range(tiny_backbone.num_layers):
            torch.testing.assert_close(ltm.keys[:, layer], m.project("k", layer, ltm.hidden[:, layer]))
    # recall frequency: recall_init at entry, -1 at every later store update
    dropped_at = {}
    st = fill(m, m.init_state(), 1)
    for u in range(1, 5):
        before = set(st.ltm.hidden[:, 0, 0].long().tolist())
        st = m.add_slots(st, tagged(tiny_backbone, 4 * u, 4), torch.tensor([u, u, 0, 16, 0, 15]))
        dropped_at.update({s: u for s in set(st.ltm.hidden[:, 0, 0].long().tolist()) - before})
    for row, slot in enumerate(st.ltm.hidden[:, 0, 0].long().tolist()):
        assert st.ltm.freq[row].tolist() == [10 - (4 - dropped_at[slot])] * tiny_backbone.num_layers


def test_pruning_keeps_ltm_slots_and_drops_the_lowest_frequency(tiny_backbone):
    m = make("mplus", tiny_backbone, **{**PLUS, "ltm": 4})
    layers, d = tiny_backbone.num_layers, tiny_backbone.config.hidden_size
    hidden = torch.arange(5.0).view(5, 1, 1).expand(5, layers, d).clone()
    freq = torch.tensor([[3, 3], [0, 1], [9, 0], [1, 1], [2, 5]])[:, :layers]
    ltm = LongTerm(hidden, torch.zeros(5, layers, m.options.retriever_dim), torch.arange(30).view(5, 6), freq)
    new = tagged(tiny_backbone, 50, 2)
    merged = m.merge(ltm, new, torch.zeros(2, 6, dtype=torch.long))
    # summed frequencies after the update (-1 per layer): 4, -1, 7, 0, 5 for the old slots, 20 for each new one
    assert len(merged) == 4 and merged.pruned == 3 and merged.merges == 1
    assert merged.hidden[:, 0, 0].tolist() == [2.0, 4.0, 50.0, 51.0]  # order kept, lowest frequencies gone
    assert merged.freq.sum(1).tolist() == [7, 5, 20, 20]
    assert torch.equal(merged.origin[:2], ltm.origin[[2, 4]])


@pytest.mark.parametrize("updates", [2, 6])
def test_retrieval_takes_min_k0_oldest_first_and_is_what_each_layer_attends(tiny_backbone, updates):
    m = make("mplus", tiny_backbone, **PLUS)
    state = fill(m, m.init_state(), updates)  # store: 2 slots (fewer than K0 = 5) or 18
    count = min(5, len(state.ltm))
    before, seg = window_segments(ids(33, seed=2), 16)[:2]
    seen = {}
    with torch.inference_mode():
        _, plan = m.read(state, before)  # the text read before `seg`: it chooses what `seg` retrieves
        tiny_backbone.forward(before.ids, plan)
        chooser = torch.stack([plan.out.queries[i] for i in range(tiny_backbone.num_layers)])
        assert chooser.shape == (tiny_backbone.num_layers, 16, m.options.retriever_dim)
        state = replace(state, queries=chooser)  # as writing `before` would leave it, without the pool update
        _, plan = m.read(state, seg)
        tap = plan.on_layer_input
        plan.on_layer_input = lambda p, layer, h: (seen.__setitem__(layer, h.clone()), tap(p, layer, h))
        hidden = tiny_backbone.forward(seg.ids, plan)
        assert plan.key_pos.tolist() == list(range(1 + count + 6 + 16))
        keys, values = m.memory_kv(m.with_bos(state.pool))
        for layer in range(tiny_backbone.num_layers):
            picked = plan.out.ltm_picked[layer]
            assert len(picked) == count
            assert bool((state.ltm.origin[picked, UPDATE].diff() >= 0).all())  # oldest first
            score = torch.sigmoid(chooser[layer] @ state.ltm.keys[:, layer].T).mean(0)
            assert set(picked.tolist()) == set(torch.topk(score, count).indices.tolist())
            assert torch.equal(plan.out.queries[layer], m.project("q", layer, seen[layer]))  # kept for the next
            h = tiny_backbone.layer_norm_input(layer, state.ltm.hidden[picked, layer])
            k, v = tiny_backbone.layer_kv(layer, h)
            keys[layer] = torch.cat((keys[layer][:, :1], k, keys[layer][:, 1:]), dim=1)
            values[layer] = torch.cat((values[layer][:, :1], v, values[layer][:, 1:]), dim=1)
            assert torch.equal(plan.memory_keys[layer], keys[layer])
        # the same forward with those keys given up front (no retrieval) is the same forward
        again = tiny_backbone.forward(seg.ids, ForwardPlan(query_pos=plan.query_pos, key_pos=plan.key_pos,
                                                           memory_keys=keys, memory_values=values))
        assert torch.equal(hidden, again)
        after = m.write(state, seg, plan)
    # each layer's retrieval counts once for the slots it picked (then the store update takes 1 from all)
    for layer in range(tiny_backbone.num_layers):
        bump = torch.zeros(len(state.ltm), dtype=torch.long)
        bump[plan.out.ltm_picked[layer]] = 1
        old = after.ltm.freq[: len(state.ltm), layer]
        assert torch.equal(old, state.ltm.freq[:, layer] + bump - 1)


def test_retriever_learns_only_from_its_detached_bce(tiny_backbone):
    m = make("mplus", tiny_backbone, **PLUS)
    adapters = []
    for role in m.lora_roles:
        m.loras[role] = f"t-{role}"
        adapters += add_lora(tiny_backbone, m.loras[role], role_spec(LoraSpec(r=2, alpha=4), m, role))
    with torch.no_grad():
        for p in adapters:
            p.normal_(0, 0.1)  # B != 0: every LoRA weight can receive a gradient
    for p in adapters:
        p.requires_grad_(True)
    with torch.no_grad():
        state = fill(m, m.init_state(), 6)
    seg = window_segments(ids(17, seed=3), 16)[0]
    state, hidden, plan = forward_segment(tiny_backbone, m, state, seg)
    assert plan.out.aux_loss is not None and plan.out.aux_loss.requires_grad
    retriever = [p for n, p in m.params.named_parameters() if n.startswith(("fq_", "fk_"))]
    lm = [*adapters, m.params.bos, m.params.new_memory_pos, *(p for p in tiny_backbone.model.parameters()
                                                              if p.requires_grad and not any(p is a for a in adapters))]
    lm_loss = scored_nll(tiny_backbone, hidden, seg).mean()
    grads = torch.autograd.grad(lm_loss, retriever + adapters, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads[: len(retriever)])  # the LM loss never trains the retriever
    assert any(g is not None and g.any() for g in grads[len(retriever):])
    grads = torch.autograd.grad(plan.out.aux_loss, retriever + lm, allow_unused=True)
    assert all(g is not None and g.any() for g in grads[: len(retriever)])  # f_q and f_k both learn
    assert all(g is None or not g.any() for g in grads[len(retriever):])  # and nothing else does


def test_state_round_trip_with_a_long_term_store_continues_identically(tiny_backbone):
    m = make("mplus", tiny_backbone, **{**PLUS, "ltm": 12})
    segs = window_segments(ids(16 * 8 + 1, seed=4), 16)
    first = run_stream(tiny_backbone, m, segs[:5])
    assert len(first.state.ltm) == 12 and first.state.ltm.pruned > 0
    store = SnapshotStore()
    store.save("mp", m.state_tensors(first.state), {"note": "test"})
    reloaded = m.state_from_tensors(store.load("mp").tensors)
    outs = []
    with torch.inference_mode():
        for state in (first.state, reloaded):
            for seg in segs[5:]:
                state, hidden, _ = forward_segment(tiny_backbone, m, state, seg)
            outs.append((hidden, m.state_tensors(state)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])


@pytest.mark.parametrize("name", ["memoryllm", "mplus"])
def test_generation_past_a_segment_writes_memory_as_ingesting_the_text_would(tiny_backbone, name):
    from longctx.tasks.decode import greedy, ingest, plain_segments

    m = make(name, tiny_backbone, **(PLUS if name == "mplus" else SMALL), min_context=4)
    prompt = ids(36, seed=5)
    done = ingest(tiny_backbone, m, plain_segments(prompt, 8))
    assert len(done.pending) == 4
    out, after = greedy(tiny_backbone, m, done, 6)
    assert len(after.pending) == 2 and after.tokens == 42
    full = ingest(tiny_backbone, m, plain_segments(torch.cat((prompt, torch.tensor(out[:4]))), 8))
    a, b = m.state_tensors(after.state), m.state_tensors(full.state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = ingest(tiny_backbone, m, plain_segments(torch.cat((prompt, torch.tensor(out[:5]))), 8))
    with torch.inference_mode():
        assert int(tiny_backbone.model.lm_head(again.last_hidden).argmax()) == out[5]


@pytest.mark.parametrize("name", ["memoryllm", "mplus"])
def test_training_changes_both_adapters_and_the_positional_vectors_and_the_adapter_round_trips(tmp_path, name):
    backbone = fresh_backbone()
    options = {"pool": 12, "update": 8, **({"ltm": 20, "retrieve": 4} if name == "mplus" else {})}
    m = make(name, backbone, **options)
    corpus = TokenCorpus([ids(400, seed=6)], [])
    cfg = TrainConfig(segment=16, curriculum=((3, 2),), tune="lora", lora=LoraSpec(r=2, alpha=4), warmup=0)
    trainer = Trainer(backbone, m, corpus, cfg)
    assert set(m.loras) == {"write", "read"}

    def lora_b(role: str) -> list[torch.Tensor]:
        return [p.detach().clone() for n, p in backbone.model.named_parameters()
                if f".{m.loras[role]}." in n and "lora_B" in n]

    before = {role: lora_b(role) for role in m.loras}
    bos = m.params.bos.detach().clone()
    trainer.run()
    for role in m.loras:
        assert any(not torch.equal(a, b) for a, b in zip(before[role], lora_b(role))), f"{role} adapter unchanged"
    assert m.params.new_memory_pos.abs().sum() > 0 and not torch.equal(bos, m.params.bos)
    out = str(tmp_path / "adapters" / f"tiny-{name}")
    save_adapter(out, m, backbone, "lora", cfg.lora, {"steps": 2})
    tensors = SnapshotStore(tmp_path / "adapters").load(f"tiny-{name}").tensors
    assert any(k.startswith("lora.write.") for k in tensors) and any(k.startswith("lora.read.") for k in tensors)
    doc = window_segments(ids(16 * 4 + 1, seed=7), 16)
    expected = run_stream(backbone, m, doc).sums.nll
    other = fresh_backbone()
    loaded, _ = build_method(name, other, options, adapter=out)
    assert set(loaded.loras) == {"write", "read"} and f"adapter=tiny-{name}@" in loaded.describe()
    assert run_stream(other, loaded, doc).sums.nll == expected
    untrained, _ = build_method(name, fresh_backbone(), options, allow_untrained=True)
    assert "UNTRAINED" in untrained.describe()
    assert len(lora_parameters(other, loaded.loras["write"])) > 0


def test_a_memoryllm_adapter_starts_mplus_training_but_never_runs_it_as_trained(tmp_path):
    """M+'s stages: the MemoryLLM stage's adapter starts M+'s training (BOS, positional vectors and both LoRA
    roles load; the retriever keeps its initial values); attached to run, it is refused."""
    from longctx.storage.adapters import attach_adapter
    from longctx.storage.snapshot import SnapshotError

    backbone = fresh_backbone()
    m = make("memoryllm", backbone, pool=12, update=8)
    Trainer(backbone, m, TokenCorpus([ids(400, seed=6)], []),
            TrainConfig(segment=16, curriculum=((2, 1),), tune="lora", lora=LoraSpec(r=2, alpha=4), warmup=0)).run()
    out = str(tmp_path / "adapters" / "stage1")
    save_adapter(out, m, backbone, "lora", LoraSpec(r=2, alpha=4), {"steps": 1})
    plus = make("mplus", fresh_backbone(), pool=12, update=8, ltm=20, retrieve=4)
    with pytest.raises(SnapshotError, match="it can start training of mplus"):
        attach_adapter(plus, out, plus.backbone)
    retriever = {k: v.clone() for k, v in plus.params.state_dict().items() if k.startswith("f")}
    attach_adapter(plus, out, plus.backbone, start=True)
    assert torch.equal(plus.params.bos, m.params.bos) and torch.equal(plus.params.new_memory_pos, m.params.new_memory_pos)
    assert set(plus.loras) == {"write", "read"}
    assert all(torch.equal(plus.params.state_dict()[k], v) for k, v in retriever.items())


def test_text_chooses_long_term_slots_with_the_segment_before_it_and_a_prompt_with_its_own(tiny_backbone):
    """Changing a segment's last token never changes what text retrieves (perplexity stays causal); a
    prompt (a question, `Segment.prompt`) retrieves with its own tokens, so its choice moves with them."""
    m = make("mplus", tiny_backbone, **PLUS)
    state = m.init_state()
    with torch.inference_mode():
        for seg in window_segments(ids(129, seed=4), 16):
            state, _, _ = forward_segment(tiny_backbone, m, state, seg)
        assert len(state.ltm) > m.options.retrieve and state.queries is not None
        text, prompt = set(), set()
        for last in range(3, 40):
            probe = ids(17, seed=5)
            probe[15] = last
            seg = window_segments(probe, 16)[0]
            for chosen, flag in ((text, False), (prompt, True)):
                seg.prompt = flag
                _, _, plan = forward_segment(tiny_backbone, m, m.fork_state(state), seg)
                chosen.add(tuple(torch.cat(list(plan.out.ltm_picked.values())).tolist()))
    assert len(text) == 1 and len(prompt) > 1
