"""Retrieval memories (`memorizing`, `unimix`) and UniMem's `longformer` on a tiny random Llama in fp32."""

from __future__ import annotations

import pytest
import torch
from test_equivalence import doc, reference_nll, stream_nll

from longctx.errors import UsageError
from longctx.methods import get_method
from longctx.methods.knnstore import KNNStore
from longctx.methods.layersets import resolve_layers
from longctx.model.attention import ForwardPlan
from longctx.stream import forward_segment
from longctx.text.segments import Segment

TOL = 2e-4


def build(backbone, name: str, **options):
    cls = get_method(name)
    return cls(cls.Options.from_mapping(options), backbone)


def segment(ids: torch.Tensor, start: int) -> Segment:
    n = len(ids)
    return Segment(start, ids, torch.arange(start, start + n), torch.full((n,), -1), torch.zeros(n, dtype=torch.long))


def feed(backbone, method, ids: torch.Tensor, seg: int, state=None):
    """Run `ids` through `method` in segments of `seg`; return the state and the last segment's plan/hidden."""
    state = method.init_state() if state is None else state
    start = int(state.local.token_index.max()) + 1 if hasattr(state, "local") and len(state.local) else 0
    with torch.inference_mode():
        for s in range(0, len(ids), seg):
            state, hidden, plan = forward_segment(backbone, method, state, segment(ids[s : s + seg], start + s))
    return state, plan, hidden


@pytest.mark.parametrize(("spec", "layers"), [("all", range(30)), ("0.5-1", range(15, 30)), ("1", [29]),
                                              ("0.52,1", [15, 29]), ("0", [0]), ("none", [])])
def test_layer_sets_are_fractions_of_depth(spec, layers):
    assert resolve_layers(spec, 30) == tuple(layers)


@pytest.mark.parametrize("spec", ["1.5", "x", "0.9-0.2"])
def test_bad_layer_sets_are_refused(spec):
    with pytest.raises(UsageError):
        resolve_layers(spec, 30)


def store_with(n: int, capacity: int, batch: int, seed: int = 0) -> tuple[KNNStore, torch.Tensor]:
    keys = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(seed))
    store = KNNStore.empty(capacity, 2, 3, 8, dtype=torch.float32, device=torch.device("cpu"))
    for s in range(0, n, batch):
        idx = torch.arange(s, min(s + batch, n))
        store.add(keys[:, :, idx], -keys[:, :, idx], idx, idx + 1000, idx * 3)
    return store, keys


@pytest.mark.parametrize(("n", "capacity", "batch"), [(50, 64, 7), (200, 64, 7), (200, 64, 100), (10, 64, 200)])
def test_store_fifo_keeps_exactly_the_newest_entries_in_order(n, capacity, batch):
    store, keys = store_with(n, capacity, batch)
    order = store.order()
    newest = torch.arange(max(0, n - capacity), n)
    assert torch.equal(store.token_index[order], newest)
    assert torch.equal(store.keys[:, :, order], keys[:, :, newest])
    assert torch.equal(store.byte_start[order], newest * 3)
    assert len(store) == min(n, capacity) and store.allocated <= capacity


@pytest.mark.parametrize("capacity", [256, 5000])  # full ring; allocated beyond what is filled
def test_store_search_is_exact_blockwise_and_finds_a_planted_key(capacity):
    store, _ = store_with(300, capacity, 32)
    q = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    planted = store.order()[17]
    store.keys[1, :, planted] = q[:, 2] * 50  # layer 1: this entry now dominates query 2 of every head
    scores = q @ store.keys[1, :, : len(store)].transpose(1, 2)
    expected = scores.topk(6, dim=-1).indices
    for block in (1, 7, 64, 10_000):
        found = store.search(1, q, 6, block)
        assert torch.equal(found, expected)
        assert (found[:, 2, 0] == planted).all()


def test_blocks_index_finds_a_planted_key_and_only_valid_slots():
    store, _ = store_with(1000, 4096, 100)  # 1000 of 4096 allocated slots filled
    q = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    store.keys[0, :, 613] = q[:, 4] * 50
    store._centroids = None
    found = store.search_blocks(0, q, 6, block=16, probes=2, candidates=8, voters=q)
    assert found.shape == (3, 5, 6) and (found < 1000).all()
    assert (found[:, 4, 0] == 613).all()
    exact = store.search_blocks(0, q, 6, block=16, probes=2, candidates=1000, voters=q)  # every block: exact
    assert torch.equal(exact, store.search(0, q, 6, 8192))


def test_blocks_index_searches_what_the_voters_chose_for_every_query():
    """The candidates are decided by the voters alone (earlier queries), so a query's result does not depend
    on the other queries searched with it; without voters the newest blocks are searched."""
    store, _ = store_with(1000, 4096, 100)
    q = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    store.keys[0, :, 613] = q[:, 4] * 50
    store._centroids = None
    voters = q[:, 4:]  # an earlier query that wanted the same block
    together = store.search_blocks(0, q, 6, block=16, probes=2, candidates=8, voters=voters)
    alone = store.search_blocks(0, q[:, 4:], 6, block=16, probes=2, candidates=8, voters=voters)
    assert torch.equal(together[:, 4:], alone) and (alone[:, 0, 0] == 613).all()
    newest = store.search_blocks(0, q, 6, block=16, probes=2, candidates=8, voters=None)
    assert ((newest >= 1000 - 8 * 16) & (newest < 1000)).all()  # the last 8 blocks of 16


def test_neighbours_are_in_range_and_counted_once():
    store, _ = store_with(20, 64, 20)
    slots, valid = store.with_neighbours(torch.tensor([[0, 1, 19]]), 2)
    assert slots[valid].tolist() == [0, 1, 2, 3, 17, 18, 19]


def test_store_round_trip_keeps_ring_layout():
    store, _ = store_with(200, 64, 7)
    again = KNNStore.from_tensors(64, store.tensors())
    assert torch.equal(again.order(), store.order()) and again.written == store.written
    new = torch.arange(200, 210)
    for s in (store, again):
        s.add(torch.ones(2, 3, 10, 8), torch.ones(2, 3, 10, 8), new, new, new)
    assert torch.equal(store.tensors()["keys"], again.tensors()["keys"])


def test_memorizing_without_store_is_exactly_xl(tiny_backbone):
    ids = doc()
    assert stream_nll(tiny_backbone, "memorizing", ids, 16, memory=0, window=24, sinks=2) == \
        stream_nll(tiny_backbone, "xl", ids, 16, memory=24, sinks=2)


def test_gate_at_zero_is_the_local_only_output(tiny_backbone):
    ids = doc()
    opts = dict(window=24, sinks=2, memory=64, topk=4, layers="all")
    gated = stream_nll(tiny_backbone, "memorizing", ids, 16, combine="gate", gate=0.0, **opts)
    assert gated == stream_nll(tiny_backbone, "xl", ids, 16, memory=24, sinks=2)
    assert gated != stream_nll(tiny_backbone, "memorizing", ids, 16, combine="gate", gate=0.5, **opts)


@pytest.mark.parametrize(("positions", "span"), [("constant", 0), ("ordered", 0), ("none", 0), ("ordered", 3)])
def test_topk_over_whole_store_equals_attention_over_store_and_local(tiny_backbone, positions, span):
    """With k >= store size every entry is read: the joint softmax must equal plain attention over
    [store; local] with the store keys placed at the policy's positions (one query, so one placement). The
    store is the default int8 one, so the reference reads its decoded entries."""
    ids = doc(81)
    m = build(tiny_backbone, "memorizing", window=20, sinks=2, memory=200, topk=200, layers="all",
              positions=positions, distance=37, span=span)  # span: every neighbour is a hit too, read once
    state, _, _ = feed(tiny_backbone, m, ids[:80], 16)
    assert len(state.store) == 80 - 22
    # the next write continues both in place (the window's room and the store), so the reference reads copies
    local, store = state.local.clone(), KNNStore.from_tensors(200, state.store.tensors())
    _, plan, hidden = feed(tiny_backbone, m, ids[80:], 1, state)
    order = store.order()
    every = (slice(None), slice(None), order)  # every layer and head, oldest entry first
    q_pos = len(local)  # the query's relative position: after [sinks; window]
    n = len(store)
    doc_idx = store.token_index[order]
    store_pos = {"constant": torch.full((n,), q_pos - 37), "none": torch.full((n,), q_pos),
                 "ordered": q_pos - 37 - (doc_idx.max() - doc_idx)}[positions]
    ref = ForwardPlan(query_pos=torch.tensor([q_pos]), key_pos=torch.cat((store_pos, torch.arange(q_pos + 1))),
                      memory_keys=list(torch.cat((store.keys_at(every, local.keys.dtype), local.keys), dim=2)),
                      memory_values=list(torch.cat((store.values_at(every, local.keys.dtype), local.values), dim=2)))
    with torch.inference_mode():
        expected = tiny_backbone.forward(ids[80:], ref)
    assert torch.allclose(hidden, expected, atol=1e-5)
    assert set(plan.out.retrieved[0].flatten().tolist()) - {-1} == set(store.token_index.tolist())


def test_memorizing_store_holds_the_evicted_tokens_and_dump_shows_them(tiny_backbone):
    m = build(tiny_backbone, "memorizing", window=20, sinks=2, memory=30, topk=3, layers="1")
    state, plan, _ = feed(tiny_backbone, m, doc(96), 16)
    # local keeps tokens 0-1 (sinks) and the newest 20; the store the 30 tokens before those
    assert state.local.token_index.tolist() == [0, 1, *range(76, 96)]
    assert sorted(state.store.token_index.tolist()) == list(range(46, 76))
    assert state.store.keys.shape[0] == 1  # only the retrieval layer is stored
    kinds = [(g["kind"], g["tokens"]) for g in m.dump(state)]
    assert kinds == [("sinks", [0, 2]), ("window", [76, 96]), ("store", [46, 76])]
    retrieved = plan.out.retrieved[1]  # layer 1 retrieved for every head and query of the last segment
    assert retrieved.shape == (4, 16, 3) and set(retrieved.flatten().tolist()) <= set(range(30, 60))


def test_unimix_refuses_untrained_tokens_and_has_memory_only_upstairs(tiny_backbone):
    from longctx.run import build_method

    with pytest.raises(UsageError, match="--allow-untrained"):
        build_method("unimix", tiny_backbone, {"rmt_tokens": 16})
    assert "UNTRAINED" in build_method("unimix", tiny_backbone, {"rmt_tokens": 4}, allow_untrained=True)[0].describe()
    m = build(tiny_backbone, "unimix", window=8, memory=40, topk=2)
    assert m.retrieval_layers == (1,) and m.local_layers == frozenset({1})
    _, plan, _ = feed(tiny_backbone, m, doc(64), 16)
    assert plan.memory_keys[0] is None and plan.memory_keys[1] is not None and 1 in plan.out.retrieved


def longformer_mask(n: int, seg: int, window: int, stride: int, clear: bool) -> torch.Tensor:
    """Visibility of the UniMem Longformer form, simulated directly: memory = the previous `held` tokens."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    held = 0
    for s in range(0, n, seg):
        e = min(s + seg, n)
        for i in range(s, e):
            mask[i, s : i + 1] = True
            for j in range(s - held, s):
                mask[i, j] = (i - j) % stride == 0
        held += e - s
        if held > window:
            held = min(e - s, window) if clear else window
    return mask


@pytest.mark.parametrize(("overflow", "stride"), [("fifo", 1), ("fifo", 2), ("clear", 2), ("clear", 3)])
def test_longformer_equals_its_dilated_mask(tiny_backbone, reference_model, overflow, stride):
    ids = doc()
    got, _ = stream_nll(tiny_backbone, "longformer", ids, 16, window=32, stride=stride, globals=0, overflow=overflow)
    want = reference_nll(reference_model, ids, longformer_mask(len(ids), 16, 32, stride, overflow == "clear"))
    assert abs(got - want) < TOL


def test_longformer_clear_all_keeps_globals_and_last_segment(tiny_backbone):
    m = build(tiny_backbone, "longformer", window=32, globals=4)
    with torch.inference_mode():
        state = m.init_state()
        sizes = []
        for s in range(0, 96, 16):
            sg = segment(doc()[s : s + 16], s)
            state, plan = m.read(state, sg)
            tiny_backbone.forward(sg.ids, plan)
            state = m.write(state, sg, plan)
            sizes.append(state.non_sinks(4))
    assert sizes == [12, 28, 16, 32, 16, 32]
    assert state.token_index[:4].tolist() == [0, 1, 2, 3]


def test_memory_dump_shows_the_store_with_excerpts(tiny_backbone, tmp_path):
    import json
    from pathlib import Path

    from tiny_tokenizers import sample_text
    from typer.testing import CliRunner

    import longctx
    from longctx.cli import app

    book = tmp_path / "book.txt"
    book.write_text(sample_text(2500), encoding="utf-8")
    longctx.perplexity(str(book), ["memorizing"], backbone=tiny_backbone, segment=16, save_memory="mem",
                       options={"memorizing": {"window": 20, "sinks": 2, "memory": 40, "topk": 4}})
    info = json.loads(CliRunner().invoke(app, ["memory", "dump", "mem", "--json"]).stdout)
    kinds = [g["kind"] for g in info["groups"]]
    assert kinds == ["sinks", "window", "store"]
    store = info["groups"][2]
    assert store["entries"] == 40 and store["tokens"][1] == info["groups"][1]["tokens"][0]
    text = Path(book).read_bytes()
    assert " ".join(text[store["byte_start"]:store["byte_start"] + 12].decode("utf-8", "replace").split())[:6] in store["excerpt"]


def test_unimix_rmt_tokens_stay_out_of_the_kv_memory_and_zero_tokens_change_nothing(tiny_backbone):
    """[mem; x; mem] rows are fed, but only the segment's own K/V are stored; the tokens' rows are not scored."""
    with_tokens = build(tiny_backbone, "unimix", window=8, memory=40, topk=2, rmt_tokens=3)
    state, plan, hidden = feed(tiny_backbone, with_tokens, doc(64), 16)
    assert plan.embeds.shape[0] == 16 + 6 and plan.out.hidden.shape[0] == 16 + 6 and hidden.shape[0] == 16
    assert state.local.token_index.tolist() == [0, 1, 2, 3, *range(56, 64)]  # 4 globals + 8 window, no slot rows
    assert sorted(state.store.token_index.tolist()) == list(range(16, 56))  # FIFO of 40
    assert state.tokens.memory.shape == (3, tiny_backbone.config.hidden_size) and state.tokens.segments == 4
    plain = build(tiny_backbone, "unimix", window=8, memory=40, topk=2)
    assert plain.init_state().tokens is None and not plain.trainable


def test_a_forked_store_and_its_origin_never_see_each_others_writes():
    from longctx.methods.knnstore import KNNStore

    def entries(n: int, start: int):
        kv = torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(2, 1, n, 4).contiguous()
        idx = torch.arange(start, start + n)
        return kv, kv.clone(), idx, idx.clone(), idx.clone()

    store = KNNStore.empty(8, 2, 1, 4, dtype=torch.float32, device=torch.device("cpu"))
    store.add(*entries(6, 0))
    fork = store.fork()
    assert fork.keys.data_ptr() == store.keys.data_ptr()  # shared until a write
    fork.add(*entries(4, 100))  # wraps around: overwrites the two oldest slots
    def held(s):
        return s.token_index[s.order()].tolist()

    assert held(store) == list(range(6)) and store.written == 6
    assert held(fork) == [2, 3, 4, 5, 100, 101, 102, 103]
    store.add(*entries(1, 50))
    assert held(store) == [*range(6), 50] and held(fork) == [2, 3, 4, 5, 100, 101, 102, 103]


@pytest.mark.parametrize("capacity,step", [(1000, 37), (300, 50), (256, 1)])
def test_block_means_kept_between_adds_equal_a_full_recompute(capacity, step):
    """The blocks index averages again only the blocks an add wrote to; across growth of the buffers and the
    ring's wrap-around its means equal those of the whole store computed afresh."""
    layers, heads, dim, block = 2, 3, 8, 16
    store = KNNStore.empty(capacity, layers, heads, dim, dtype=torch.float32, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    for first in range(0, 900, step):
        keys = torch.randn(layers, heads, step, dim, generator=gen)
        idx = torch.arange(first, first + step)
        store.add(keys, keys.clone(), idx, idx, idx)
        kept = store.centroids(1, block)
        fresh = KNNStore.from_tensors(capacity, store.tensors()).centroids(1, block)
        torch.testing.assert_close(kept, fresh, rtol=1e-5, atol=1e-6)
