"""sha256 of files and file prefixes, streamed in 1 MiB blocks (model caches, snapshots, documents)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    """Hex sha256 of a file, or of its first `limit` bytes."""
    h, left = hashlib.sha256(), limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            block = f.read(1 << 20 if left is None else min(left, 1 << 20))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()
