"""M+'s long-term store in its room: updates write only the new slots, yet the store equals the old
concatenate-prune-select path update after update (insertion order, frequencies, pruning ties)."""

from __future__ import annotations

import pytest
import torch

from longctx.methods.longterm import LongTerm

LAYERS, D, R = 3, 5, 2


def plain_merge(t: dict[str, torch.Tensor], hidden, keys, origin, recall_init: int, capacity: int) -> dict[str, torch.Tensor]:
    """The old path: concatenate, then keep the highest (frequency sum, insertion order), in insertion order."""
    freq = torch.cat((t["freq"] - 1, torch.full((len(hidden), LAYERS), recall_init)))
    grown = {"hidden": torch.cat((t["hidden"], hidden)), "keys": torch.cat((t["keys"], keys)),
             "origin": torch.cat((t["origin"], origin)), "freq": freq}
    m = len(freq)
    if m <= capacity:
        return grown
    keep = torch.topk(freq.sum(1) * m + torch.arange(m), capacity).indices.sort().values
    return {k: v[keep] for k, v in grown.items()}


def slots(first: int, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = torch.arange(first, first + j, dtype=torch.float)
    return (n.view(j, 1, 1).expand(j, LAYERS, D).clone(), n.view(j, 1, 1).expand(j, LAYERS, R).clone(),
            torch.arange(first, first + j).view(j, 1).expand(j, 6).clone())


@pytest.mark.parametrize("capacity,j", [(10, 3), (7, 7), (16, 5)])
def test_room_equals_concatenate_prune_select(capacity, j):
    gen = torch.Generator().manual_seed(0)
    ltm = LongTerm(torch.zeros(0, LAYERS, D), torch.zeros(0, LAYERS, R), torch.zeros(0, 6, dtype=torch.long),
                   torch.zeros(0, LAYERS, dtype=torch.long))
    ref = {"hidden": ltm.hidden, "keys": ltm.keys, "origin": ltm.origin, "freq": ltm.freq}
    rooms = set()
    for u in range(40):
        new = slots(u * j, j)
        ltm = ltm.merged(*new, recall_init=3, capacity=capacity)
        ref = plain_merge(ref, *new, recall_init=3, capacity=capacity)
        # recalls between updates, as M+'s write adds them (same rows in both: found by content)
        bump = torch.randint(0, 3, (len(ltm), LAYERS), generator=gen)
        order = ltm.in_order()
        ltm.freq = ltm.freq.clone()
        ltm.freq[order] += bump
        ref["freq"] = ref["freq"] + bump
        got = ltm.tensors()
        for name in ("hidden", "keys", "origin", "freq"):
            assert torch.equal(got[f"ltm.{name}"], ref[name]), (u, name)
        rooms.add(id(ltm.room))
    assert len(rooms) <= 3  # grown twice at most, then written in place
    assert ltm.pruned == 40 * j - capacity and ltm.merges == 40


def test_newest_and_oldest_first_follow_insertion_order_not_rows():
    ltm = LongTerm(*slots(0, 6)[:2], slots(0, 6)[2], torch.zeros(6, LAYERS, dtype=torch.long))
    for u in range(1, 4):
        ltm = ltm.merged(*slots(6 * u, 2), recall_init=u, capacity=6)
    order = ltm.in_order()
    assert torch.equal(ltm.newest(2).sort().values, order[-2:].sort().values)
    rows = ltm.oldest_first(torch.arange(len(ltm)))
    assert ltm.origin[rows, 0].tolist() == sorted(ltm.origin[:, 0].tolist())


def test_a_store_continued_twice_needs_a_copy():
    ltm = LongTerm(*slots(0, 4)[:2], slots(0, 4)[2], torch.zeros(4, LAYERS, dtype=torch.long))
    ltm = ltm.merged(*slots(4, 2), recall_init=1, capacity=6)
    copy = LongTerm.from_tensors({k: v.clone() for k, v in ltm.tensors().items()})
    ltm.merged(*slots(6, 2), recall_init=5, capacity=6)  # prunes: overwrites rows `ltm` holds
    with pytest.raises(RuntimeError, match="fork"):
        ltm.tensors()
    again = copy.merged(*slots(6, 2), recall_init=5, capacity=6)
    assert len(again) == 6 and again.pruned == 2


def _in_order(ltm: LongTerm) -> dict[str, torch.Tensor]:
    """Every row in insertion order, the hidden states read however the store keeps them."""
    order = ltm.in_order()
    return {"hidden": ltm._rows(order), "keys": ltm.keys[order], "origin": ltm.origin[order], "freq": ltm.freq[order]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("capacity,j", [(10, 3), (16, 5)])
def test_a_disk_store_merges_and_reads_exactly_as_the_ram_store(capacity, j, dtype, monkeypatch):
    from longctx.methods import longterm

    monkeypatch.setattr(longterm, "FILE_PAGES", 4)  # several segment files, and their seams
    ram, disk = (LongTerm.empty(LAYERS, D, R, dtype, disk=d) for d in (False, True))
    for u in range(12):
        new = slots(u * j, j)
        ram, disk = (s.merged(*new, recall_init=3, capacity=capacity) for s in (ram, disk))
        a, b = _in_order(ram), _in_order(disk)
        assert all(torch.equal(a[k], b[k]) for k in a), u
        rows = torch.tensor([len(ram) - 1, 0, 2])
        assert torch.equal(ram.rows_at(rows, 1), disk.rows_at(rows, 1))
        assert torch.equal(ram.rows_at(None, 2), disk.rows_at(None, 2))
    assert len(disk.pages.segments) > 1 and disk.hidden.shape[0] == 0  # on disk, nothing of it in RAM
    shrunk_ram, shrunk_disk = (s.merged(*slots(99, 2), recall_init=1, capacity=capacity // 2) for s in (ram, disk))
    a, b = _in_order(shrunk_ram), _in_order(shrunk_disk)  # fewer slots than before: the compacting copy
    assert len(shrunk_disk) == capacity // 2 and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fork_of_a_disk_store_shares_its_files_until_either_side_writes():
    base = LongTerm.empty(LAYERS, D, R, torch.float32, disk=True).merged(*slots(0, 6), recall_init=2, capacity=8)
    fork = base.fork()
    before = _in_order(base)
    grown = fork.merged(*slots(6, 4), recall_init=1, capacity=8)  # prunes: rewrites rows in place
    assert torch.equal(_in_order(base)["hidden"], before["hidden"])  # the original's rows are untouched
    assert len(grown) == 8 and grown.pruned == 2


def test_an_int8_store_keeps_each_slot_within_half_a_step_of_its_hidden_states_and_round_trips():
    exact, coded = (LongTerm.empty(LAYERS, D, R, dtype) for dtype in (torch.float32, torch.int8))
    gen = torch.Generator().manual_seed(0)
    for u in range(6):
        new = (torch.randn(4, LAYERS, D, generator=gen) * (u + 1), *slots(4 * u, 4)[1:])
        exact, coded = (s.merged(*new, recall_init=2, capacity=10) for s in (exact, coded))
    a, b = _in_order(exact)["hidden"], _in_order(coded)["hidden"]
    step = a.abs().amax(-1, keepdim=True) / 127
    assert coded.hidden.dtype == torch.int8 and ((a - b).abs() <= step / 2 + 1e-6).all() and not torch.equal(a, b)
    again = LongTerm.from_tensors({k: v.clone() for k, v in coded.tensors().items()})
    assert torch.equal(_in_order(again)["hidden"], b)
    with pytest.raises(ValueError, match="hidden_scale"):
        LongTerm.from_tensors({k: v for k, v in coded.tensors().items() if k != "ltm.hidden_scale"})
