"""Fixtures for the real GitHub client: one fake GitHub over HTTP per session, reset per test."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# A bare `pytest` does not put the repository root on sys.path; `tests.fakes` lives there.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from orchestrator.config import GitHubConfig  # noqa: E402
from orchestrator.core.clock import FakeClock  # noqa: E402
from orchestrator.github.client import GitHubClient  # noqa: E402
from tests.fakes.github_server import FakeGitHubServer, generate_app_key  # noqa: E402

APP_ID = 4242


@dataclass(frozen=True)
class AppKey:
    private_path: Path
    private_pem: str
    public_pem: str


@dataclass(frozen=True)
class World:
    acme: int            # organization installation: acme/app, acme/lib
    alice: int           # user installation: alice/tool


@pytest.fixture(scope="session")
def app_key(tmp_path_factory: pytest.TempPathFactory) -> AppKey:
    private, public = generate_app_key()
    path = tmp_path_factory.mktemp("app") / "app.pem"
    path.write_text(private)
    return AppKey(path, private, public)


@pytest.fixture(scope="session")
def github_server_session(app_key: AppKey):
    server = FakeGitHubServer(app_id=APP_ID, public_key_pem=app_key.public_pem).start()
    yield server
    server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def github_server(github_server_session: FakeGitHubServer, clock: FakeClock) -> FakeGitHubServer:
    github_server_session.reset(clock=clock)
    return github_server_session


@pytest.fixture
def world(github_server: FakeGitHubServer) -> World:
    acme = github_server.add_installation("acme", repositories=["acme/app", "acme/lib"])
    alice = github_server.add_installation("alice", account_type="User", repositories=["alice/tool"])
    return World(acme=acme, alice=alice)


@pytest.fixture(autouse=True)
def no_real_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries must wait on the injected sleep; a real sleep is a bug."""

    def refuse(seconds: float) -> None:
        raise AssertionError(f"real time.sleep({seconds}) called")

    monkeypatch.setattr(time, "sleep", refuse)


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_client(github_server: FakeGitHubServer, app_key: AppKey, clock: FakeClock, sleeps: list[float]):
    made: list[GitHubClient] = []

    def make(**overrides) -> GitHubClient:
        fields = dict(
            api_url=github_server.url,
            app_id=APP_ID,
            private_key_path=str(app_key.private_path),
            webhook_secret="not-used-here",
            allowed_repositories=["acme/*"],
        )
        if "token" in overrides:
            fields.pop("app_id")
            fields.pop("private_key_path")
        fields.update(overrides)
        client = GitHubClient(GitHubConfig(**fields), clock, sleep=sleeps.append, rng=random.Random(7))
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
