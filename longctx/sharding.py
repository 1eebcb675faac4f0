"""Documents split across processes started by `accelerate launch` or `torchrun` (docs/architecture.md "Beyond one machine").

One document is sequential, so processes share the work at the level of whole documents: Accelerate's
`split_between_processes` gives each rank a contiguous run of the document list, each rank scores its
documents, and the per-file results (exact sums) are gathered so that every rank holds all of them and
rank 0 prints. Results travel as JSON bytes in a uint8 tensor (no pickle, unlike `gather_object`).
Without WORLD_SIZE > 1 in the environment nothing here touches torch.distributed.
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def is_main_process() -> bool:
    """Rank 0, or not launched as several processes: the one that prints progress and results."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Shard:
    """This process's place among the launched processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    state: Any = None  # accelerate.PartialState when world > 1

    def split(self, n: int) -> list[int]:
        """Indices of the documents this process scores (contiguous, as `split_between_processes` gives)."""
        if self.world == 1:
            return list(range(n))
        with self.state.split_between_processes(list(range(n))) as mine:
            return list(mine)

    def device(self, device: str) -> str:
        """Each process on a GPU uses its own: 'cuda' becomes cuda:LOCAL_RANK."""
        if self.world > 1 and device in ("cuda", "auto") and torch.cuda.is_available():
            return f"cuda:{self.state.local_process_index}"
        return device

    def gather_json(self, obj: Any) -> list[Any]:
        """`obj` from every rank, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        dev = torch.device("cuda", self.state.local_process_index) if self.state.backend == "nccl" else torch.device("cpu")
        data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=dev)
        sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=dev))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
        padded[: data.numel()] = data
        out = [torch.zeros(longest, dtype=torch.uint8, device=dev) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return [json.loads(bytes(o[: int(s.item())].cpu().tolist())) for o, s in zip(out, sizes)]


def current_shard(device: str | None) -> Shard:
    """The launcher's WORLD_SIZE/RANK through Accelerate (gloo on CPU, nccl on GPUs); rank 0 of 1 otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    from accelerate import PartialState

    state = PartialState(cpu=(device or "cpu") == "cpu" or not torch.cuda.is_available())
    atexit.register(_close)
    return Shard(state.process_index, state.num_processes, state)


def _close() -> None:
    """Tear the process group down before the interpreter does: gloo's threads outliving it abort the
    process at exit ("terminate called without an active exception"), failing an otherwise good run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def in_order(pieces: Sequence[list[list[Any]]]) -> list[Any]:
    """Flatten gathered [[index, item], ...] lists from all ranks into document order."""
    pairs = sorted((int(i), item) for piece in pieces for i, item in piece)
    return [item for _, item in pairs]
