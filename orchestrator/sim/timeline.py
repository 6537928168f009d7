"""Callbacks due at clock times: the sandbox cloud and the simulated GitHub run on it.

The simulator jumps the FakeClock from one due time to the next; the demo runs
it against the wall clock from a background thread.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from typing import Callable

from orchestrator.core.clock import Clock


class Timeline:
    def __init__(self, clock: Clock):
        self.clock = clock
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._heap, (t, next(self._seq), fn))

    def after(self, seconds: float, fn: Callable[[], None]) -> None:
        self.at(self.clock.time() + max(seconds, 0.0), fn)

    def next_time(self) -> float | None:
        with self._lock:
            return self._heap[0][0] if self._heap else None

    def run_due(self) -> int:
        """Run every callback due by now (including ones they schedule for now)."""
        ran = 0
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > self.clock.time():
                    return ran
                _, _, fn = heapq.heappop(self._heap)
            fn()
            ran += 1

    def __len__(self) -> int:
        return len(self._heap)
