"""A store on disk (`store: disk`, methods/pagefile.py) holds and returns exactly what the RAM store does, its
snapshot links its files without a copy and never sees later writes, and its scratch files do not outlive it."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_equivalence import doc, stream_nll
from test_store_dtype import STORE_METHODS, build

import longctx
from longctx.methods import pagefile
from longctx.methods.knnstore import KNNStore
from longctx.storage.snapshot import SnapshotError, SnapshotStore
from longctx.stream import forward_segment, run_stream
from longctx.text.segments import iter_segments
from longctx.text.tokens import TokenChunk

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    """Two pages a segment file, so a few hundred entries span several files (and their seams)."""
    monkeypatch.setattr(pagefile, "PAGES_PER_FILE", 2)


def pair(dtype: torch.dtype, capacity: int = 1000, batches=(5, 300, 1, 128, 700, 200)) -> tuple[KNNStore, KNNStore]:
    """The same entries added to a RAM store and a disk store (wrapping around the ring past `capacity`)."""
    g = torch.Generator().manual_seed(0)
    ram = KNNStore.empty(capacity, 3, 2, 8, dtype=dtype, device=CPU)
    disk = KNNStore.empty(capacity, 3, 2, 8, dtype=dtype, device=CPU, disk=True)
    written = 0
    for e in batches:
        k, v = torch.randn(3, 2, e, 8, generator=g), torch.randn(3, 2, e, 8, generator=g)
        idx = torch.arange(written, written + e)
        written += e
        for s in (ram, disk):
            s.add(k, v, idx, idx + 7, idx * 2)
    return ram, disk


def reads(store: KNNStore) -> list[torch.Tensor]:
    """Every way the methods index a store: a layer's slot range, slots of all layers, per-head gathers."""
    n, g = len(store), torch.Generator().manual_seed(1)
    heads = torch.arange(2).view(-1, 1)
    index = [(1, slice(None), slice(0, n)), (2, slice(None), slice(130, 391)),
             (slice(None), slice(None), torch.tensor([3, n - 1, 129, 128, 3])),
             (0, heads, torch.randint(0, n, (2, 7), generator=g)), (2, slice(None), torch.randint(0, n, (4, 5), generator=g))]
    return [f(i, torch.float) for i in index for f in (store.keys_at, store.values_at)]


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16, torch.float32])
def test_a_disk_store_reads_and_searches_exactly_as_the_ram_store(dtype):
    ram, disk = pair(dtype)
    assert len(disk.pages.segments) > 1 and disk.written > disk.capacity  # several files; the ring wrapped
    for a, b in zip(reads(ram), reads(disk), strict=True):
        assert torch.equal(a, b)
    q = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ram.search(1, q, 5, 64), disk.search(1, q, 5, 64))
    assert torch.equal(ram.centroids(2, 16), disk.centroids(2, 16))
    args = {"k": 3, "block": 16, "probes": 2, "candidates": 4, "voters": q}
    assert torch.equal(ram.search_blocks(0, q, **args), disk.search_blocks(0, q, **args))


def test_a_disk_store_keeps_only_its_token_indices_in_ram():
    ram, disk = pair(torch.int8)
    assert disk.nbytes() == 3 * 8 * disk.allocated  # token_index, token_ids, byte_start
    assert ram.nbytes() - disk.nbytes() == ram.allocated * 2 * 3 * 2 * (8 + 2)  # what stays on disk
    assert disk.disk_bytes() >= len(disk) * 2 * 3 * 2 * (8 + 2)  # keys + values, codes + scales, every layer/head


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_a_disk_store_s_keys_kept_in_ram_read_as_the_files_do_without_reading_them(dtype, monkeypatch):
    ram, disk = pair(dtype, batches=(5, 300, 1))
    before = disk.nbytes()
    disk.keep_keys_in_ram((2, 0))  # filled from the files for what is held, then kept up to date
    per_slot = 2 * 2 * (8 * dtype.itemsize + (2 if dtype == torch.int8 else 0))  # layers x heads x (key + scale)
    assert disk.nbytes() - before == disk.allocated * per_slot
    g = torch.Generator().manual_seed(5)
    for e in (128, 700, 200):  # the ring wraps, the RAM buffers grow
        k, v = torch.randn(3, 2, e, 8, generator=g), torch.randn(3, 2, e, 8, generator=g)
        idx = torch.arange(disk.written, disk.written + e)
        for s in (ram, disk):
            s.add(k, v, idx, idx + 7, idx * 2)
    assert all(torch.equal(a, b) for a, b in zip(reads(ram), reads(disk), strict=True))
    assert set(disk.tensors()) == set(pair(dtype)[1].tensors())  # not saved: the files hold those keys
    read = disk.pages.read
    monkeypatch.setattr(disk.pages, "read", lambda part, index, dt: pytest.fail("read a file") if part == 0 and index[0] in (0, 2) else read(part, index, dt))
    n = len(disk)
    for layer in (0, 2):
        assert torch.equal(disk.keys_at((layer, slice(None), slice(0, n)), torch.float),
                           ram.keys_at((layer, slice(None), slice(0, n)), torch.float))
    assert torch.equal(disk.keys_at((1, 0, slice(3, 9)), torch.float), ram.keys_at((1, 0, slice(3, 9)), torch.float))


def test_a_fork_of_a_disk_store_copies_a_segment_before_either_side_writes_it():
    _, disk = pair(torch.float32)
    before = reads(disk)
    fork = disk.fork()
    k = torch.ones(3, 2, 50, 8)
    idx = torch.arange(50) + 10_000
    fork.add(k, k, idx, idx, idx)
    assert all(torch.equal(a, b) for a, b in zip(before, reads(disk), strict=True))
    disk.add(-k, -k, idx, idx, idx)
    newest = (disk.written - 50 + torch.arange(50)) % disk.capacity  # the ring's slots of the last 50 added
    assert torch.equal(fork.keys_at((0, 0, newest), torch.float), k[0, 0])
    assert torch.equal(disk.keys_at((0, 0, newest), torch.float), -k[0, 0])


def test_scratch_files_go_with_their_store_and_a_dead_process_s_are_removed(tmp_path):
    _, disk = pair(torch.int8)
    paths = [seg.path for seg in disk.pages.segments.values()]
    scratch = paths[0].parent
    stale = scratch.parent / "work-1-x"  # a crashed run's: its lock file is held by no one
    stale.mkdir()
    (stale / pagefile.LOCK_NAME).touch()
    pagefile._scratch_under.cache_clear()  # a new process's first disk store
    pair(torch.int8)
    assert not stale.exists() and scratch.exists()  # this process still holds its own lock
    del disk
    gc.collect()
    assert not any(p.exists() for p in paths)


def test_infllm_and_memorizing_on_disk_score_exactly_as_in_ram(tiny_backbone):
    ids = doc(200)
    for name, opts in (("infllm", STORE_METHODS["infllm"]), ("infllm", {**STORE_METHODS["infllm"], "scoring": "representative"}),
                       ("memorizing", STORE_METHODS["memorizing"])):
        ram, _ = stream_nll(tiny_backbone, name, ids, 16, **opts)
        disk, _ = stream_nll(tiny_backbone, name, ids, 16, store="disk", **opts)
        assert disk == ram, (name, opts)
    for keys in ("ram", "auto"):  # the choosing layers' keys copied in RAM (ram), or not (auto: 1 of 2 layers is too many)
        opts = {**STORE_METHODS["infllm"], "score_layers": "0.5-1", "score_keys": keys}
        disk, _ = stream_nll(tiny_backbone, "infllm", ids, 16, store="disk", **opts)
        assert disk == stream_nll(tiny_backbone, "infllm", ids, 16, **opts)[0]


def test_infllm_keeps_the_choosing_layers_keys_in_ram_when_they_are_few(tiny_backbone):
    opts = {**STORE_METHODS["infllm"], "store": "disk", "score_layers": "0.5-1"}  # layer 1 of 2
    assert build(tiny_backbone, "infllm", **opts).init_state().store.ram_layers == ()  # auto: half the layers
    assert build(tiny_backbone, "infllm", score_keys="ram", **opts).init_state().store.ram_layers == (1,)
    assert build(tiny_backbone, "infllm", score_keys="ram", **{**opts, "scoring": "representative"}).init_state().store.ram_layers == ()


MPLUS = {"pool": 6, "update": 4, "ltm": 12, "retrieve": 5}


@pytest.mark.parametrize("dtype", ["model", "int8"])
def test_mplus_with_its_long_term_store_on_disk_scores_exactly_as_in_ram(tiny_backbone, monkeypatch, dtype):
    from longctx.methods import longterm

    monkeypatch.setattr(longterm, "FILE_PAGES", 4)
    ids = doc(200)
    ram, _ = stream_nll(tiny_backbone, "mplus", ids, 16, store_dtype=dtype, **MPLUS)
    disk, _ = stream_nll(tiny_backbone, "mplus", ids, 16, store="disk", store_dtype=dtype, **MPLUS)
    assert disk == ram
    if dtype == "int8":  # the codes change what is read back, a little
        exact, _ = stream_nll(tiny_backbone, "mplus", ids, 16, **MPLUS)
        assert exact != ram and abs(exact - ram) < 1e-2 * abs(exact)


def _segments(ids: torch.Tensor) -> list:
    return list(iter_segments([TokenChunk(ids.numpy(), np.arange(len(ids)), len(ids), 0)], 16))


@pytest.mark.parametrize("name, options, tokens, read, absent, filled", [
    ("infllm", {**STORE_METHODS["infllm"], "memory": 512}, 560, 30, "store.keys", lambda s: len(s.store) > 400),
    ("infllm", {**STORE_METHODS["infllm"], "memory": 512, "score_layers": "0.5-1", "score_keys": "ram"}, 560, 30,
     "store.ram_keys", lambda s: len(s.store) > 400 and s.store.ram_layers == (1,)),
    ("mplus", MPLUS, 320, 12, "ltm.hidden", lambda s: len(s.ltm) == 12 and s.ltm.pruned > 0)])
def test_a_disk_store_snapshot_links_its_segments_and_resumes_bit_for_bit(tiny_backbone, monkeypatch, name, options,
                                                                          tokens, read, absent, filled):
    from longctx.methods import longterm

    monkeypatch.setattr(longterm, "FILE_PAGES", 4)  # M+'s rows: several segment files
    m = build(tiny_backbone, name, store="disk", **options)
    segs = _segments(torch.randint(3, 400, (tokens,), generator=torch.Generator().manual_seed(3)))
    first = run_stream(tiny_backbone, m, segs[:read])
    assert filled(first.state) and m.memory_disk_bytes(first.state) > 0
    snaps = SnapshotStore()
    version = snaps.save("disk", m.state_tensors(first.state), {"note": "test"},
                         files={f"state.{k}": v for k, v in m.state_files(first.state).items()})
    linked = sorted(version.glob("state.store.*.seg"))
    assert len(linked) > 1 and all(os.stat(p).st_nlink == 2 for p in linked)  # the scratch file and its link
    snap = snaps.load("disk")
    assert absent not in snap.tensors  # the keys/values (M+: hidden states) are the linked files
    sums = {p: pagefile_sha(p) for p in linked}
    with pagefile.snapshot_files({k[6:]: v for k, v in snap.files.items()}):
        loaded = m.state_from_tensors(dict(snap.tensors))
    if name == "infllm":  # a RAM copy of some keys is rebuilt from the files
        assert loaded.store.ram_layers == first.state.store.ram_layers
    outs = []
    with torch.inference_mode():
        for state in (first.state, loaded, m.fork_state(first.state)):
            for seg in segs[read:]:
                state, hidden, _ = forward_segment(tiny_backbone, m, state, seg)
            outs.append(hidden)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert {p: pagefile_sha(p) for p in linked} == sums  # three continuations wrote; the snapshot's files held


def pagefile_sha(path: Path) -> str:
    from longctx.storage.hashing import file_sha256

    return file_sha256(path)


def test_a_saved_disk_memory_resumes_through_the_library_and_a_damaged_segment_is_refused(tiny_backbone, tmp_path):
    from tiny_tokenizers import sample_text

    book = tmp_path / "book.txt"
    book.write_text(sample_text(2500), encoding="utf-8")
    opts = {"infllm": {**STORE_METHODS["infllm"], "memory": 4096, "store": "disk"}}
    whole = longctx.perplexity(str(book), ["infllm"], backbone=tiny_backbone, segment=16, options=opts, max_tokens=480)
    longctx.perplexity(str(book), ["infllm"], backbone=tiny_backbone, segment=16, options=opts, max_tokens=240,
                       save_memory="half")
    resumed = longctx.perplexity(str(book), backbone=tiny_backbone, resume="half", max_tokens=480)
    assert resumed.runs[0].result.sums.nll == whole.runs[0].result.sums.nll
    version = SnapshotStore().version_dir("half")
    seg = sorted(version.glob("state.store.*.seg"))[0]
    os.chmod(seg, 0o644)
    with open(seg, "r+b") as f:
        f.seek(100)
        f.write(b"\x01")
    with pytest.raises(SnapshotError, match="corrupted or was modified"):
        longctx.perplexity(str(book), backbone=tiny_backbone, resume="half", max_tokens=480)


def test_an_exported_disk_memory_imports_as_a_copy(tiny_backbone, tmp_path):
    from tiny_tokenizers import sample_text

    book = tmp_path / "book.txt"
    book.write_text(sample_text(1500), encoding="utf-8")
    opts = {"infllm": {**STORE_METHODS["infllm"], "memory": 4096, "store": "disk"}}
    longctx.perplexity(str(book), ["infllm"], backbone=tiny_backbone, segment=16, options=opts, max_tokens=320,
                       save_memory="a")
    snaps = SnapshotStore()
    snaps.export("a", tmp_path / "exported")
    snaps.import_(tmp_path / "exported", "b")
    for seg in (tmp_path / "exported").glob("state.store.*.seg"):
        assert os.stat(seg).st_nlink == 1  # not linked into the store: the export stays the user's
    assert sorted(snaps.load("b").files) == sorted(snaps.load("a").files)


def test_memory_ls_counts_the_blocks_a_sparse_store_file_holds_not_its_length(tiny_backbone, tmp_path):
    from tiny_tokenizers import sample_text

    from longctx.storage.memory import list_snapshots

    book = tmp_path / "book.txt"
    book.write_text(sample_text(1500), encoding="utf-8")
    opts = {"mplus": {**MPLUS, "store": "disk"}}  # 12 slots written of a 2,048-slot segment file
    longctx.perplexity(str(book), ["mplus"], backbone=tiny_backbone, segment=16, options=opts, max_tokens=320,
                       save_memory="sparse", allow_untrained=True)
    snap = SnapshotStore().load("sparse", tensors=False)
    listed = sum(f["size"] for f in snap.manifest["files"].values())
    row = next(r for r in list_snapshots() if r["name"] == "sparse")
    seg = next(snap.path.glob("state.store.*.seg"))
    assert row["size_bytes"] < listed and row["size_bytes"] >= listed - seg.stat().st_size + 12 * 2 * 64 * 4  # 12 slots: 2 layers × 64 fp32
