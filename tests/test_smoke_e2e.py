"""End to end on the sandbox: queued -> runner launched -> in_progress -> completed -> VM gone."""

from orch_support import job_payload, post_webhook


def test_queued_to_vm_gone(make_orch, client_for, clock):
    orch = make_orch()
    client = client_for(orch)
    r = post_webhook(client, job_payload("queued", job_id=11))
    assert r.status_code == 202, r.text
    assert orch.store.get_job(11).state == "queued"
    outcomes = orch.scaler.run_once()
    assert [o.result for o in outcomes] == ["launched"]
    inst = orch.store.live_instances()[0]
    assert inst.state == "booting" and inst.job_id == 11
    world = orch.sandbox_world
    assert len(world.live()) == 1
    # The sandbox VM boots, bootstraps, registers at the simulated GitHub; the webhook is delivered by us here.
    clock.advance(60)
    orch.timeline.run_due()
    assert orch.store.get_instance(inst.id).state == "idle"
    r = post_webhook(client, job_payload("in_progress", job_id=11, runner_name=inst.id))
    assert r.status_code == 202
    assert orch.store.get_job(11).state == "in_progress"
    assert orch.store.get_instance(inst.id).state == "busy"
    r = post_webhook(client, job_payload("completed", job_id=11, runner_name=inst.id, conclusion="success"))
    assert orch.store.get_job(11).state == "completed"
    result = orch.reaper.run_once()
    assert any(a.kind == "drain" for a in result.actions), [str(a) for a in result.actions]
    assert world.live() == []
    final = orch.store.get_instance(inst.id)
    assert final.state == "terminated" and final.cost_usd > 0
