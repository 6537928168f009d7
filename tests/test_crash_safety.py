"""A process killed between two steps: one reaper pass leaves cloud, store, budgets and GitHub consistent."""

from __future__ import annotations

import uuid

import pytest

from orch_support import ADMIN_TOKEN, WEBHOOK_SECRET, job_payload
from orchestrator.config import load_config_text
from orchestrator.core.reaper import LAUNCH_GRACE_S
from orchestrator.core.states import INSTANCE_GONE, INSTANCE_LIVE, InstanceState
from orchestrator.providers.base import LaunchSpec, managed_tags, vm_name
from orchestrator.store.models import Reservation

CONFIG = f"""
github:
  simulated: true
  webhook_secret: {WEBHOOK_SECRET}
  allowed_repositories: ["octo-org/*"]
server:
  admin_tokens: [{ADMIN_TOKEN}]
  reaper_interval: 30s
database:
  url: DB
pools:
  - name: gpu-t4
    labels: [gpu-t4]
    max_runners: 10
    boot_timeout: 10m
    max_lifetime: 6h
    candidates:
      - {{cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.25}}
budgets:
  - {{name: monthly, scope: global, period: monthly, limit_usd: 100, on_exceed: block}}
"""


class Crash(BaseException):
    """The process dies here: nothing after this line runs, no handler catches it."""


@pytest.fixture
def orch(make_orch, sqlite_url):
    return make_orch(load_config_text(CONFIG.replace("DB", sqlite_url), "<test>"))


def queue(orch, job_id: int) -> None:
    orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("queued", job_id=job_id))


def crash_in(monkeypatch, obj, name: str, *, after: bool = False) -> None:
    """Kill the process at a call: before it runs, or right after it returned."""
    real = getattr(obj, name)

    def dying(*args, **kwargs):
        if after:
            real(*args, **kwargs)
        raise Crash(name)

    monkeypatch.setattr(obj, name, dying)


def restart(make_orch, orch):
    """A fresh process on the same database, cloud and GitHub."""
    return make_orch(orch.config, sandbox_world=orch.sandbox_world, github=orch.github, timeline=orch.timeline)


def assert_consistent(orch) -> None:
    world, store = orch.sandbox_world, orch.store
    ours = {vm.name: vm for vm in world.live() if vm.tags.get("orchestrator-id") == orch.orchestrator_id}
    rows = {i.id: i for i in store.instances()}
    # Every VM in the cloud has a live record that knows its cloud id, and the other way round.
    for name, vm in ours.items():
        assert name in rows and InstanceState(rows[name].state) in INSTANCE_LIVE, name
        assert rows[name].instance_id == vm.instance_id
    for inst in rows.values():
        if InstanceState(inst.state) in INSTANCE_LIVE:
            assert inst.id in ours, f"{inst.id} is {inst.state} but has no VM"
            assert inst.state != InstanceState.REQUESTED.value
    # Budgets: live VMs hold reservations; ended VMs are settled at no less than the cloud bills.
    with store.session() as s:
        reservations = s.query(Reservation).all()
    for r in reservations:
        inst = rows[r.instance_id]
        if InstanceState(inst.state) in INSTANCE_GONE:
            assert r.settled_at is not None, inst.id
            vm = next((v for v in world.vms.values() if v.name == inst.id), None)
            billed = world.cost_usd(vm) if vm is not None else 0.0
            assert r.cost_usd >= billed - 1e-9, inst.id
        else:
            assert r.settled_at is None, inst.id
    view = orch.budgets.view("monthly")
    live_names = {i.id for i in rows.values() if InstanceState(i.state) in INSTANCE_LIVE}
    assert view.reserved_usd == pytest.approx(sum(r.amount_usd for r in reservations if r.instance_id in live_names))
    # Jobs: one waiting for a VM has exactly one; none is stuck mid-claim.
    for job in store.jobs():
        serving = [i for i in rows.values() if i.job_id == job.id and InstanceState(i.state) in INSTANCE_LIVE]
        if job.state == "assigned":
            assert len(serving) == 1, job.id
        assert job.state != "launching", job.id
        if job.state == "queued":
            assert serving == [], job.id
    # GitHub: every runner registered under our name belongs to a live VM.
    for r in orch.github.runners.values():
        if r.name.startswith(orch.orchestrator_id + "-"):
            assert r.name in live_names, f"runner {r.name} outlived its VM"


# --- (1) launched, not recorded ---------------------------------------------------------


def test_launched_not_recorded_is_adopted(make_orch, orch, clock, monkeypatch):
    queue(orch, 1)
    crash_in(monkeypatch, orch.scaler, "_launched")  # the cloud made the VM; we never wrote that down
    with pytest.raises(Crash):
        orch.scaler.run_once()
    inst = orch.store.instances()[0]
    assert inst.state == "requested" and inst.instance_id is None
    assert orch.store.get_job(1).state == "launching"
    assert len(orch.sandbox_world.live()) == 1

    after = restart(make_orch, orch)
    result = after.reaper.run_once()
    assert [a.kind for a in result.actions] == ["adopt"], [str(a) for a in result.actions]
    assert_consistent(after)
    adopted = after.store.get_instance(inst.id)
    assert adopted.state == "booting" and adopted.instance_id == orch.sandbox_world.live()[0].instance_id
    assert after.store.get_job(1).state == "assigned"
    # And it carries on normally: it boots, bootstraps and becomes idle.
    clock.advance(60)
    after.timeline.run_due()
    assert after.store.get_instance(inst.id).state == "idle"


def test_launched_with_no_row_at_all_is_terminated(orch, clock):
    # A VM with our tags whose row was lost (a restore from backup, a rolled-back transaction).
    pool = orch.config.pool("gpu-t4")
    name = vm_name(orch.orchestrator_id, pool.name, "99-1-1")
    orch.providers["sandbox"].launch(LaunchSpec(
        name=name, launch_key="99-1-1", candidate=pool.candidates[0], pool=pool, user_data="",
        tags=managed_tags(orch.orchestrator_id, pool.name, name),
    ))
    result = orch.reaper.run_once()
    assert [a.kind for a in result.actions] == ["orphan"]
    assert_consistent(orch)


def test_launched_row_already_failed_is_terminated_and_settled(orch, clock, monkeypatch):
    queue(orch, 2)
    crash_in(monkeypatch, orch.scaler, "_launched")
    with pytest.raises(Crash):
        orch.scaler.run_once()
    monkeypatch.undo()
    clock.advance(LAUNCH_GRACE_S + 1)
    # Another replica's reaper saw no VM yet (a lagging listing) and failed the row.
    name = orch.store.instances()[0].id
    orch.reaper._never_launched(orch.store.get_instance(name))
    assert orch.store.get_job(2).state == "queued"
    result = orch.reaper.run_once()
    assert "orphan" in [a.kind for a in result.actions]
    assert orch.sandbox_world.live() == []
    orch.scaler.run_once()  # the requeued job gets a new VM
    assert_consistent(orch)


# --- (2) recorded, not launched ------------------------------------------------------------


def test_recorded_not_launched_fails_settles_at_zero_and_requeues(make_orch, orch, clock, monkeypatch):
    queue(orch, 3)
    crash_in(monkeypatch, orch.providers["sandbox"], "launch")  # the row and JIT runner exist; the cloud call never went out
    with pytest.raises(Crash):
        orch.scaler.run_once()
    monkeypatch.undo()
    inst = orch.store.instances()[0]
    assert inst.state == "requested" and orch.sandbox_world.vms == {}
    assert orch.budgets.view("monthly").reserved_usd > 0

    after = restart(make_orch, orch)
    clock.advance(LAUNCH_GRACE_S - 5)
    assert after.reaper.run_once().actions == []  # it may still be mid-launch
    clock.advance(10)
    result = after.reaper.run_once()
    assert [a.kind for a in result.actions] == ["never-launched"]
    assert_consistent(after)
    failed = after.store.get_instance(inst.id)
    assert failed.state == "failed" and failed.reason == "never-launched"
    with after.store.session() as s:
        res = s.query(Reservation).filter_by(instance_id=inst.id).one()
    assert res.settled_at is not None and res.cost_usd == 0.0
    view = after.budgets.view("monthly")
    assert view.reserved_usd == 0 and view.spent_usd == 0
    job = after.store.get_job(3)
    assert job.state == "queued" and job.reason == "never-launched"
    assert [o.result for o in after.scaler.run_once()] == ["launched"]
    assert after.store.get_job(3).launch_attempts == 2
    assert_consistent(after)


def test_claimed_not_recorded_is_requeued(make_orch, orch, clock, monkeypatch):
    queue(orch, 4)
    crash_in(monkeypatch, orch.scaler, "_record")  # claimed the job, died before writing the instance
    with pytest.raises(Crash):
        orch.scaler.run_once()
    monkeypatch.undo()
    assert orch.store.get_job(4).state == "launching"
    after = restart(make_orch, orch)
    clock.advance(301)
    result = after.reaper.run_once()
    assert [a.kind for a in result.actions] == ["requeue-job"]
    assert_consistent(after)
    assert [o.result for o in after.scaler.run_once()] == ["launched"]


# --- (3) terminated, not recorded ------------------------------------------------------------


def _idle_runner(orch, clock, job_id: int, *, start_job: bool):
    queue(orch, job_id)
    orch.scaler.run_once()
    clock.advance(60)
    orch.timeline.run_due()
    inst = orch.store.live_instances()[0]
    assert inst.state == "idle"
    if start_job:
        orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("in_progress", job_id=job_id, runner_name=inst.id))
        assert orch.store.get_instance(inst.id).state == "busy"
    return orch.store.get_instance(inst.id)


def test_terminated_not_recorded_idle_requeues_its_unstarted_job(make_orch, orch, clock):
    inst = _idle_runner(orch, clock, 5, start_job=False)
    clock.advance(120)
    orch.providers["sandbox"].terminate(inst.instance_id, inst.location)  # then the process died
    assert orch.store.get_instance(inst.id).state == "idle"
    after = restart(make_orch, orch)
    result = after.reaper.run_once()
    assert [a.kind for a in result.actions] == ["vm-gone"]
    final = after.store.get_instance(inst.id)
    assert final.state == "terminated" and final.cost_usd > 0
    job = after.store.get_job(5)
    assert job.state == "queued" and job.reason == "vanished"
    assert_consistent(after)
    assert [o.result for o in after.scaler.run_once()] == ["launched"]
    assert_consistent(after)


def test_terminated_not_recorded_busy_leaves_the_job_to_github(make_orch, orch, clock):
    inst = _idle_runner(orch, clock, 6, start_job=True)
    clock.advance(120)
    orch.providers["sandbox"].terminate(inst.instance_id, inst.location)
    after = restart(make_orch, orch)
    result = after.reaper.run_once()
    assert [a.kind for a in result.actions] == ["vm-gone"]
    final = after.store.get_instance(inst.id)
    assert final.state == "terminated" and final.reason == "vanished-while-busy"
    # GitHub fails the job on its own; it is not launched again behind its back.
    assert after.store.get_job(6).state == "in_progress"
    assert after.store.launchable_jobs() == []
    assert_consistent(after)


def test_crash_inside_teardown_after_terminate(make_orch, orch, clock, monkeypatch):
    inst = _idle_runner(orch, clock, 7, start_job=False)
    orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("completed", job_id=7, conclusion="cancelled"))
    clock.advance(11 * 60)
    orch.reaper.run_once()  # the first idle confirmation
    crash_in(monkeypatch, orch.reaper, "finish_instance")  # deregistered, terminated, then died before writing it down
    with pytest.raises(Crash):
        orch.reaper.run_once()
    monkeypatch.undo()
    assert orch.store.get_instance(inst.id).state == "draining" and orch.sandbox_world.live() == []
    after = restart(make_orch, orch)
    result = after.reaper.run_once()
    assert [a.kind for a in result.actions] == ["vm-gone"]
    assert after.store.get_instance(inst.id).state == "terminated"
    assert_consistent(after)


def test_crash_inside_admin_delete_after_terminate(make_orch, orch, clock, monkeypatch):
    inst = _idle_runner(orch, clock, 8, start_job=False)
    crash_in(monkeypatch, orch.reaper, "finish_instance")
    with pytest.raises(Crash):
        orch.teardown_runner(inst.id)
    monkeypatch.undo()
    after = restart(make_orch, orch)
    after.reaper.run_once()
    assert_consistent(after)
    job = after.store.get_job(8)
    assert job.state == "queued"
