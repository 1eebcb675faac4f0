"""Equivalence tests that prove the machinery (docs/architecture.md "Tests that prove the machinery") on a tiny random Llama in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longctx.methods import get_method
from longctx.model.attention import ForwardPlan, apply_rope
from longctx.stream import run_stream
from longctx.text.segments import iter_segments
from longctx.text.tokens import TokenChunk

N = 96  # document length in tokens
TOL = 2e-4  # fp32; summed over ~100 tokens


def doc(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed))


def stream_nll(backbone, method: str, ids: torch.Tensor, segment: int, **options) -> tuple[float, int]:
    """NLL sum and scored tokens of `method` over `ids` through the real segmenter and driver."""
    chunk = TokenChunk(ids=ids.numpy().astype(np.int64), byte_starts=np.arange(len(ids), dtype=np.int64),
                       byte_end=len(ids), words=0)
    cls = get_method(method)
    m = cls(cls.Options.from_mapping(options), backbone)
    res = run_stream(backbone, m, iter_segments([chunk], segment))
    return res.sums.nll, res.sums.tokens


def reference_nll(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Plain transformers forward (eager attention), optionally under a bool visibility mask [n, n]."""
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.zeros(1, 1, *mask.shape).masked_fill(~mask, float("-inf"))
    with torch.no_grad():
        logits = model(ids.view(1, -1), **kwargs).logits[0]
    return float(F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum"))


def test_one_segment_window_equals_plain_forward(tiny_backbone, reference_model):
    ids = doc(40)
    plan = ForwardPlan(query_pos=torch.arange(40), key_pos=torch.arange(40))
    with torch.inference_mode():
        hidden = tiny_backbone.forward(ids, plan)
        ref = reference_model.model(ids.view(1, -1)).last_hidden_state[0]
    assert torch.allclose(hidden, ref, atol=1e-5)
    for method in ("window", "full", "xl", "sinks"):
        nll, scored = stream_nll(tiny_backbone, method, ids, segment=64)
        assert scored == 39
        assert nll == pytest.approx(reference_nll(reference_model, ids), abs=TOL)


@pytest.mark.parametrize("segment", [1, 7, 16, 96])
def test_xl_unbounded_equals_one_forward(tiny_backbone, reference_model, segment):
    ids = doc()
    nll, scored = stream_nll(tiny_backbone, "xl", ids, segment, memory=10_000, sinks=0)
    assert scored == N - 1
    assert nll == pytest.approx(reference_nll(reference_model, ids), abs=TOL)


def test_full_with_room_equals_one_forward(tiny_backbone, reference_model):
    ids = doc()
    nll, _ = stream_nll(tiny_backbone, "full", ids, 16, context=128)
    assert nll == pytest.approx(reference_nll(reference_model, ids), abs=TOL)


def band_mask(n: int, band: int, sinks: int) -> torch.Tensor:
    i = torch.arange(n)
    causal = i[None, :] <= i[:, None]
    return causal & (((i[:, None] - i[None, :]) <= band) | (i[None, :] < sinks))


@pytest.mark.parametrize("segment", [1, 5, 16, 40])
@pytest.mark.parametrize("sinks", [0, 3])
def test_sinks_by_eviction_equals_band_mask(tiny_backbone, reference_model, segment, sinks):
    """Rolling window via eviction == full attention under the band(+sinks) mask, at any segment length."""
    ids, band = doc(), 11
    nll, _ = stream_nll(tiny_backbone, "sinks", ids, segment, sinks=sinks, window=band, positions="absolute")
    assert nll == pytest.approx(reference_nll(reference_model, ids, band_mask(N, band, sinks)), abs=TOL)


def xl_mask(n: int, segment: int, memory: int, sinks: int) -> torch.Tensor:
    """Query i sees its segment's earlier tokens, the `memory` tokens before the segment, and the sinks."""
    i = torch.arange(n)
    seg_start = (i // segment) * segment
    causal = i[None, :] <= i[:, None]
    return causal & ((i[None, :] >= (seg_start - memory)[:, None]) | (i[None, :] < sinks))


@pytest.mark.parametrize("segment,memory,sinks", [(8, 8, 0), (16, 20, 4), (5, 3, 2)])
def test_xl_fifo_equals_segment_mask(tiny_backbone, reference_model, segment, memory, sinks):
    ids = doc()
    nll, _ = stream_nll(tiny_backbone, "xl", ids, segment, memory=memory, sinks=sinks, positions="absolute")
    assert nll == pytest.approx(reference_nll(reference_model, ids, xl_mask(N, segment, memory, sinks)), abs=TOL)


def test_full_recompute_equals_fresh_window(tiny_backbone, reference_model):
    """On overflow `full` re-prefills its newest tokens: each segment scores as if the text began there."""
    ids, segment, context, keep = doc(), 8, 32, 16
    expected, window = 0.0, []
    for s in range(0, N, segment):
        if len(window) + segment > context:
            window = window[-keep:]
        seg = list(range(s, min(s + segment, N)))
        span = torch.tensor(window + seg)
        with torch.no_grad():
            logits = reference_model(ids[span].view(1, -1)).logits[0, len(window):]
        tgt = [t + 1 for t in seg if t + 1 < N]
        expected += float(F.cross_entropy(logits[: len(tgt)].double(), ids[tgt], reduction="sum"))
        window += seg
    nll, _ = stream_nll(tiny_backbone, "full", ids, segment, context=context, overlap=keep / context)
    assert nll == pytest.approx(expected, abs=TOL)


def test_relative_positions_are_shift_invariant(tiny_backbone):
    """RoPE is relative: shifting every query and key position by Δ leaves the output unchanged."""
    ids = doc(24)
    outs = []
    for delta in (0, 1000, 100_000):
        pos = torch.arange(24) + delta
        with torch.inference_mode():
            outs.append(tiny_backbone.forward(ids, ForwardPlan(query_pos=pos, key_pos=pos)))
    # fp32 angles lose ~1e-7 relative precision, so error grows with |position|: 1e3 and 1e5 stay far
    # below the scale of a real position bug (changing a distance by 1 moves outputs by O(1): 3.1 measured).
    assert (outs[0] - outs[1]).abs().max() < 1e-3
    assert (outs[0] - outs[2]).abs().max() < 2e-2


def test_rope_scores_depend_on_distance_only(tiny_backbone):
    q, k = torch.randn(16), torch.randn(16)

    def score(pq: int, pk: int) -> float:
        cos, sin = tiny_backbone.rope_tables(torch.tensor([pq, pk]))
        return float(apply_rope(q, cos[0], sin[0]) @ apply_rope(k, cos[1], sin[1]))

    assert score(10, 3) == pytest.approx(score(5010, 5003), rel=1e-4, abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 9), rel=1e-3)


def test_relative_positions_stay_bounded(tiny_backbone):
    """xl's relative positions never exceed sinks + memory + segment, however long the document."""
    cls = get_method("xl")
    m = cls(cls.Options.from_mapping({"memory": 8, "sinks": 2}), tiny_backbone)
    chunk = TokenChunk(ids=doc(200).numpy(), byte_starts=np.arange(200), byte_end=200, words=0)
    state, seen = m.init_state(), []
    with torch.inference_mode():
        for seg in iter_segments([chunk], 16):
            state, plan = m.read(state, seg)
            tiny_backbone.forward(seg.ids, plan)
            seen.append(int(plan.key_pos.max()))
            state = m.write(state, seg, plan)
    assert max(seen) == 2 + 8 + 16 - 1
