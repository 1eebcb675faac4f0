"""Reading K/V memory from its room with the keys kept rotated (model/roomread.py) equals the exact path.

The exact path (concatenate `[memory; current]`, rotate every key at the plan's positions) is what a read
under autograd takes; inference takes the room read. Each test runs the same segments both ways, step by
step, and compares every segment's hidden states: bit for bit where the shift is 0 (nothing evicted: `full`,
unbounded `xl`), within fp32 (or bf16) rounding where positions were re-based, on every supported family
(Gemma 3's local layers with their own RoPE base, Qwen3's q/k norm, Mistral's window on every layer).
"""

from __future__ import annotations

import pytest
import torch
from tiny_families import FAMILIES, family_backbone

from longctx.methods import get_method
from longctx.model.attention import ForwardPlan
from longctx.model.backbone import Backbone
from longctx.stream import forward_segment, read_forward
from longctx.tasks.decode import _segment

N = 120


def doc(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed))


def steps(backbone: Backbone, method: str, ids: torch.Tensor, segment: int, room: bool, **options) -> tuple[list[torch.Tensor], list[ForwardPlan]]:
    """Every segment's hidden states and plan, reading memory from the room (inference) or exactly (no_grad)."""
    cls = get_method(method)
    m = cls(cls.Options.from_mapping(options), backbone)
    state, hidden, plans = m.init_state(), [], []
    with torch.inference_mode() if room else torch.no_grad():
        for s in range(0, len(ids), segment):
            state, h, plan = forward_segment(backbone, m, state, _segment(s, ids[s : s + segment]))
            hidden.append(h.clone())
            plans.append(plan)
    return hidden, plans


def compare(backbone: Backbone, method: str, segment: int, ids: torch.Tensor | None = None, **options) -> tuple[float, list[ForwardPlan]]:
    """Largest difference of any hidden state between the two paths; the room path's plans."""
    ids = doc() if ids is None else ids
    fast, plans = steps(backbone, method, ids, segment, True, **options)
    exact, exact_plans = steps(backbone, method, ids, segment, False, **options)
    assert all(p.room_read is None for p in exact_plans)  # autograd-capable reads stay exact
    return max(float((a - b).abs().max()) for a, b in zip(fast, exact)), plans


def used_room(backbone: Backbone, plans: list[ForwardPlan]) -> int:
    """How many forwards read from the room at every layer."""
    return sum(p.room_read is not None and p.room_read.layers_done == backbone.num_layers for p in plans)


@pytest.mark.parametrize("method,options", [("full", {"context": 200}), ("xl", {"memory": 10_000, "sinks": 0}),
                                            ("xl", {"memory": 10_000, "sinks": 4})])
@pytest.mark.parametrize("segment", [1, 7, 32])
def test_without_re_basing_the_room_read_is_exact(tiny_backbone, method, options, segment):
    """Nothing evicted: the shift is 0, every key is rotated at the same position as on the exact path and
    attention reads the same numbers from a view, so fp32 results are identical."""
    diff, plans = compare(tiny_backbone, method, segment, **options)
    assert diff == 0.0
    assert used_room(tiny_backbone, plans) == len(plans)  # the first too: it rotates its keys into the room


@pytest.mark.parametrize("method,options", [
    ("xl", {"memory": 24, "sinks": 3}), ("xl", {"memory": 24, "sinks": 0}), ("sinks", {"window": 20, "sinks": 4}),
    ("xl", {"memory": 24, "sinks": 3, "positions": "absolute"}), ("sinks", {"window": 20, "sinks": 2, "positions": "absolute"}),
    ("full", {"context": 40, "overlap": 0.5}), ("memorizing", {"window": 24, "memory": 256}),
])
@pytest.mark.parametrize("segment", [1, 5, 16])
def test_re_based_positions_equal_the_exact_path_within_fp32(tiny_backbone, method, options, segment):
    """Eviction moves every memory key's position by one shift: rotating the queries by it instead gives the
    same scores up to fp32 rounding of the angles, step after step (120 forwards for one-token segments). A
    position off by one would differ by ~0.1."""
    diff, plans = compare(tiny_backbone, method, segment, **options)
    assert diff < 1e-4
    assert used_room(tiny_backbone, plans) >= len(plans) - 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_equals_the_exact_path(family):
    """Local layers (Mistral, Gemma 3) keep their window and their own RoPE base; q/k norms and Gemma's
    query scalar come before the function, so the room read is the same arithmetic on every family."""
    backbone = family_backbone(family)
    for method, options in (("xl", {"memory": 20, "sinks": 2}), ("sinks", {"window": 18, "sinks": 3})):
        for segment in (1, 8):
            diff, plans = compare(backbone, method, segment, doc(80), **options)
            assert diff < 1e-4, (method, segment)
            assert used_room(backbone, plans) == len(plans)


def test_bf16_equals_the_exact_path_within_bf16(tiny_backbone):
    """In bf16 the RoPE tables are rounded at other angles than the exact path's: differences stay at bf16's
    rounding (the hidden states are of order 1)."""
    tiny_backbone.model.to(torch.bfloat16)
    ids = doc(96)
    fast, _ = steps(tiny_backbone, "xl", ids, 8, True, memory=24, sinks=3)
    exact, _ = steps(tiny_backbone, "xl", ids, 8, False, memory=24, sinks=3)
    scale = max(float(h.float().abs().max()) for h in exact)
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(fast, exact))
    assert diff <= 0.05 * scale


@pytest.mark.parametrize("method,options,moved", [("full", {}, 0), ("xl", {"memory": 30, "sinks": 4}, 4),
                                                  ("sinks", {"window": 30, "sinks": 3}, 3)])
def test_a_generated_token_rotates_only_itself_and_the_sinks_that_moved(tiny_backbone, method, options, moved):
    """Once the memory is rotated, a one-token step rotates its own key plus, for a bounded window, the sinks
    that slid forward over the evicted slot; the whole memory only when the shift wraps (once per 64 tokens
    here: amortised), never at every step."""
    _, plans = steps(tiny_backbone, method, doc(100), 1, True, **options)
    whole = 0
    for plan in plans[50:]:
        read = plan.room_read
        assert read is not None and read.layers_done == tiny_backbone.num_layers
        assert read.stale.numel() in (moved, plan.memory_len)
        whole += read.stale.numel() == plan.memory_len != moved
        assert read.rotate_positions.numel() == read.stale.numel() + 1
        assert int(read.rotate_positions.max()) < 3 * max(plan.key_pos.numel(), 64)  # bounded, however long the text
    assert whole <= 2


def test_a_read_that_is_never_written_leaves_the_memory_intact(tiny_backbone):
    """A read without its write (a memory-token method's pending segment, a probe) rotates keys into the
    room, but they count only once written: reading again, then writing, equals writing the first time."""
    cls = get_method("xl")
    m = cls(cls.Options.from_mapping({"memory": 20, "sinks": 2}), tiny_backbone)
    ids = doc(70)
    with torch.inference_mode():
        state = m.init_state()
        for s in range(0, 60, 6):
            state, _, _ = forward_segment(tiny_backbone, m, state, _segment(s, ids[s : s + 6]))
        copy = state.clone()
        read_forward(tiny_backbone, m, state, _segment(60, ids[64:70]))  # other tokens, never written
        _, once, _ = forward_segment(tiny_backbone, m, state, _segment(60, ids[60:64]))
        _, after, _ = forward_segment(tiny_backbone, m, copy, _segment(60, ids[60:64]))
    assert torch.allclose(once, after, atol=1e-5)


def test_a_plan_changed_after_the_read_takes_the_exact_path(tiny_backbone):
    """A method that changes the plan's positions after `read_kv` (UniMix's memory-token slots) gets the exact
    path: the room read is dropped before the forward."""
    cls = get_method("xl")
    m = cls(cls.Options.from_mapping({"memory": 20, "sinks": 2}), tiny_backbone)
    ids = doc(40)
    with torch.inference_mode():
        state = m.init_state()
        state, _, _ = forward_segment(tiny_backbone, m, state, _segment(0, ids[:16]))
        seg = _segment(16, ids[16:24])
        state, plan = m.read(state, seg)
        plan.key_pos = plan.key_pos.clone()
        tiny_backbone.forward(seg.ids, plan)
    assert plan.room_read is None
