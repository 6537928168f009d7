"""Fixtures for the GCP and Azure providers: each SDK talks HTTP to a local fake."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import pytest

# A bare `pytest` does not put the repository root on sys.path; `tests.fakes` lives there.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import requests.adapters  # noqa: E402

from orchestrator.config import AzureCloud, GcpCloud  # noqa: E402
from orchestrator.core.clock import FakeClock  # noqa: E402
from orchestrator.providers.azure import AzureProvider  # noqa: E402
from orchestrator.providers.gcp import GcpProvider  # noqa: E402
from tests.fakes.azure_server import AzureFake  # noqa: E402
from tests.fakes.gce_server import GceFake  # noqa: E402
from tests.fakes.lro import no_real_sleep  # noqa: E402,F401  (autouse in this folder)
from tests.gcp_azure.gcp_azure_support import ORCH_ID, PROJECT  # noqa: E402

@pytest.fixture(autouse=True)
def local_http_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Both SDKs send through requests: fail if anything leaves 127.0.0.1."""
    sent: list[str] = []
    real = requests.adapters.HTTPAdapter.send

    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(request.url)
        host = urlsplit(request.url).hostname
        if host not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"request left the test machine: {request.method} {request.url}")
        return real(self, request, *args, **kwargs)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
    yield sent


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def gce_server() -> Iterator[GceFake]:
    with GceFake(project=PROJECT) as fake:
        yield fake


@pytest.fixture
def gce(gce_server: GceFake) -> Iterator[GceFake]:
    gce_server.reset()
    gce_server.list_page_size = None
    yield gce_server


@pytest.fixture
def make_gcp(gce: GceFake, clock: FakeClock) -> Callable[..., GcpProvider]:
    def make(orchestrator_id: str = ORCH_ID, **cloud: Any) -> GcpProvider:
        cloud.setdefault("project", PROJECT)
        cloud.setdefault("api_endpoint", gce.endpoint)
        return GcpProvider(GcpCloud(**cloud), orchestrator_id, clock, poll_sleep=lambda s: None)

    return make


@pytest.fixture
def gcp(make_gcp: Callable[..., GcpProvider]) -> GcpProvider:
    return make_gcp()


@pytest.fixture(scope="module")
def azure_server() -> Iterator[AzureFake]:
    with AzureFake() as fake:
        yield fake


@pytest.fixture
def az(azure_server: AzureFake) -> Iterator[AzureFake]:
    azure_server.reset()
    azure_server.list_page_size = 50
    yield azure_server


@pytest.fixture
def make_azure(az: AzureFake, clock: FakeClock) -> Callable[..., AzureProvider]:
    def make(orchestrator_id: str = ORCH_ID, **cloud: Any) -> AzureProvider:
        cloud.setdefault("subscription_id", az.subscription_id)
        cloud.setdefault("resource_group", az.resource_group)
        cloud.setdefault("subnet_id", az.subnet_id)
        cloud.setdefault("base_url", az.endpoint)
        return AzureProvider(AzureCloud(**cloud), orchestrator_id, clock,
                             credential=az.credential(), client_kwargs=az.client_kwargs())

    return make


@pytest.fixture
def azure(make_azure: Callable[..., AzureProvider]) -> AzureProvider:
    return make_azure()
