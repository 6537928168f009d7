"""Fixtures for the AWS provider: a moto server over HTTP and a provider pointed at it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest

# A bare `pytest` does not put the repository root on sys.path; `tests.fakes` lives there.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from orchestrator.config import AwsCloud  # noqa: E402
from orchestrator.core.clock import FakeClock  # noqa: E402
from orchestrator.providers.aws import AwsProvider  # noqa: E402
from tests.aws.aws_support import ORCH_ID, REGION, Sent, capture  # noqa: E402
from tests.fakes.moto import MotoServer, moto_server  # noqa: E402,F401


@pytest.fixture
def moto(moto_server: MotoServer) -> MotoServer:  # noqa: F811
    moto_server.reset()
    return moto_server


@pytest.fixture
def ec2(moto: MotoServer) -> Any:
    return moto.client("ec2", REGION)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_provider(moto: MotoServer, clock: FakeClock) -> Callable[..., AwsProvider]:
    def make(
        orchestrator_id: str = ORCH_ID, list_page_size: int = 1000, **cloud: Any
    ) -> AwsProvider:
        cloud.setdefault("region", REGION)
        cloud.setdefault("endpoint_url", moto.endpoint_url)
        # One attempt: botocore's retry backoff would sleep on injected 5xx answers.
        return AwsProvider(
            AwsCloud(**cloud),
            orchestrator_id,
            clock,
            session=moto.session(),
            max_attempts=1,
            list_page_size=list_page_size,
        )

    return make


@pytest.fixture
def provider(make_provider: Callable[..., AwsProvider]) -> AwsProvider:
    return make_provider()


@pytest.fixture
def sent_run(provider: AwsProvider) -> Sent:
    return capture(provider)
