"""Generated requests against every operation in /openapi.json: no server errors, admin token included."""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from orch_support import ADMIN_TOKEN, WEBHOOK_SECRET, job_payload
from orchestrator.app import create_app
from orchestrator.config import load_config_text

CONFIG = """
github:
  simulated: true
  webhook_secret: {secret}
  allowed_repositories: ["octo-org/*"]
server:
  admin_tokens: [{admin}]
database:
  url: {db}
pools:
  - name: gpu-t4
    labels: [gpu-t4]
    candidates:
      - {{cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.25}}
budgets:
  - {{name: monthly, scope: global, limit_usd: 100}}
"""

EXAMPLES_PER_OPERATION = 12


@pytest.fixture
def app(make_orch, sqlite_url):
    orch = make_orch(load_config_text(CONFIG.format(secret=WEBHOOK_SECRET, admin=ADMIN_TOKEN, db=sqlite_url), "<test>"))
    # Some state for the list and delete operations to chew on.
    for job_id in (1, 2):
        orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("queued", job_id=job_id))
    orch.scaler.run_once()
    return create_app(orch, background=False)


def test_no_operation_answers_5xx(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/v1/budgets", "/api/v1/runners/{runner_id}", "/webhook", "/api/v1/bootstrap"}
    failures: list[str] = []
    for op in operations:

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            # Admin calls carry the token; the webhook and VM calls carry none of theirs, as an attacker would.
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if case.path.startswith("/api/v1") and "instances" not in case.path and "bootstrap" not in case.path else {}
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

        try:
            check()
        except Exception as e:  # noqa: BLE001 - collect every operation's failure, then report them together
            failures.append(f"{op.method.upper()} {op.path}: {e}")
    assert not failures, "\n\n".join(failures)
