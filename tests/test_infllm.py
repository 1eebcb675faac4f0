"""`infllm`: block memory read whole at every layer, on a tiny random Llama in fp32."""

from __future__ import annotations

import pytest
import torch
from test_equivalence import doc, reference_nll, stream_nll

from longctx.errors import UsageError
from longctx.methods import get_method
from longctx.methods.knnstore import KNNStore
from longctx.stream import forward_segment
from longctx.text.segments import Segment


def build(backbone, **options):
    cls = get_method("infllm")
    return cls(cls.Options.from_mapping(options), backbone)


def segment(ids: torch.Tensor, start: int, *, prompt: bool = False) -> Segment:
    n = len(ids)
    return Segment(start, ids, torch.arange(start, start + n), torch.randint(3, 400, (n,)),
                   torch.ones(n, dtype=torch.long), prompt=prompt)


def feed(backbone, method, ids: torch.Tensor, seg: int, state=None, *, start: int = 0, prompt: bool = False):
    state = method.init_state() if state is None else state
    with torch.inference_mode():
        for s in range(0, len(ids), seg):
            state, hidden, plan = forward_segment(backbone, method, state, segment(ids[s : s + seg], start + s, prompt=prompt))
    return state, plan, hidden


def test_without_block_memory_is_exactly_xl(tiny_backbone):
    """Same sums up to fp32 rounding: `xl` reads its window from the room with re-based rotations
    (model/roomread.py), `infllm` lays out its memory and rotates it at the plan's positions."""
    ids = doc()
    nll, tokens = stream_nll(tiny_backbone, "infllm", ids, 16, memory=0, block=1, window=24, sinks=2)
    xl_nll, xl_tokens = stream_nll(tiny_backbone, "xl", ids, 16, memory=24, sinks=2)
    assert tokens == xl_tokens and nll == pytest.approx(xl_nll, abs=2e-4)


def test_reading_every_block_equals_full_attention(tiny_backbone, reference_model):
    """When top-k covers the whole memory, sinks + blocks (in document order) + window is the whole prefix
    at its own positions: the method must score exactly what full attention scores (with the blocks kept in
    the model's dtype; an int8 store's tolerance: tests/test_store_dtype.py)."""
    ids = doc(160)
    nll, tokens = stream_nll(tiny_backbone, "infllm", ids, 16, window=16, sinks=2, block=8, memory=160, topk=20,
                             store_dtype="model")
    assert tokens == 159
    assert nll == pytest.approx(reference_nll(reference_model, ids), rel=1e-5)
    # and with fewer blocks than the prefix it is a different (bounded) reading
    fewer, _ = stream_nll(tiny_backbone, "infllm", ids, 16, window=16, sinks=2, block=8, memory=160, topk=2,
                          store_dtype="model")
    assert fewer != pytest.approx(nll, rel=1e-5)


def test_blocks_leave_the_window_whole_and_dump_shows_them(tiny_backbone):
    m = build(tiny_backbone, window=16, sinks=2, block=8, memory=64, topk=2)
    state, _, _ = feed(tiny_backbone, m, doc(75), 5)  # 5-token segments: evictions are not block-aligned
    stored = sorted(state.store.tensors()["token_index"].tolist())
    assert len(stored) % 8 == 0 and stored == list(range(2, 2 + len(stored)))
    window = state.local.token_index[2:].tolist()
    assert 16 <= len(window) < 16 + 8 and window == list(range(2 + len(stored), 75))
    assert [g["kind"] for g in m.dump(state)] == ["sinks", "window", "store"]


def test_a_token_of_the_text_never_sees_the_tokens_after_it(tiny_backbone):
    """Text chooses its blocks with the queries read before it, so changing a segment's last token changes
    nothing before that token (perplexity stays causal); a prompt (a question) chooses with its own."""
    m = build(tiny_backbone, window=8, sinks=1, block=4, memory=64, topk=1, queries=1)
    state, _, _ = feed(tiny_backbone, m, doc(64), 8)
    base = doc(8, seed=5)
    outs, chosen = [], set()
    for last in range(3, 60):
        ids = base.clone()
        ids[-1] = last
        with torch.inference_mode():
            _, hidden, _ = forward_segment(tiny_backbone, m, m.fork_state(state), segment(ids, 64))
            question, _, _ = forward_segment(tiny_backbone, m, m.fork_state(state), segment(ids, 64, prompt=True))
        outs.append(hidden[:-1])
        chosen.add(tuple(question.recalled.token_index.tolist()))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert len(chosen) > 1  # the question's own last token moved its choice


def test_the_sharpest_head_chooses_a_planted_block(tiny_backbone):
    """One head of one layer gives a block most of its attention (another repels it): that block is
    chosen, and read at every layer."""
    m = build(tiny_backbone, block=8, memory=128, topk=1)
    gen = torch.Generator().manual_seed(0)
    layers, kv_heads, dim = 2, 2, 16
    store = KNNStore.empty(128, layers, kv_heads, dim, dtype=torch.float32, device=torch.device("cpu"))
    keys = torch.randn(layers, kv_heads, 128, dim, generator=gen)
    queries = torch.randn(layers, 4, 3, dim, generator=gen)
    keys[1, 0, 40:48] = 4 * queries[1, 1].mean(0)  # block 5 answers head 1 (KV head 0) of layer 1
    keys[1, 1, 40:48] = -4 * queries[1, 2].mean(0)  # ... and repels the other KV head's queries
    idx = torch.arange(128)
    store.add(keys, keys.clone(), idx, idx, idx)
    rec = m.recall(store, queries)
    assert rec.token_index.tolist() == list(range(40, 48))
    assert rec.keys.shape == (layers, kv_heads, 8, dim) and torch.equal(rec.keys, keys[:, :, 40:48])
    assert sorted(rec.focus.tolist()) == list(range(40, 48))  # citations: the block's tokens


def test_generation_keeps_its_blocks_until_refresh_and_cites_them(tiny_backbone):
    m = build(tiny_backbone, window=8, sinks=1, block=4, memory=64, topk=2, refresh=3)
    state, plan, _ = feed(tiny_backbone, m, doc(64), 8)
    assert set(plan.out.retrieved) == {0, 1}
    cited = set(plan.out.retrieved[0].flatten().tolist())  # the most-attended of the tokens read
    assert cited == set(state.recalled.focus.tolist()) and cited <= set(state.recalled.token_index.tolist())
    first = state.recalled
    for step in range(3):
        state, plan, _ = feed(tiny_backbone, m, torch.tensor([7]), 1, state, start=64 + step)
        assert (state.recalled is first) == (step < 2), step  # chosen again on the third one-token forward
    assert state.since == 0


def test_blocks_past_the_trained_positions_are_refused(tiny_backbone):
    m = build(tiny_backbone, block=128, topk=64, window=2048)
    with pytest.raises(UsageError, match="trained 8192"):
        m.check_segment(512)


def test_representative_scoring_with_every_key_equals_exact_scoring(tiny_backbone):
    """With r = block every key represents its block, so the blocks chosen (and the perplexity) equal exact
    scoring; with fewer representatives the choice is made from fewer keys and may differ."""
    ids = doc(160)
    opts = {"window": 16, "sinks": 2, "block": 8, "memory": 96, "topk": 2, "queries": 4}
    exact = stream_nll(tiny_backbone, "infllm", ids, 8, **opts)
    every = stream_nll(tiny_backbone, "infllm", ids, 8, scoring="representative", representatives=8, **opts)
    assert every[0] == pytest.approx(exact[0], rel=1e-6) and every[1] == exact[1]


def test_representatives_are_the_most_attended_tokens_and_choose_a_planted_block(tiny_backbone):
    from longctx.methods.blockreps import BlockReps, representatives

    gen = torch.Generator().manual_seed(0)
    layers, kv_heads, dim, block = 2, 2, 16, 8
    keys = torch.randn(layers, kv_heads, 128, dim, generator=gen)
    queries = torch.randn(layers, 4, 3, dim, generator=gen)
    keys[1, 0, 43] = 4 * queries[1, 1].mean(0)  # one token of block 5 answers head 1 (KV head 0) of layer 1
    rep_keys, slots = representatives(keys, queries, block, 2, first_slot=0)
    assert rep_keys.shape == (layers, kv_heads, 16, 2, dim) and 43 in slots[1, 0, 5].tolist()
    assert torch.equal(rep_keys[1, 0, 5][slots[1, 0, 5] == 43][0], keys[1, 0, 43])
    m = build(tiny_backbone, block=block, memory=128, topk=1, scoring="representative", representatives=2)
    store = KNNStore.empty(128, layers, kv_heads, dim, dtype=torch.float32, device=torch.device("cpu"))
    idx = torch.arange(128)
    store.add(keys, keys.clone(), idx, idx, idx)
    reps = BlockReps.empty(layers, kv_heads, 2, dim, dtype=torch.float32, device=torch.device("cpu"))
    reps.put(0, rep_keys, slots, 16)
    rec = m.recall(store, queries, reps)
    assert rec.token_index.tolist() == list(range(40, 48)) and 43 in rec.focus.tolist()


def test_only_the_score_layers_choose_the_blocks(tiny_backbone):
    """A block one head of layer 1 singles out is chosen when layer 1 scores, and a layer left out of
    `score_layers` cannot change the choice (its keys replaced by noise: the same blocks)."""
    gen = torch.Generator().manual_seed(0)
    layers, kv_heads, dim, block = 2, 2, 16, 8
    keys = torch.randn(layers, kv_heads, 128, dim, generator=gen)
    queries = torch.randn(layers, 4, 3, dim, generator=gen)
    keys[1, 0, 43] = 4 * queries[1, 1].mean(0)  # block 5 answers head 1 (KV head 0) of layer 1

    def chosen(score_layers: str, stored: torch.Tensor) -> list[int]:
        m = build(tiny_backbone, block=block, memory=128, topk=1, score_layers=score_layers)
        store = KNNStore.empty(128, layers, kv_heads, dim, dtype=torch.float32, device=torch.device("cpu"))
        idx = torch.arange(128)
        store.add(stored, stored.clone(), idx, idx, idx)
        return m.recall(store, queries).token_index.tolist()

    assert chosen("1", keys) == chosen("all", keys) == list(range(40, 48))
    noisy = keys.clone()
    noisy[1] = torch.randn(kv_heads, 128, dim, generator=gen)
    assert chosen("0", noisy) == chosen("0", keys)


def test_auto_score_layers_are_the_readers_measured_ones(tiny_backbone, monkeypatch):
    """`score_layers: auto` (the default) lets the catalog's measured retrieval layers of the reader choose,
    and every layer where the reader has none, or is not of the entry's depth."""
    from dataclasses import replace

    from longctx.model import catalog
    from longctx.model.backbone import Backbone, ModelInfo

    assert catalog.retrieval_layers("qwen2.5-coder-1.5b", 28) == (2, 5, 6, 8, 14)
    assert catalog.retrieval_layers("smollm2-135m", 30) == tuple(range(30))
    assert catalog.retrieval_layers("qwen2.5-coder-1.5b", 2) == (0, 1)  # another depth: not this entry's model
    assert build(tiny_backbone).score_layers == (0, 1)  # not a catalog model
    entry = replace(catalog.CATALOG["qwen2.5-coder-1.5b"], name="tiny-named", retrieval_layers=(1,))
    monkeypatch.setitem(catalog.CATALOG, "tiny-named", entry)
    named = Backbone(tiny_backbone.model, tiny_backbone.tokenizer, ModelInfo(model_id="tiny-named", source="test"))
    assert build(named).score_layers == (1,) and "score_layers=auto(1)" in build(named).describe()
    assert build(named, score_layers="all").score_layers == (0, 1)
    assert "score_layers=auto(all)" in build(tiny_backbone).describe()


def test_representative_memory_survives_a_snapshot_and_a_fork(tiny_backbone):
    m = build(tiny_backbone, window=8, sinks=1, block=4, memory=24, topk=2, scoring="representative",
              representatives=2)
    state, _, _ = feed(tiny_backbone, m, doc(64), 8)  # the store wrapped around: 24 of 55 tokens kept
    assert state.reps is not None and state.reps.keys.shape[2] == 6
    loaded = m.state_from_tensors({k: v.clone() for k, v in m.state_tensors(state).items()})
    forked = m.fork_state(state)
    a, _, ha = feed(tiny_backbone, m, doc(16, seed=4), 8, state, start=64)
    for other in (loaded, forked):
        b, _, hb = feed(tiny_backbone, m, doc(16, seed=4), 8, other, start=64)
        assert torch.equal(ha, hb) and torch.equal(a.reps.keys, b.reps.keys)
