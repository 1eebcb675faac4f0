"""Compact stores: int8 codes with a scale per token and head, bf16; against the store kept in fp32.

Exact where nothing is rounded (int8 decoding is deterministic, so a search over an int8 store equals an exact
search over its decoded keys; snapshots and forks continue bit for bit). Where int8 rounds, the tolerance is
stated: each element within half a quantisation step (its vector's largest magnitude / 254), and a method's
NLL within 1 % of the fp32 store's on the tiny random model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_equivalence import doc, reference_nll, stream_nll
from typer.testing import CliRunner

import longctx
from longctx.cli import app
from longctx.methods import get_method
from longctx.methods.knnstore import KNNStore
from longctx.methods.storecodec import dequantise, quantise
from longctx.storage.snapshot import SnapshotStore
from longctx.stream import forward_segment, run_stream
from longctx.text.segments import iter_segments
from longctx.text.tokens import TokenChunk

CPU = torch.device("cpu")
STORE_METHODS = {"infllm": {"window": 16, "sinks": 2, "block": 8, "memory": 64, "topk": 2, "queries": 4},
                 "memorizing": {"window": 16, "memory": 40, "topk": 4, "block": 7},
                 "unimix": {"window": 16, "memory": 40, "topk": 2, "block": 7}}


def build(backbone, name: str, **options):
    cls = get_method(name)
    return cls(cls.Options.from_mapping(options), backbone)


def filled(dtype: torch.dtype, n: int = 300, capacity: int = 256, batch: int = 37) -> tuple[KNNStore, torch.Tensor]:
    """A store of `capacity` entries that wrapped around, and the fp32 keys written (values are -keys)."""
    keys = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(0)) * 3
    store = KNNStore.empty(capacity, 2, 3, 8, dtype=dtype, device=CPU)
    for s in range(0, n, batch):
        idx = torch.arange(s, min(s + batch, n))
        store.add(keys[:, :, idx], -keys[:, :, idx], idx, idx + 1000, idx * 3)
    return store, keys


def test_int8_codes_are_within_half_a_step_and_zero_is_exact():
    x = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 2, 5).view(1, 5, 1)
    x[0, 0] = 0
    codes, scale = quantise(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and codes.abs().max() <= 127
    back = dequantise(codes, scale, torch.float32)
    step = scale.float().unsqueeze(-1)
    assert ((back - x).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(back[0, 0], torch.zeros(64))
    # the largest element maps to ±127 (vectors under 127 × fp16's smallest normal, ~0.008, get that scale)
    assert ((x[:, 1:].abs().amax(-1) / back[:, 1:].abs().amax(-1)) - 1).abs().max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_a_compact_store_holds_the_same_entries_in_the_same_ring(dtype):
    ref, keys = filled(torch.float32)
    store, _ = filled(dtype)
    order = store.order()
    assert torch.equal(order, ref.order()) and torch.equal(store.token_index, ref.token_index)
    got = store.keys_at((slice(None), slice(None), order), torch.float32)
    want = keys[:, :, store.token_index[order]]
    if dtype == torch.bfloat16:  # exactly the fp32 keys rounded to bf16
        assert torch.equal(got, want.to(torch.bfloat16).float())
    else:
        assert ((got - want).abs() <= want.abs().amax(-1, keepdim=True) / 254 * 1.001).all()
        assert torch.equal(store.values_at((slice(None), slice(None), order), torch.float32),
                           dequantise(*quantise(-want), torch.float32))


def test_int8_store_costs_66_bytes_a_head_vector_and_its_search_is_exact_over_its_decoded_keys():
    store, _ = filled(torch.int8)
    assert store.nbytes() == 256 * (2 * 2 * 3 * (8 + 2) + 3 * 8)  # keys+values codes and scales, then 3 longs
    q = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    decoded = store.keys_at((1, slice(None), slice(0, len(store))), torch.float32)
    expected = (q @ decoded.transpose(1, 2)).topk(6, dim=-1).indices
    for block in (1, 7, 64, 10_000):
        assert torch.equal(store.search(1, q, 6, block).sort(-1).values, expected.sort(-1).values)
    keys, values = store.gather(1, expected, torch.float32)
    heads = torch.arange(3).view(-1, 1, 1)
    assert torch.equal(keys, decoded[heads, expected])
    assert torch.equal(values, store.values_at((1, slice(None), slice(0, len(store))), torch.float32)[heads, expected])


def test_int8_block_means_kept_between_adds_equal_a_full_recompute():
    store, _ = filled(torch.int8, n=700, capacity=300, batch=50)
    cached = store.centroids(0, 16)  # computed as the adds came, below: once more after more adds
    more = torch.randn(2, 3, 40, 8, generator=torch.Generator().manual_seed(5))
    idx = torch.arange(700, 740)
    store.add(more, more, idx, idx, idx)
    cached = store.centroids(0, 16)
    n = len(store)
    decoded = store.keys_at((0, slice(None), slice(0, n)), torch.float32)
    full = torch.stack([decoded[:, s : s + 16].mean(1) for s in range(0, n, 16)], 1)
    assert torch.allclose(cached, full, atol=1e-6)


def test_a_forked_int8_store_copies_its_scales_before_writing():
    store, _ = filled(torch.int8, n=100, capacity=128)
    fork = store.fork()
    assert fork.key_scale is not None and store.key_scale is not None
    assert fork.key_scale.data_ptr() == store.key_scale.data_ptr()  # shared until a write
    before = store.keys_at((slice(None), slice(None), store.order()), torch.float32)
    big = torch.full((2, 3, 60, 8), 100.0)
    idx = torch.arange(500, 560)
    fork.add(big, big, idx, idx, idx)  # wraps around: new scales over the oldest slots
    assert torch.equal(store.keys_at((slice(None), slice(None), store.order()), torch.float32), before)
    assert torch.allclose(fork.keys_at((0, 0, fork.order()[-1:]), torch.float32), big[0, 0, -1:], rtol=1e-3)  # fp16 scale


@pytest.mark.parametrize(("dtype", "rel"), [("model", 1e-5), ("int8", 1e-2)])
def test_infllm_reading_every_block_from_an_int8_store_stays_near_full_attention(tiny_backbone, reference_model,
                                                                                 dtype, rel):
    """With top-k covering the memory, infllm equals full attention; an int8 store only rounds the blocks."""
    ids = doc(160)
    nll, _ = stream_nll(tiny_backbone, "infllm", ids, 16, window=16, sinks=2, block=8, memory=160, topk=20,
                        store_dtype=dtype)
    assert nll == pytest.approx(reference_nll(reference_model, ids), rel=rel)


@pytest.mark.parametrize("name", ["memorizing", "unimix"])
def test_retrieval_with_an_int8_store_stays_near_the_fp32_store(tiny_backbone, name):
    ids = doc(160)
    opts = {"window": 16, "memory": 64, "topk": 4}
    if name == "unimix":
        opts["rmt_tokens"] = 0
    exact, _ = stream_nll(tiny_backbone, name, ids, 16, store_dtype="model", **opts)
    compact, _ = stream_nll(tiny_backbone, name, ids, 16, store_dtype="int8", **opts)
    assert compact == pytest.approx(exact, rel=1e-2)


@pytest.mark.parametrize("name", sorted(STORE_METHODS))
def test_an_int8_store_survives_a_snapshot_and_a_fork_bit_for_bit(tiny_backbone, name):
    """save -> load -> continue, and fork -> continue, equal never stopping, with the store still int8."""
    m = build(tiny_backbone, name, store_dtype="int8", **STORE_METHODS[name])
    ids = torch.randint(3, 400, (120,), generator=torch.Generator().manual_seed(3))
    segs = list(iter_segments([TokenChunk(ids.numpy(), np.arange(120), 120, 0)], 16))
    first = run_stream(tiny_backbone, m, segs[:5])
    assert first.state.store.quantised and len(first.state.store)
    snaps = SnapshotStore()
    snaps.save("int8", m.state_tensors(first.state), {"note": "test"})
    loaded = m.state_from_tensors(snaps.load("int8").tensors)
    assert loaded.store.quantised
    forked = m.fork_state(first.state)
    outs = []
    with torch.inference_mode():
        for state in (first.state, loaded, forked):
            for seg in segs[5:]:
                state, hidden, _ = forward_segment(tiny_backbone, m, state, seg)
            outs.append(hidden)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_an_int8_snapshot_missing_its_scales_is_refused():
    store, _ = filled(torch.int8, n=50, capacity=64)
    t = store.tensors()
    del t["key_scale"]
    with pytest.raises(ValueError, match="key_scale and value_scale"):
        KNNStore.from_tensors(64, t)


def test_memory_ls_and_dump_show_bytes_on_disk_and_in_ram(tiny_backbone, tmp_path):
    book = tmp_path / "book.txt"
    from tiny_tokenizers import sample_text

    book.write_text(sample_text(2500), encoding="utf-8")
    opts = {"infllm": {**STORE_METHODS["infllm"], "memory": 4096}}
    for dtype in ("model", "int8"):
        opts["infllm"]["store_dtype"] = dtype
        longctx.perplexity(str(book), ["infllm"], backbone=tiny_backbone, segment=16, options=opts,
                           save_memory=f"s-{dtype}", max_tokens=400)
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(app, ["memory", "ls", "--json"]).stdout)["snapshots"]}
    fp32, int8 = rows["s-model"], rows["s-int8"]
    # the ring is allocated 4096 entries at first, more than the ~300 filled (which is all a snapshot writes)
    assert fp32["ram_bytes"] > fp32["size_bytes"] and int8["ram_bytes"] < fp32["ram_bytes"] / 3
    assert int8["size_bytes"] < fp32["size_bytes"]
    dump = json.loads(CliRunner().invoke(app, ["memory", "dump", "s-int8", "--json"]).stdout)
    assert (dump["disk_bytes"], dump["ram_bytes"]) == (int8["size_bytes"], int8["ram_bytes"])
    assert {t["name"]: t["dtype"] for t in dump["tensors"]}["state.store.keys"] == "int8"
    table = CliRunner().invoke(app, ["memory", "dump", "s-int8"]).stdout
    assert "on disk" in table and "in RAM" in table
