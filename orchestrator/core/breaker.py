"""Spot circuit breaker per capacity pool (cloud, region, instance type).

After repeated capacity errors or interruptions, spot there is skipped for a
cool-down, so jobs fall through to the next candidate at once.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque

from orchestrator.core.clock import Clock


class SpotBreaker:
    def __init__(self, clock: Clock, *, threshold: int = 3, window_s: float = 600, cooldown_s: float = 900):
        self.clock = clock
        self.threshold = threshold
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._open_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def record_failure(self, key: str) -> None:
        now = self.clock.time()
        with self._lock:
            q = self._failures[key]
            q.append(now)
            while q and q[0] < now - self.window_s:
                q.popleft()
            if len(q) >= self.threshold:
                self._open_until[key] = now + self.cooldown_s
                q.clear()

    def record_success(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def is_open(self, key: str) -> bool:
        with self._lock:
            until = self._open_until.get(key)
            if until is None:
                return False
            if self.clock.time() >= until:
                del self._open_until[key]
                return False
            return True
