"""Rate-limit bookkeeping, retry backoff and the metrics of GitHub calls.

Kept free of PyGithub so other parts (the simulated GitHub, the simulator) can
import the same metrics without registering them twice.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from collections.abc import Mapping

from prometheus_client import Counter, Gauge

from orchestrator.core.clock import Clock
from orchestrator.github.base import GitHubRateLimited

log = logging.getLogger("orchestrator.github")

GITHUB_CALLS = Counter(
    "orchestrator_github_calls_total",
    "GitHub REST calls by templated endpoint and HTTP status ('error' when no response came)",
    ["endpoint", "status"],
)
GITHUB_RATE_LIMIT_REMAINING = Gauge(
    "orchestrator_github_rate_limit_remaining",
    "X-RateLimit-Remaining of the most recent GitHub response",
)

# GitHub asks to wait at least a minute after a secondary limit without Retry-After.
SECONDARY_DEFAULT_WAIT_S = 60.0
# A primary-limit answer without X-RateLimit-Reset still needs some pause.
PRIMARY_DEFAULT_WAIT_S = 60.0

_SECONDARY_RE = re.compile(r"secondary rate limit|abuse detection", re.I)
_PRIMARY_RE = re.compile(r"^api rate limit exceeded", re.I)

_NAMED_SEGMENT = {
    "orgs": "{org}",
    "users": "{username}",
    "installations": "{id}",
    "runners": "{runner_id}",
    "runner-groups": "{runner_group_id}",
    "jobs": "{job_id}",
    "runs": "{run_id}",
    "attempts": "{attempt}",
}


def endpoint_template(path: str) -> str:
    """'/orgs/acme/actions/runners/7' -> '/orgs/{org}/actions/runners/{runner_id}'.

    Keeps the metric's label set small whatever the owners, repos and ids are.
    """
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    out: list[str] = []
    i = 0
    while i < len(parts):
        seg = parts[i]
        out.append(seg)
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        if nxt is None:
            break
        if seg == "repos" and not out[:-1]:
            out += ["{owner}", "{repo}"]
            i += 3
            continue
        named = _NAMED_SEGMENT.get(seg)
        if named and (seg in ("orgs", "users") or nxt.isdigit()):
            out.append(named)
            i += 2
            continue
        if nxt.isdigit():
            out.append("{id}")
            i += 2
            continue
        i += 1
    return "/" + "/".join(out)


def _header(headers: Mapping[str, object], name: str) -> str | None:
    value = headers.get(name.lower())
    if value is None:
        value = headers.get(name)
    return None if value is None else str(value)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class RateLimitGate:
    """Per-credential rate-limit state, judged on the injected clock.

    Once GitHub says a bucket is empty (remaining 0, a secondary limit, or
    Retry-After), calls on it fail at once until the clock passes the reset.
    """

    def __init__(self, clock: Clock):
        self._clock = clock
        self._lock = threading.Lock()
        self._blocked_until: dict[str, float] = {}
        self._remaining: dict[str, tuple[int, float]] = {}

    def check(self, bucket: str, what: str) -> None:
        now = self._clock.time()
        with self._lock:
            until = self._blocked_until.get(bucket)
            if until is not None and now < until:
                raise GitHubRateLimited(f"GitHub rate limit reached; {what} held until {until:.0f}", until)
            if until is not None:
                del self._blocked_until[bucket]

    def remaining(self, bucket: str) -> tuple[int, float] | None:
        with self._lock:
            return self._remaining.get(bucket)

    def observe(self, bucket: str, headers: Mapping[str, object], *, track_gauge: bool = True) -> None:
        """Record the rate-limit headers of any response."""
        remaining = _float(_header(headers, "X-RateLimit-Remaining"))
        reset = _float(_header(headers, "X-RateLimit-Reset"))
        if remaining is None:
            return
        with self._lock:
            self._remaining[bucket] = (int(remaining), reset or 0.0)
            if remaining <= 0:
                until = reset if reset is not None else self._clock.time() + PRIMARY_DEFAULT_WAIT_S
                if self._blocked_until.get(bucket, 0) < until:
                    self._blocked_until[bucket] = until
                    log.warning("GitHub rate limit exhausted (%s); calls paused until %.0f", _bucket_kind(bucket), until)
        if track_gauge:
            GITHUB_RATE_LIMIT_REMAINING.set(int(remaining))

    def limited(self, bucket: str, status: int, headers: Mapping[str, object], message: str) -> float | None:
        """If this response is a rate-limit refusal, block the bucket and return until when."""
        if status not in (403, 429):
            return None
        now = self._clock.time()
        retry_after = _float(_header(headers, "Retry-After"))
        remaining = _float(_header(headers, "X-RateLimit-Remaining"))
        reset = _float(_header(headers, "X-RateLimit-Reset"))
        until: float | None = None
        if retry_after is not None:
            until = now + max(retry_after, 0.0)
        elif remaining is not None and remaining <= 0:
            until = reset if reset is not None and reset > now else now + PRIMARY_DEFAULT_WAIT_S
        elif _SECONDARY_RE.search(message or ""):
            until = now + SECONDARY_DEFAULT_WAIT_S
        elif _PRIMARY_RE.search(message or ""):
            until = reset if reset is not None and reset > now else now + PRIMARY_DEFAULT_WAIT_S
        elif status == 429:
            until = now + SECONDARY_DEFAULT_WAIT_S
        if until is None:
            return None
        with self._lock:
            if self._blocked_until.get(bucket, 0) < until:
                self._blocked_until[bucket] = until
        return until


def _bucket_kind(bucket: str) -> str:
    # Buckets of personal tokens never name the token itself.
    return bucket.split(":", 1)[0] if bucket.startswith("token") else bucket


class Backoff:
    """Jittered exponential backoff: attempt n waits about base * 2**n, capped."""

    def __init__(self, rng: random.Random, *, base: float = 0.5, cap: float = 8.0):
        self._rng = rng
        self.base = base
        self.cap = cap

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        ceiling = min(self.cap, self.base * (2**attempt))
        d = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if retry_after is not None:
            d = max(d, min(retry_after, 60.0))
        return d
