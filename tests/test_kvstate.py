"""The key/value memory's room: appending and evicting move only what is new, and the entries always equal
those of the plain concatenate-then-select path, across re-allocations, sink moves, forks and snapshots."""

from __future__ import annotations

import pytest
import torch

from longctx.methods.kvstate import KVState

L, H, D = 2, 2, 4


def entries(first: int, n: int) -> tuple[torch.Tensor, ...]:
    """n entries for document tokens first..first+n-1, each K/V row filled with values derived from its token."""
    idx = torch.arange(first, first + n)
    kv = idx.float().view(1, 1, n, 1) + torch.arange(L * H * D, dtype=torch.float).view(L, H, 1, D) / 100
    return kv, -kv, idx, idx + 1000, idx * 3


def plain_fifo(keys, values, idx, sinks: int, capacity: int):
    """The old path: concatenate, then select the sinks and the newest `capacity` others."""
    is_sink = idx < sinks
    others = torch.nonzero(~is_sink).flatten()
    keep = torch.cat((torch.nonzero(is_sink).flatten(), others[max(others.numel() - capacity, 0):]))
    return keys[:, :, keep], values[:, :, keep], idx[keep]


def same(state: KVState, keys, values, idx) -> None:
    assert torch.equal(state.keys, keys) and torch.equal(state.values, values)
    assert torch.equal(state.token_index, idx) and torch.equal(state.token_ids, idx + 1000)
    assert torch.equal(state.byte_start, idx * 3)


@pytest.mark.parametrize("sinks,capacity,step", [(0, 8, 1), (3, 8, 1), (4, 10, 3), (2, 5, 7), (3, 0, 2)])
def test_room_equals_concatenate_then_select(sinks, capacity, step):
    """200 tokens through a bounded window: equal to the old path at every step, across several re-allocations
    of the room and sink moves that overlap their old slots (evicting fewer entries than there are sinks)."""
    state = KVState.empty(L, H, D, dtype=torch.float, device=torch.device("cpu"))
    ref = (state.keys, state.values, state.token_index)
    rooms = set()
    for first in range(0, 200, step):
        new = entries(first, step)
        state = state.append(*new).fifo(sinks, capacity)
        ref = plain_fifo(torch.cat((ref[0], new[0]), 2), torch.cat((ref[1], new[1]), 2),
                         torch.cat((ref[2], new[2])), sinks, capacity)
        same(state, *ref)
        rooms.add(id(state.room))
    assert len(rooms) < 200 // step / 4  # most steps wrote into the room they found


def test_a_step_moves_only_what_is_new():
    """Once the room has space, appending a token writes in place: the view keeps its storage, and the
    entries already held stay where they are."""
    state = KVState.empty(L, H, D, dtype=torch.float, device=torch.device("cpu"))
    for first in range(40):
        state = state.append(*entries(first, 1)).fifo(0, 16)
    before = state.keys.data_ptr()
    held = state.keys[:, :, 1:].clone()
    state = state.append(*entries(40, 1)).fifo(0, 16)
    assert state.keys.data_ptr() == before + state.keys.stride(2) * state.keys.element_size()
    assert torch.equal(state.keys[:, :, :-1], held)


def test_unbounded_memory_grows_by_doubling():
    state = KVState.empty(L, H, D, dtype=torch.float, device=torch.device("cpu"))
    rooms = set()
    for first in range(0, 1000, 5):
        state = state.append(*entries(first, 5))
        rooms.add(id(state.room))
    same(state, *entries(0, 1000)[:2], torch.arange(1000))
    assert len(rooms) <= 6  # 64, 138, 286, ... entries: log-many copies


def test_evict_returns_what_left_in_order():
    state = KVState.empty(L, H, D, dtype=torch.float, device=torch.device("cpu")).append(*entries(0, 20))
    kept, gone = state.evict(3, 10)
    assert gone is not None
    same(kept, *plain_fifo(*entries(0, 20)[:3], 3, 10))
    same(gone, *[t[:, :, 3:10] for t in entries(0, 20)[:2]], torch.arange(3, 10))
    kept, gone = state.evict(3, 17)
    assert kept is state and gone is None


def test_continuing_a_state_twice_needs_a_clone():
    """The newest state writes into the room in place, so an older state it overwrote refuses to be read;
    a clone continues independently."""
    state = KVState.empty(L, H, D, dtype=torch.float, device=torch.device("cpu"))
    for first in range(0, 30, 3):
        state = state.append(*entries(first, 3)).fifo(2, 8)
    copy = state.clone()
    newer = state.append(*entries(30, 3)).fifo(2, 8)
    with pytest.raises(RuntimeError, match="fork"):
        state.append(*entries(30, 3))
    other = copy.append(*entries(30, 3)).fifo(2, 8)
    same(other, *plain_fifo(*entries(0, 33)[:3], 2, 8))
    same(newer, *plain_fifo(*entries(0, 33)[:3], 2, 8))


def test_snapshot_round_trip_continues_identically():
    state = KVState.empty(L, H, D, dtype=torch.float, device=torch.device("cpu"))
    for first in range(0, 50, 4):
        state = state.append(*entries(first, 4)).fifo(4, 12)
    saved = {k: v.contiguous().clone() for k, v in state.tensors().items()}
    loaded = KVState.from_tensors(saved)
    assert saved["keys"].shape[2] == len(state) == 16  # the snapshot holds the entries, not the room
    a = state.append(*entries(52, 4)).fifo(4, 12)
    b = loaded.append(*entries(52, 4)).fifo(4, 12)
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name])
