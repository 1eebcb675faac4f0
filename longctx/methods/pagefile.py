"""A store's keys and values on disk: pages of consecutive slots in segment files, read and written in place.

A large store (infllm's block memory, memorizing's kNN memory) may hold more than RAM: with `store: disk` its
keys/values (and int8 scales) live here, and RAM keeps only token indices, block summaries and what a step
reads. A page is `PAGE` consecutive slots of every layer and head, one record:

    keys [layers, kv_heads, PAGE, head_dim] | values (same) | key scales [layers, kv_heads, PAGE] | value scales

so reading a block of every layer is one contiguous read, and appending whole pages is one write each.
`PAGES_PER_FILE` pages make a segment file (`store.00003.seg`). A store of one tensor whose reads pick
single rows (M+'s long-term slots, longterm.py) uses pages of one slot and one part instead (`PageLayout`).

Reads and writes go through `os.pread`/`os.pwrite`, not a memory map: mapped pages a process touched stay
resident and count in its RSS, so a map would bring the whole store into RAM as the document is read; file
reads leave the bytes in the kernel's page cache, which it reclaims under pressure.

A snapshot of the memory links the segment files into its version directory (a hard link: no copy) and
lists their sha256; a linked segment is frozen, and the first write to it afterwards copies it first (copy on
write, one segment at a time), so a snapshot's files never change. A fork freezes its segments the same way.
A run's own segment files live in a scratch directory under `LONGCTX_HOME/stores`, removed when the last
store using them is gone (or, after a crash, by the next run that opens a disk store).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import fcntl
import functools
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from ..storage.paths import longctx_home
from ..storage.snapshot import SnapshotError
from .storecodec import QUANTISED, SCALE_DTYPE, quantise

PAGE = 128  # slots per page (infllm's block): the unit of every read
PAGES_PER_FILE = 64  # 8,192 slots a segment file (~97 MB int8 on the default model)
SEGMENT_NAME = "store.{:05d}.seg"
LOCK_NAME = ".lock"  # in a scratch directory: flocked by the process using it
COPY_CHUNK = 1 << 20  # bytes per read when a frozen segment is copied

# the files a snapshot being loaded links (name -> path): set around `state_from_tensors` by whoever restores
linked_files: contextvars.ContextVar[Mapping[str, Path]] = contextvars.ContextVar("linked_files",
                                                                                         default=MappingProxyType({}))


@contextlib.contextmanager
def snapshot_files(files: Mapping[str, Path]) -> Iterator[None]:
    """Make a snapshot's linked files visible to the stores its tensors rebuild."""
    token = linked_files.set(files)
    try:
        yield
    finally:
        linked_files.reset(token)


class _Segment:
    """One segment file, open for positional reads (and writes unless frozen). Deleted when no store uses it,
    if it is a scratch file (a snapshot's file is only closed)."""

    def __init__(self, path: Path, fd: int, *, scratch: bool):
        self.path, self.fd, self.frozen = path, fd, not scratch
        weakref.finalize(self, _close, fd, path if scratch else None)

    @classmethod
    def scratch(cls, directory: Path, size: int) -> _Segment:
        """A new, writable, sparse segment file of `size` bytes in `directory` (blocks are allocated as pages
        are written)."""
        directory.mkdir(parents=True, exist_ok=True)  # removed under us (by hand): made again
        fd, tmp = tempfile.mkstemp(prefix="seg-", suffix=".tmp", dir=directory)
        os.ftruncate(fd, size)
        return cls(Path(tmp), fd, scratch=True)

    @classmethod
    def linked(cls, path: Path) -> _Segment:
        """A snapshot's segment file, read-only (frozen)."""
        return cls(path, os.open(path, os.O_RDONLY), scratch=False)

    def thawed(self, directory: Path, size: int) -> _Segment:
        """A writable scratch copy of this (frozen) segment in `directory`, copied through the open file (its
        name may be gone: a snapshot version pruned since)."""
        copy = _Segment.scratch(directory, size)
        for start in range(0, size, COPY_CHUNK):
            data = os.pread(self.fd, min(COPY_CHUNK, size - start), start)
            if data.count(0) != len(data):  # leave runs of zeros as holes: the copy stays sparse
                os.pwrite(copy.fd, data, start)
        return copy


def _close(fd: int, remove: Path | None) -> None:
    os.close(fd)
    if remove is not None:
        with contextlib.suppress(OSError):
            remove.unlink()


@dataclass(frozen=True)
class PageLayout:
    """Byte offsets inside a page record (see the module docstring). A K/V store has `parts` 2 (keys, values)
    and `page` PAGE slots; a store of one tensor read by single rows (M+'s long-term slots) has 1 and 1."""

    layers: int
    heads: int
    dim: int
    dtype: torch.dtype  # stored dtype: a float dtype, or int8 codes (then with fp16 scales)
    page: int = PAGE  # slots a page
    parts: int = 2  # tensors a page holds (keys and values)
    file_pages: int | None = None  # pages a segment file (None: PAGES_PER_FILE)

    @property
    def pages_per_file(self) -> int:
        return self.file_pages or PAGES_PER_FILE

    @property
    def file_bytes(self) -> int:
        return self.pages_per_file * self.page_bytes

    @property
    def item(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def part_bytes(self) -> int:  # keys (or values) of one page
        return self.layers * self.heads * self.page * self.dim * self.item

    @property
    def scale_bytes(self) -> int:  # key (or value) scales of one page; 0 for a float store
        return self.layers * self.heads * self.page * SCALE_DTYPE.itemsize if self.dtype == QUANTISED else 0

    @property
    def page_bytes(self) -> int:
        return self.parts * (self.part_bytes + self.scale_bytes)

    def offset(self, part: int, scaled: bool) -> int:
        """Where in a page record `part` (0 keys, 1 values) starts: its data, or with `scaled` its scales."""
        return self.parts * self.part_bytes + part * self.scale_bytes if scaled else part * self.part_bytes

    def tensors(self) -> dict[str, torch.Tensor]:
        """The layout as a snapshot records it: an empty tensor of the stored dtype and shape
        `[layers, heads, 0, dim]`, and `[page, parts, pages a file]`."""
        return {"layout": torch.zeros(self.layers, self.heads, 0, self.dim, dtype=self.dtype),
                "geometry": torch.tensor([self.page, self.parts, self.pages_per_file], dtype=torch.long)}

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor]) -> PageLayout:
        """The layout `tensors()` recorded (a snapshot without `geometry`: a K/V store's defaults)."""
        layers, heads, _, dim = t["layout"].shape
        page, parts, file_pages = t["geometry"].tolist() if "geometry" in t else (PAGE, 2, PAGES_PER_FILE)
        return cls(layers, heads, dim, t["layout"].dtype, page, parts, file_pages)


class PageFile:
    """The keys/values `[layers, kv_heads, slots, head_dim]` of a store, on disk (see the module docstring)."""

    def __init__(self, layout: PageLayout, segments: dict[int, _Segment] | None = None,
                 directory: Path | None = None):
        self.layout = layout
        self.segments: dict[int, _Segment] = segments if segments is not None else {}
        self._directory = directory

    @property
    def quantised(self) -> bool:
        return self.layout.dtype == QUANTISED

    @property
    def directory(self) -> Path:
        """The scratch directory for this store's writable segments (made on first write)."""
        if self._directory is None:
            self._directory = _scratch_dir()
        return self._directory

    # ---- writing ---------------------------------------------------------------------------------------------
    def write(self, slots: torch.Tensor, *parts: torch.Tensor) -> None:
        """Put entries `[layers, kv_heads, e, dim]` of each part (keys, values) at `slots [e]` (encoded to int8
        when the store is)."""
        for part, x in enumerate(parts):
            if self.quantised:
                codes, scales = quantise(x)
                self._write_part(slots, codes, part, scaled=False)
                self._write_part(slots, scales, part, scaled=True)
            else:
                self._write_part(slots, x.to(self.layout.dtype), part, scaled=False)

    def _write_part(self, slots: torch.Tensor, x: torch.Tensor, part: int, scaled: bool) -> None:
        """Write `x [layers, kv_heads, e(, dim)]` at `slots`, page by page: a whole page's part in one write."""
        lay = self.layout
        x = x.cpu()
        row = (lay.dim if not scaled else 1) * x.element_size()  # bytes per slot of one (layer, head)
        s = slots.cpu().tolist()
        i = 0
        while i < len(s):
            page, first = divmod(s[i], lay.page)
            run = 1
            while i + run < len(s) and s[i + run] == s[i] + run and (first + run) < lay.page:
                run += 1
            chunk = _bytes(x.narrow(2, i, run))  # [L, H, run(, D)] as raw bytes
            fd, base = self._writable(page)
            base += lay.offset(part, scaled)
            if run == lay.page:
                os.pwrite(fd, chunk.numpy().data.cast("B"), base)
            else:
                for lh in range(lay.layers * lay.heads):
                    off = base + (lh * lay.page + first) * row
                    os.pwrite(fd, chunk.view(lay.layers * lay.heads, -1)[lh].numpy().data, off)
            i += run

    def _writable(self, page: int) -> tuple[int, int]:
        """The fd and byte offset of `page`, its segment created or copied (when frozen) as needed."""
        index, within = divmod(page, self.layout.pages_per_file)
        seg = self.segments.get(index)
        size = self.layout.file_bytes
        if seg is None:
            seg = self.segments[index] = _Segment.scratch(self.directory, size)
        elif seg.frozen:
            seg = self.segments[index] = seg.thawed(self.directory, size)
        return seg.fd, within * self.layout.page_bytes

    # ---- reading ---------------------------------------------------------------------------------------------
    def read(self, part: int, index: tuple, dtype: torch.dtype) -> torch.Tensor:
        """`data[index]` of keys (part 0) or values (1), decoded to `dtype`; index into `[layers, kv_heads,
        slots]` as the in-RAM store's: a layer int or slice, a heads slice or tensor, a slots slice or tensor."""
        layer, heads, slots = index
        pages, local = _pages_of(slots, self.layout.page)
        data = self._read_pages(pages, part, scaled=False, layer=layer)
        idx = (0 if isinstance(layer, int) else slice(None), heads, local)
        if not self.quantised:
            return data[idx].to(dtype)
        scale = self._read_pages(pages, part, scaled=True, layer=layer)
        return (data[idx].float() * scale[idx].float().unsqueeze(-1)).to(dtype)

    def read_stored(self, part: int, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slots `0..n` of one layer's keys (part 0) or values (1) as stored, `[kv_heads, n, dim]`, and their
        int8 scales `[kv_heads, n]` (None for a float store)."""
        pages = list(range(-(-n // self.layout.page)))
        data = self._read_pages(pages, part, scaled=False, layer=layer)[0, :, :n]
        scale = self._read_pages(pages, part, scaled=True, layer=layer)[0, :, :n] if self.quantised else None
        return data, scale

    def _read_pages(self, pages: list[int], part: int, *, scaled: bool, layer: int | slice) -> torch.Tensor:
        """`[layers read, kv_heads, len(pages) * PAGE(, dim)]` of `pages`, in the stored dtype."""
        lay = self.layout
        layers = [layer] if isinstance(layer, int) else list(range(lay.layers))[layer]
        dtype, width = (SCALE_DTYPE, 1) if scaled else (lay.dtype, lay.dim)
        out = torch.empty(len(pages), len(layers), lay.heads, lay.page, width, dtype=dtype)
        raw = out.view(torch.uint8).view(len(pages), len(layers), -1)  # one (page, layer) row of bytes
        contiguous = len(layers) == lay.layers or len(layers) == 1
        span = raw.shape[-1] * (len(layers) if contiguous else 1)
        for p, page in enumerate(pages):
            seg = self.segments.get(page // lay.pages_per_file)
            if seg is None:  # never written (a slot the caller masks out): zeros
                raw[p].zero_()
                continue
            base = (page % lay.pages_per_file) * lay.page_bytes + lay.offset(part, scaled)
            targets = [(layers[0], raw[p].reshape(-1))] if contiguous else [(li, raw[p, j]) for j, li in enumerate(layers)]
            for li, buf in targets:
                got = os.preadv(seg.fd, [buf.numpy().data], base + li * raw.shape[-1])
                if got != (span if contiguous else raw.shape[-1]):
                    raise OSError(f"{seg.path} is shorter than its store says (page {page})")
        out = out.permute(1, 2, 0, 3, 4).reshape(len(layers), lay.heads, len(pages) * lay.page, width)
        return out.squeeze(-1) if scaled else out

    # ---- sharing ---------------------------------------------------------------------------------------------
    def fork(self) -> PageFile:
        """The same pages for another store: every segment frozen, so whichever side writes copies it first."""
        for seg in self.segments.values():
            seg.frozen = True
        return PageFile(self.layout, dict(self.segments), self._directory)

    def link_names(self) -> dict[str, Path]:
        """The segment files by snapshot name, frozen (a snapshot links them, and fsyncs them)."""
        out = {}
        for index, seg in sorted(self.segments.items()):
            seg.frozen = True
            out[SEGMENT_NAME.format(index)] = seg.path
        return out

    @classmethod
    def open_linked(cls, layout: PageLayout, indices: list[int]) -> PageFile:
        """The store a snapshot links (its files from `linked_files`), read-only until written (then copied)."""
        files = linked_files.get()
        size = layout.file_bytes
        segments = {}
        for index in indices:
            name = SEGMENT_NAME.format(index)
            path = files.get(name)
            if path is None:
                raise SnapshotError(f"the snapshot does not link {name}, which its disk store needs")
            if path.stat().st_size != size:
                raise SnapshotError(f"{path} has {path.stat().st_size} bytes; a segment of this store has {size}")
            segments[index] = _Segment.linked(path)
        return cls(layout, segments)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a snapshot records of this store besides its (linked) files: the layout and the segments."""
        return {**self.layout.tensors(), "segments": torch.tensor(sorted(self.segments), dtype=torch.long)}

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor]) -> PageFile:
        """The store `tensors()` recorded, its files linked by the snapshot being loaded (`snapshot_files`)."""
        return cls.open_linked(PageLayout.from_tensors(t), t["segments"].tolist())

    def disk_bytes(self) -> int:
        """Bytes the segment files occupy on disk (allocated blocks: the files are sparse)."""
        return sum(os.fstat(seg.fd).st_blocks * 512 for seg in self.segments.values())


def _pages_of(slots: slice | torch.Tensor, size: int) -> tuple[list[int], slice | torch.Tensor]:
    """The pages (of `size` slots) holding `slots`, in order, and the slots' positions in the buffer those
    pages read into."""
    if isinstance(slots, slice):
        start, stop = slots.start or 0, slots.stop
        if stop is None or slots.step not in (None, 1):
            raise TypeError("a page file reads a slot slice with an end and step 1")
        first = start // size
        pages = list(range(first, -(-stop // size))) if stop > start else []
        return pages, slice(start - first * size, stop - first * size)
    page = torch.div(slots, size, rounding_mode="floor")
    unique, where = torch.unique(page, return_inverse=True)
    return unique.tolist(), where * size + slots % size


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """`x` contiguous, viewed as bytes (numpy has no bf16; bytes it has)."""
    return x.contiguous().view(torch.uint8)


def _scratch_dir() -> Path:
    """This process's scratch directory for segment files under the current LONGCTX_HOME (removed at exit);
    removes those no live process holds (a crashed run's)."""
    return _scratch_under(longctx_home() / "stores", os.getpid())


@functools.cache
def _scratch_under(root: Path, pid: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("work-*"):
        _remove_if_abandoned(old)
    path = Path(tempfile.mkdtemp(prefix=f"work-{pid}-", dir=root))
    lock = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held for the process's life: the directory is in use
    atexit.register(shutil.rmtree, str(path), True)  # segments unlink themselves sooner, once unused
    return path


def _remove_if_abandoned(directory: Path) -> None:
    """Remove a scratch directory whose lock no process holds (its owner is gone, whatever its pid says).
    One without a lock file is skipped while young: its owner may be about to take the lock."""
    try:
        lock = os.open(directory / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            if time.time() - directory.stat().st_mtime > 3600:
                shutil.rmtree(directory, ignore_errors=True)
        return
    except OSError:
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(directory, ignore_errors=True)
    except BlockingIOError:
        pass  # in use
    finally:
        os.close(lock)
