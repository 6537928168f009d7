"""Callback mode asks GitHub for the runner config after the launch: the VM needs it only once booted."""

from __future__ import annotations

from orch_support import job_payload, post_webhook
from orchestrator.github.base import GitHubUnavailable


def test_launch_comes_first_and_a_refused_launch_costs_no_github_call(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    order: list[str] = []
    jit, launch = orch.github.create_jit_config, orch.providers["sandbox"].launch
    orch.github.create_jit_config = lambda *a, **k: (order.append("jit"), jit(*a, **k))[1]
    orch.providers["sandbox"].launch = lambda spec: (order.append("launch"), launch(spec))[1]
    orch.sandbox_world.fail_next_launches(1)  # the spot candidate has no capacity
    post_webhook(client, job_payload("queued", job_id=31))
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    assert order == ["launch", "launch", "jit"]
    assert orch.github.calls["jit"] == 1


def test_github_down_after_launch_is_retried_and_the_vm_waits(make_orch, client_for, clock):
    orch = make_orch()
    client = client_for(orch)
    real = orch.github.create_jit_config
    failures = [GitHubUnavailable("502 from GitHub")]

    def flaky(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    orch.github.create_jit_config = flaky
    post_webhook(client, job_payload("queued", job_id=32))
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    inst = orch.store.live_instances()[0]
    assert inst.state == "booting" and inst.jit_config is None and inst.runner_id is None
    # The VM boots before the config exists: its bootstrap gets 503 and it retries.
    clock.advance(45)
    orch.timeline.run_due()
    assert orch.store.get_instance(inst.id).state == "booting"
    assert client.post("/api/v1/bootstrap", headers={"Authorization": "Bearer " + next(iter(orch.sandbox_world.vms.values())).metadata["bootstrap_token"]}).status_code == 503
    orch.scaler.run_once()  # the next pass makes the config
    assert orch.store.get_instance(inst.id).jit_config
    clock.advance(10)
    orch.timeline.run_due()
    assert orch.store.get_instance(inst.id).state == "idle"


def test_while_github_fails_no_more_vms_are_launched(make_orch, client_for, clock):
    orch = make_orch()
    client = client_for(orch)
    real = orch.github.create_jit_config
    down = [True]

    def maybe(*args, **kwargs):
        if down[0]:
            raise GitHubUnavailable("GitHub is down")
        return real(*args, **kwargs)

    orch.github.create_jit_config = maybe
    post_webhook(client, job_payload("queued", job_id=41))
    orch.scaler.run_once()  # launched before GitHub was known to be down; its config comes later
    post_webhook(client, job_payload("queued", job_id=42))
    assert [o.result for o in orch.scaler.run_once()] == ["held:github:unavailable"]
    assert len(orch.sandbox_world.live()) == 1
    job = orch.store.get_job(42)
    assert job.state == "queued" and job.reason == "github:unavailable"
    down[0] = False
    clock.advance(3600)
    orch.scaler.run_once()
    assert orch.store.get_job(42).state == "assigned"
    assert all(i.jit_config or i.bootstrap_used for i in orch.store.live_instances())
