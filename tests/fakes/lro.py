"""Shared by the test folders that drive the GCP and Azure SDKs against the fake servers."""

from __future__ import annotations

import time
from typing import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_real_sleep(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """LRO polling against the fakes must not wait in real time."""
    slept: list[float] = []
    real = time.sleep

    def sleep(seconds: float) -> None:
        if seconds > 0:
            slept.append(seconds)
        real(0)

    monkeypatch.setattr(time, "sleep", sleep)
    yield slept
    assert not slept, f"something slept for real: {slept}"
