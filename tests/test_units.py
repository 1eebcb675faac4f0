"""Unit tests: memory state policies, metrics from sums, presets, options validation, segmenting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from longctx.errors import UsageError
from longctx.methods import METHODS, get_method
from longctx.methods.kvstate import KVState
from longctx.metrics import BLOCK, NllSums, paired_delta, summarize
from longctx.presets import available, load_preset, parse_preset
from longctx.text.segments import iter_segments
from longctx.text.tokens import TokenChunk


def kv(indices: list[int]) -> KVState:
    n = len(indices)
    t = torch.tensor(indices, dtype=torch.long)
    keys = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(2, 1, n, 3).clone()
    return KVState(keys, keys + 100, t, t + 1000, t * 5)


def test_fifo_keeps_sinks_and_exactly_the_newest():
    s = kv(list(range(20))).fifo(sinks=3, capacity=5)
    assert s.token_index.tolist() == [0, 1, 2, 15, 16, 17, 18, 19]
    assert s.keys[0, 0, :, 0].tolist() == [0, 1, 2, 15, 16, 17, 18, 19]
    assert s.token_ids.tolist() == [1000, 1001, 1002, 1015, 1016, 1017, 1018, 1019]
    assert kv(list(range(6))).fifo(sinks=0, capacity=0).token_index.tolist() == []
    assert kv(list(range(4))).fifo(sinks=2, capacity=10).token_index.tolist() == [0, 1, 2, 3]


def test_append_then_fifo_over_many_writes_keeps_newest():
    s = KVState.empty(2, 1, 3, dtype=torch.float32, device=torch.device("cpu"))
    for start in range(0, 100, 7):
        idx = list(range(start, min(start + 7, 100)))
        new = kv(idx)
        s = s.append(new.keys, new.values, new.token_index, new.token_ids, new.byte_start).fifo(2, 10)
    assert s.token_index.tolist() == [0, 1] + list(range(90, 100))


def test_metrics_sums_buckets_and_se():
    s = NllSums()
    pos = torch.arange(1, 3001)
    nll = torch.where(pos < 1024, torch.tensor(3.0), torch.tensor(2.0))
    s.add(pos[:1000], nll[:1000], 4000)
    s.add(pos[1000:], nll[1000:], 8000)
    out = summarize(s)
    assert out["tokens"] == 3000 and out["bytes"] == 12000
    assert out["nll_sum"] == pytest.approx(1023 * 3.0 + (3000 - 1023) * 2.0)
    assert out["buckets"][0]["ppl"] == pytest.approx(math.exp(3.0))
    assert out["buckets"][1]["ppl"] == pytest.approx(math.exp(2.0))
    assert out["bits_per_byte"] == pytest.approx(out["nll_sum"] / (math.log(2) * 12000))
    assert out["nll_se"] > 0 and len(s.block_nll) == math.ceil(3001 / BLOCK)


def test_paired_delta_same_tokens():
    a, b = NllSums(), NllSums()
    pos = torch.arange(1, 4097)
    noise = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    a.add(pos, 3.0 + noise, 1)
    b.add(pos, 3.1 + noise, 1)
    d = paired_delta(b, a)
    assert d["delta_nll"] == pytest.approx(0.1, abs=1e-6)
    assert d["delta_nll_se"] == pytest.approx(0.0, abs=1e-6)
    assert d["ppl_ratio"] == pytest.approx(math.exp(0.1))


def test_segments_targets_and_bytes():
    ids = np.arange(10, 20, dtype=np.int64)
    starts = np.array([0, 2, 5, 6, 10, 11, 15, 20, 21, 25], dtype=np.int64)
    chunks = [TokenChunk(ids[:4], starts[:4], 10, 2), TokenChunk(ids[4:], starts[4:], 30, 3)]
    stats: dict = {}
    segs = list(iter_segments(chunks, 4, stats=stats))
    assert [s.start for s in segs] == [0, 4, 8]
    assert torch.cat([s.targets for s in segs]).tolist() == list(range(11, 20)) + [-1]
    # bytes of each predicted token: its span up to the next token's start (the last one up to byte 30)
    assert torch.cat([s.target_bytes for s in segs]).tolist() == [3, 1, 4, 1, 4, 5, 1, 4, 5, 0]
    assert stats == {"tokens": 10, "end_byte": 30, "words": 5}
    cut = list(iter_segments(chunks, 4, max_tokens=6, stats=stats))
    assert torch.cat([s.targets for s in cut]).tolist() == [11, 12, 13, 14, 15, -1]
    assert cut[-1].target_bytes.tolist() == [4, 0]
    assert stats["tokens"] == 6 and stats["end_byte"] == 15 and stats["words"] is None


@pytest.mark.parametrize("name", sorted(available()))
def test_every_preset_validates_and_comments_every_key(name):
    p = load_preset(name)
    assert p.method in METHODS
    text = open(p.path, encoding="utf-8").read()
    data = yaml.safe_load(text)
    assert data["format"] == 1
    for line in text.splitlines():
        if line.strip() and not line.startswith(" " * 2 + "#"):
            assert "#" in line or line.startswith("description:"), f"uncommented line in {name}: {line}"
    cls = get_method(p.method)
    assert set(data["options"]) == {f[0] for f in cls.Options.describe_fields()}, "preset must mirror Options"


def test_preset_validation_messages():
    with pytest.raises(UsageError, match="format"):
        parse_preset("format: 2\nmethod: xl\n", name="x")
    with pytest.raises(UsageError, match="unknown key"):
        parse_preset("format: 1\nmethod: xl\nsegmnt: 5\n", name="x")
    with pytest.raises(UsageError, match="must be int"):
        parse_preset("format: 1\nmethod: xl\noptions: {memory: [1]}\n", name="x")
    with pytest.raises(UsageError, match="unknown method"):
        parse_preset("format: 1\nmethod: nope\n", name="x")
    with pytest.raises(UsageError, match="positive integer"):
        parse_preset("format: 1\nmethod: xl\nsegment: 0\n", name="x")


def test_user_presets_shadow_packaged(isolated_home):
    (isolated_home / "presets").mkdir(parents=True)
    (isolated_home / "presets" / "xl-long.yaml").write_text("format: 1\nmethod: xl\nsegment: 256\noptions: {memory: 4096}\n")
    p = load_preset("xl-long")
    assert p.segment == 256 and p.options == {"memory": 4096}


def test_options_coercion():
    opts = get_method("sinks").Options.from_mapping({"sinks": "2", "window": 8, "positions": "absolute"})
    assert (opts.sinks, opts.window, opts.positions) == (2, 8, "absolute")
    with pytest.raises(UsageError, match="'relative' | 'absolute'"):
        get_method("sinks").Options.from_mapping({"positions": "weird"})
    with pytest.raises(UsageError, match="overlap"):
        get_method("full").Options.from_mapping({"overlap": 1.5})

