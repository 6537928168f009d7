"""The VM-facing API: a single-use bootstrap token bound to one instance that expires at
boot_timeout, and lifecycle events authenticated by the instance's own token."""

from __future__ import annotations

import logging

from orch_support import job_payload, post_webhook


def _launch(orch, client, job_id: int):
    post_webhook(client, job_payload("queued", job_id=job_id))
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    inst = next(i for i in orch.store.live_instances() if i.job_id == job_id)
    vm = next(v for v in orch.sandbox_world.vms.values() if v.name == inst.id)
    return inst, vm.metadata["bootstrap_token"]


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_bootstrap_token_works_once_and_never_reaches_a_log(make_orch, client_for, caplog):
    orch = make_orch()
    client = client_for(orch)
    inst, token = _launch(orch, client, 51)
    caplog.set_level(logging.DEBUG)
    r = client.post("/api/v1/bootstrap", headers=_bearer(token))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["instance_id"] == body["runner_name"] == inst.id
    assert body["jit_config"] and body["instance_token"]
    assert orch.store.get_instance(inst.id).jit_config is None, "served once, then forgotten"
    assert orch.store.get_instance(inst.id).state == "idle"
    replay = client.post("/api/v1/bootstrap", headers=_bearer(token))
    assert replay.status_code == 401
    assert client.post("/api/v1/bootstrap", headers=_bearer("not-a-token")).status_code == 401
    assert client.post("/api/v1/bootstrap").status_code == 401
    assert token not in caplog.text and body["instance_token"] not in caplog.text and body["jit_config"] not in caplog.text


def test_bootstrap_token_expires_at_boot_timeout(make_orch, client_for, clock):
    orch = make_orch()
    client = client_for(orch)
    _, token = _launch(orch, client, 52)
    clock.advance(orch.config.pool("gpu-t4").boot_timeout + 1)
    assert client.post("/api/v1/bootstrap", headers=_bearer(token)).status_code == 401


def test_events_need_the_instance_token(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    inst, token = _launch(orch, client, 53)
    instance_token = client.post("/api/v1/bootstrap", headers=_bearer(token)).json()["instance_token"]
    url = f"/api/v1/instances/{inst.id}/events"
    assert client.post(url, json={"event": "job-started"}, headers=_bearer("wrong")).status_code == 401
    assert client.post(url, json={"event": "job-started"}).status_code == 401
    # The spent bootstrap token no longer speaks for the VM.
    assert client.post(url, json={"event": "job-started"}, headers=_bearer(token)).status_code == 401
    assert client.post(url, json={"event": "reboot"}, headers=_bearer(instance_token)).status_code == 400
    assert client.post(url, json={"event": "job-started", "detail": {"job_id": 53}}, headers=_bearer(instance_token)).status_code == 200
    assert orch.store.get_instance(inst.id).state == "busy"
    # Another instance's token does not work here.
    other, other_token = _launch(orch, client, 54)
    assert client.post(url, json={"event": "job-completed"}, headers=_bearer(other_token)).status_code == 401
    assert client.post(url, json={"event": "job-completed"}, headers=_bearer(instance_token)).status_code == 200
    assert orch.store.get_instance(inst.id).state == "draining"


def test_preflight_failure_posts_with_the_unused_bootstrap_token_and_requeues(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    inst, token = _launch(orch, client, 55)
    r = client.post(f"/api/v1/instances/{inst.id}/events", json={"event": "preflight-failed", "detail": {"reason": "0 of 1 GPUs"}}, headers=_bearer(token))
    assert r.status_code == 200, r.text
    row = orch.store.get_instance(inst.id)
    assert row.state == "draining" and row.reason.startswith("preflight-failed")
    job = orch.store.get_job(55)
    assert job.state == "queued" and job.reason == "preflight-failed"
    result = orch.reaper.run_once()
    assert any(a.kind == "drain" and a.target == inst.id for a in result.actions)
    assert orch.store.get_instance(inst.id).state == "terminated"
