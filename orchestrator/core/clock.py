"""The only source of "now". Every timeout, age, period and price reads a Clock."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Timezone-aware UTC now."""

    def time(self) -> float:
        """Seconds since the epoch (same instant as now())."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def time(self) -> float:
        return time.time()


class FakeClock:
    """A clock that only moves when told to: tests and the simulator run days in seconds."""

    def __init__(self, start: datetime | float | None = None):
        if start is None:
            start = datetime(2026, 1, 1, tzinfo=timezone.utc)
        if isinstance(start, datetime):
            start = start.timestamp()
        self._t = float(start)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._t, tz=timezone.utc)

    def time(self) -> float:
        return self._t

    def advance(self, seconds: float | timedelta) -> None:
        if isinstance(seconds, timedelta):
            seconds = seconds.total_seconds()
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        with self._lock:
            self._t += seconds

    def set(self, t: datetime | float) -> None:
        if isinstance(t, datetime):
            t = t.timestamp()
        with self._lock:
            if t < self._t:
                raise ValueError("a clock does not go backwards")
            self._t = float(t)


def as_utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
