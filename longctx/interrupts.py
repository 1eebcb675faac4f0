"""Graceful Ctrl-C: the first SIGINT asks the driver to stop after the current segment (so the memory is
saved in a consistent state); a second one aborts at once."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any


class GracefulInterrupt:
    """Context manager and `stop()` predicate for `run_stream`."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None  # signal.signal's handler

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nlongctx: stopping after this segment to save the memory (Ctrl-C again aborts without saving)",
              file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.requested


def stop_after(segments: int):
    """A `stop()` predicate that asks to stop after `segments` segments (tests, benchmarks, API users)."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= segments

    return stop
