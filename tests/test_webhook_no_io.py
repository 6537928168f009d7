"""The webhook handler records only: it never calls GitHub or a cloud, so acks stay fast."""

from __future__ import annotations

from orch_support import job_payload, post_webhook


def test_webhook_calls_neither_github_nor_a_cloud(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    calls: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called from the webhook path")
        return call

    for name in ("create_jit_config", "list_runners", "delete_runner", "rerun_job", "list_queued_jobs"):
        setattr(orch.github, name, refuse(f"github.{name}"))
    for name in ("launch", "terminate", "list_managed", "price_per_hour"):
        setattr(orch.providers["sandbox"], name, refuse(f"cloud.{name}"))
    for action, extra in (("queued", {}), ("in_progress", {"runner_name": "x"}), ("completed", {"conclusion": "success"})):
        r = post_webhook(client, job_payload(action, job_id=77, **extra))
        assert r.status_code == 202, r.text
    assert calls == []
    assert orch.store.get_job(77).state == "completed"
