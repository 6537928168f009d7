"""Shared test support: configs, an Orchestrator on a FakeClock, signed webhooks, Postgres.

Tests import helpers from here (`from orch_support import ...`); conftest.py re-exports the fixtures.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import uuid
from pathlib import Path

import sys

import pytest

from orchestrator.config import load_config_text
from orchestrator.core.clock import FakeClock

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `tests.fakes` lives at the repository root
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
WEBHOOK_SECRET = "test-webhook-secret"
ADMIN_TOKEN = "test-admin-token"
IN_CI = os.environ.get("CI", "").lower() == "true"

SANDBOX_CONFIG = """
github:
  simulated: true
  webhook_secret: {secret}
  allowed_repositories: ["octo-org/*", "Codertocat/*", "lineville/*"]
  allow_public_repositories: true
server:
  admin_tokens: [{admin}]
  reaper_interval: 30s
  public_url: http://127.0.0.1:9
database:
  url: {db}
pools:
  - name: gpu-t4
    labels: [gpu-t4]
    max_runners: {max_runners}
    idle_timeout: 10m
    boot_timeout: 10m
    max_lifetime: 6h
    candidates:
      - {{cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.25}}
      - {{cloud: sandbox, instance_type: gpu-t4-sim, spot: false, price_per_hour: 0.50}}
  - name: k8s
    labels: [k8s]
    candidates:
      - {{cloud: sandbox, instance_type: cpu-sim, spot: false, price_per_hour: 0.10}}
budgets: {budgets}
"""


def fixtures_required(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"shared fixtures missing at {path}: the repo must sit beside shared/")
    return path


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/orchestrator.db"


def _pg_base_url() -> str:
    return os.environ.get("ORCHESTRATOR_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def postgres_url() -> str:
    """A fresh schema-isolated Postgres database per test; CI=true makes an unreachable server fatal."""
    from sqlalchemy import create_engine, text

    base = _pg_base_url()
    try:
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            name = f"orch_test_{uuid.uuid4().hex[:10]}"
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:
        if IN_CI or os.environ.get("ORCHESTRATOR_TEST_DATABASE_URL"):
            pytest.fail(f"PostgreSQL unreachable at {base}: {e}")
        pytest.skip(f"PostgreSQL unreachable ({type(e).__name__}); set ORCHESTRATOR_TEST_DATABASE_URL")
    url = base.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def any_db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/orchestrator.db"
    return request.getfixturevalue("postgres_url")


def make_config(db_url: str, *, max_runners: int = 10, budgets: str = "[]", text: str | None = None):
    body = text or SANDBOX_CONFIG
    return load_config_text(
        body.format(secret=WEBHOOK_SECRET, admin=ADMIN_TOKEN, db=db_url, max_runners=max_runners, budgets=budgets),
        "<test>",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_orch(sqlite_url, clock):
    """Build an Orchestrator on the sandbox + simulated GitHub, FakeClock, SQLite (or a given URL)."""
    from orchestrator.app import Orchestrator

    made = []

    def factory(config=None, **kwargs):
        cfg = config or make_config(sqlite_url)
        orch = Orchestrator(cfg, clock=kwargs.pop("clock", clock), **kwargs)
        made.append(orch)
        return orch

    yield factory
    for orch in made:
        orch.stop()
        orch.store.close()


def sign(body: bytes, secret: str = WEBHOOK_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_headers(body: bytes, *, event: str = "workflow_job", delivery: str | None = None, secret: str = WEBHOOK_SECRET) -> dict:
    return {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(body, secret),
        "Content-Type": "application/json",
    }


def job_payload(action: str = "queued", *, job_id: int = 1, labels=("self-hosted", "gpu-t4"), repo: str = "octo-org/models",
                run_attempt: int = 1, runner_name: str | None = None, conclusion: str | None = None, status: str | None = None,
                private: bool = True) -> dict:
    owner = repo.split("/")[0]
    return {
        "action": action,
        "workflow_job": {
            "id": job_id, "run_id": 900000 + job_id, "run_attempt": run_attempt, "status": status or action,
            "conclusion": conclusion, "labels": list(labels), "runner_id": None, "runner_name": runner_name,
            "name": "train", "workflow_name": "ci",
        },
        "repository": {"full_name": repo, "name": repo.split("/")[1], "private": private, "owner": {"login": owner}},
        "installation": {"id": 77},
    }


@pytest.fixture
def client_for():
    """A FastAPI TestClient for an Orchestrator (no background threads: tests drive the loops)."""
    from fastapi.testclient import TestClient

    from orchestrator.app import create_app

    clients = []

    def factory(orch):
        c = TestClient(create_app(orch, background=False))
        clients.append(c)
        return c

    yield factory
    for c in clients:
        c.close()


def post_webhook(client, payload: dict | bytes, **kw):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.post("/webhook", content=body, headers=webhook_headers(body, **kw))
