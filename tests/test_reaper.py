"""Every reaper rule on the sandbox cloud and the simulated GitHub, time from a FakeClock."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY

from orch_support import ADMIN_TOKEN, WEBHOOK_SECRET, job_payload
from orchestrator.config import load_config_text
from orchestrator.core.reaper import IDLE_CONFIRMATIONS, STUCK_LAUNCHING_S
from orchestrator.core.scaler import MAX_LAUNCH_ATTEMPTS
from orchestrator.github.base import DeleteResult, RunnerScope
from orchestrator.providers.base import LaunchSpec, managed_tags, vm_name
from orchestrator.store.models import Reservation

LABELS = ["self-hosted", "gpu-t4"]
REPO = "octo-org/models"

CONFIG = """
github:
  simulated: true
  webhook_secret: {secret}
  allowed_repositories: ["octo-org/*"]
  runner_scope: org
server:
  admin_tokens: [{admin}]
  reaper_interval: 30s
  public_url: http://127.0.0.1:9
database:
  url: {db}
pools:
  - name: gpu-t4
    labels: [gpu-t4]
    max_runners: 20
    min_idle: {min_idle}
    idle_timeout: 10m
    boot_timeout: 10m
    max_lifetime: {max_lifetime}
    on_spot_interruption: {on_spot}
    candidates:
      - {{cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.25}}
      - {{cloud: sandbox, instance_type: gpu-t4-od, spot: false, price_per_hour: 0.50}}
budgets: {budgets}
"""


TRACKING = "[{name: all, scope: global, period: monthly, limit_usd: 1000, on_exceed: alert}]"


def sandbox_config(db: str, *, min_idle: int = 0, max_lifetime: str = "6h", on_spot: str = "rerun", budgets: str = TRACKING):
    text = CONFIG.format(secret=WEBHOOK_SECRET, admin=ADMIN_TOKEN, db=db, min_idle=min_idle, max_lifetime=max_lifetime,
                         on_spot=on_spot, budgets=budgets)
    return load_config_text(text, "<test>")


@pytest.fixture
def orch(make_orch, sqlite_url):
    return make_orch(sandbox_config(sqlite_url))


def queue(orch, job_id: int, **kw) -> str:
    return orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("queued", job_id=job_id, **kw))


def deliver(orch, action: str, job_id: int, **kw) -> str:
    return orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload(action, job_id=job_id, **kw))


def boot(orch, clock, seconds: float = 60) -> None:
    clock.advance(seconds)
    orch.timeline.run_due()


def kinds(result) -> list[str]:
    return [a.kind for a in result.actions]


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def our_vms(orch) -> list:
    return [vm for vm in orch.sandbox_world.live() if vm.tags.get("orchestrator-id") == orch.orchestrator_id]


def drive(orch, clock, seconds: float, *, check=None, scale: bool = True) -> list:
    """Run simulated time: timeline callbacks in order, a scaler and a reaper pass every reaper_interval."""
    interval = orch.config.server.reaper_interval
    end = clock.time() + seconds
    nxt = getattr(orch, "_next_reap", clock.time() + interval)
    results = []
    while True:
        due = [t for t in (orch.timeline.next_time(), nxt, end) if t is not None]
        clock.set(max(min(due), clock.time()))
        orch.timeline.run_due()
        if clock.time() >= nxt:
            if scale:
                orch.scaler.run_once()
            results.append(orch.reaper.run_once())
            nxt += interval
        if check is not None:
            check()
        if clock.time() >= end:
            break
    orch._next_reap = nxt
    return results


def launched_idle_spare(orch, clock, job_id: int = 1):
    """A bootstrapped runner whose job was cancelled before it ran: idle, no job."""
    queue(orch, job_id)
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    boot(orch, clock)
    inst = orch.store.live_instances()[0]
    assert inst.state == "idle"
    deliver(orch, "completed", job_id, conclusion="cancelled")
    inst = orch.store.get_instance(inst.id)
    assert inst.job_id is None and inst.state == "idle"
    return inst


# --- idle ---------------------------------------------------------------------


def test_idle_runner_needs_two_passes_then_is_deregistered_before_termination(orch, clock):
    inst = launched_idle_spare(orch, clock)
    gh, world = orch.github, orch.sandbox_world
    assert any(r.name == inst.id and r.status == "online" for r in gh.runners.values())

    clock.advance(9 * 60)  # idle for about 9 minutes: under idle_timeout
    assert "idle" not in kinds(orch.reaper.run_once())
    assert "idle-check" not in kinds(orch.reaper.run_once())

    clock.advance(2 * 60)
    seen_vm_at_delete = []
    real_delete = gh.delete_runner

    def delete_runner(scope, runner_id, **kw):
        seen_vm_at_delete.append([vm.state for vm in world.vms.values() if vm.name == inst.id])
        return real_delete(scope, runner_id, **kw)

    gh.delete_runner = delete_runner
    first = orch.reaper.run_once()
    assert kinds(first) == ["idle-check"]
    assert orch.store.get_instance(inst.id).state == "idle" and len(our_vms(orch)) == 1
    assert seen_vm_at_delete == []

    assert IDLE_CONFIRMATIONS == 2
    second = orch.reaper.run_once()
    assert kinds(second) == ["idle"]
    # Deregistered at GitHub while the VM still ran, then terminated and settled.
    assert seen_vm_at_delete == [["running"]]
    assert our_vms(orch) == []
    assert not any(r.name == inst.id for r in gh.runners.values())
    final = orch.store.get_instance(inst.id)
    assert final.state == "terminated" and final.reason == "idle" and final.cost_usd > 0


def test_idle_runner_github_reports_busy_is_kept(orch, clock):
    inst = launched_idle_spare(orch, clock)
    clock.advance(11 * 60)
    assert kinds(orch.reaper.run_once()) == ["idle-check"]
    runner = next(r for r in orch.github.runners.values() if r.name == inst.id)
    runner.busy = True  # GitHub handed it a job we have not heard of yet: DELETE answers 422
    assert orch.github.delete_runner(RunnerScope("octo-org"), runner.id) == DeleteResult.BUSY
    result = orch.reaper.run_once()
    assert kinds(result) == ["idle"] and "busy" in result.actions[0].detail
    kept = orch.store.get_instance(inst.id)
    assert kept.state == "busy" and kept.idle_checks == 0
    assert len(our_vms(orch)) == 1 and runner.id in orch.github.runners


def test_runner_that_takes_a_job_between_passes_is_not_reaped(orch, clock):
    inst = launched_idle_spare(orch, clock)
    clock.advance(11 * 60)
    assert kinds(orch.reaper.run_once()) == ["idle-check"]
    orch.lifecycle.apply_event(inst.id, "job-started", {})
    assert orch.reaper.run_once().actions == []
    assert orch.store.get_instance(inst.id).state == "busy"
    assert len(our_vms(orch)) == 1


# --- boot timeout ---------------------------------------------------------------


def test_boot_timeout_requeues_with_reason_and_gives_up_after_max_attempts(orch, clock):
    orch.sandbox_world.guest = None  # VMs boot but never run the bootstrap script
    queue(orch, 2)
    for attempt in range(1, MAX_LAUNCH_ATTEMPTS + 1):
        assert [o.result for o in orch.scaler.run_once()] == ["launched"], attempt
        boot(orch, clock, 5 * 60)
        assert "boot-timeout" not in kinds(orch.reaper.run_once())
        clock.advance(5 * 60 + 1)
        result = orch.reaper.run_once()
        assert "boot-timeout" in kinds(result), [str(a) for a in result.actions]
        job = orch.store.get_job(2)
        assert job.state == "queued" and job.reason == "boot-timeout" and job.launch_attempts == attempt
        assert our_vms(orch) == []
        # The runner never came online: its registration is gone too, now or as a ghost next pass.
        orch.reaper.run_once()
        assert [r for r in orch.github.runners.values() if r.name.startswith(orch.orchestrator_id)] == []
    outcome = orch.scaler.run_once()
    assert [o.result for o in outcome] == ["held:gave-up"]
    job = orch.store.get_job(2)
    assert job.state == "queued" and job.reason.startswith("gave-up:") and str(MAX_LAUNCH_ATTEMPTS) in job.reason
    assert our_vms(orch) == []
    assert all(i.state == "terminated" for i in orch.store.instances())


# --- max lifetime ---------------------------------------------------------------


def test_busy_vm_is_terminated_at_max_lifetime_and_none_outlives_it(make_orch, sqlite_url, clock):
    orch = make_orch(sandbox_config(sqlite_url, max_lifetime="1h"))
    lifetime, interval = 3600, orch.config.server.reaper_interval
    leaked_before = sample("orchestrator_leaked_vms_total")
    sim_job = orch.github.enqueue_job(REPO, LABELS, duration_s=3 * 3600)  # longer than any VM may live

    def no_vm_outlives_max_lifetime():
        now = clock.time()
        for vm in orch.sandbox_world.vms.values():
            end = vm.terminated_at if vm.terminated_at is not None else now
            assert end - vm.launched_at <= lifetime + interval, vm.name

    results = drive(orch, clock, 2 * 3600, check=no_vm_outlives_max_lifetime)
    lifetime_kills = [a for r in results for a in r.actions if a.kind == "max-lifetime"]
    assert len(lifetime_kills) == 1
    inst = orch.store.get_instance(lifetime_kills[0].target)
    assert inst.state == "terminated" and inst.reason == "max-lifetime"
    assert inst.busy_since is not None  # it was running the job, and was killed anyway
    vm = next(v for v in orch.sandbox_world.vms.values() if v.name == inst.id)
    # Killed by the reaper one tick early: never billed past the reservation.
    assert vm.terminated_at - vm.launched_at <= lifetime
    assert sim_job.status == "completed" and sim_job.conclusion == "failure"
    assert sample("orchestrator_leaked_vms_total") == leaked_before
    # A plain lifetime kill is not a spot interruption: nothing is rerun.
    assert orch.github.calls["rerun"] == 0


def test_leaked_vm_counter_counts_a_vm_past_max_lifetime_plus_one_tick(make_orch, sqlite_url, clock):
    orch = make_orch(sandbox_config(sqlite_url, max_lifetime="1h"))
    orch.sandbox_world.guest = None  # no in-VM watchdog either
    queue(orch, 3)
    orch.scaler.run_once()
    before = sample("orchestrator_leaked_vms_total")
    clock.advance(2 * 3600)  # the reaper did not run for two hours
    result = orch.reaper.run_once()
    assert "max-lifetime" in kinds(result)
    assert sample("orchestrator_leaked_vms_total") == before + 1
    assert our_vms(orch) == []


# --- orphans ----------------------------------------------------------------------


def _orphan_spec(orch, key: str) -> LaunchSpec:
    pool = orch.config.pool("gpu-t4")
    name = vm_name(orch.orchestrator_id, pool.name, key)
    return LaunchSpec(name=name, launch_key=key, candidate=pool.candidates[0], pool=pool, user_data="",
                      tags=managed_tags(orch.orchestrator_id, pool.name, name))


def test_tagged_vm_without_record_is_terminated_and_foreign_vms_are_untouched(orch, clock):
    provider = orch.providers["sandbox"]
    vm = provider.launch(_orphan_spec(orch, "lost-1"))
    foreign = orch.sandbox_world.add_foreign({"orchestrator-id": "someone-else", "orchestrator-runner": vm.name}, name=vm.name)
    untagged = orch.sandbox_world.add_foreign({}, name="hand-made")
    result = orch.reaper.run_once()
    assert kinds(result) == ["orphan"] and result.actions[0].target == vm.name
    assert orch.sandbox_world.vms[vm.instance_id].state == "terminated"
    assert foreign.state == "running" and untagged.state == "running"
    assert orch.reaper.run_once().actions == []


def test_record_whose_vm_vanished_is_terminated_and_settled(orch, clock):
    queue(orch, 4)
    orch.scaler.run_once()
    boot(orch, clock)
    inst = orch.store.live_instances()[0]
    vm = our_vms(orch)[0]
    clock.advance(600)
    orch.sandbox_world.terminate(vm.instance_id)  # gone behind our back
    clock.advance(30)
    result = orch.reaper.run_once()
    assert kinds(result) == ["vm-gone"]
    final = orch.store.get_instance(inst.id)
    assert final.state == "terminated"
    with orch.store.session() as s:
        res = s.query(Reservation).filter_by(instance_id=inst.id).all()
    assert res and all(r.settled_at is not None for r in res)
    # Settled at no less than what the cloud bills.
    assert res[0].cost_usd >= orch.sandbox_world.cost_usd(vm) - 1e-9
    assert final.cost_usd == pytest.approx(res[0].cost_usd)
    job = orch.store.get_job(4)
    assert job.state == "queued" and job.reason == "vanished"
    assert orch.budgets.view("all").reserved_usd == 0


def test_record_gone_but_vm_running_is_terminated(orch, clock):
    queue(orch, 5)
    orch.scaler.run_once()
    inst = orch.store.live_instances()[0]
    with orch.store.session() as s:
        from orchestrator.core.states import InstanceState

        orch.store.transition_instance(s, inst.id, InstanceState.FAILED, reason="transient")
    result = orch.reaper.run_once()
    assert "orphan" in kinds(result)
    assert our_vms(orch) == []


# --- ghost runners ----------------------------------------------------------------


def test_offline_runner_with_our_prefix_and_no_vm_is_deleted(orch, clock):
    queue(orch, 6)
    orch.scaler.run_once()  # a booting VM: its runner is registered and offline
    booting = orch.store.live_instances()[0]
    scope = RunnerScope("octo-org")
    gh = orch.github
    ghost = gh.create_jit_config(scope, name=vm_name(orch.orchestrator_id, "gpu-t4", "ghost"), labels=LABELS)
    online = gh.create_jit_config(scope, name=vm_name(orch.orchestrator_id, "gpu-t4", "online"), labels=LABELS)
    gh.runners[online.runner_id].status = "online"
    # Another orchestrator whose id starts with ours, and a runner a person registered.
    cousin = gh.create_jit_config(scope, name=vm_name(orch.orchestrator_id + "-x", "gpu-t4", "c"), labels=LABELS)
    other = gh.create_jit_config(scope, name="build-box-1", labels=LABELS)
    result = orch.reaper.run_once()
    assert [(a.kind, a.target) for a in result.actions] == [("ghost-runner", ghost.name)]
    left = {r.name for r in gh.runners.values()}
    assert ghost.name not in left
    assert {booting.id, online.name, cousin.name, other.name} <= left


# --- stuck jobs -------------------------------------------------------------------


def test_assigned_job_without_live_runner_is_relaunched_after_boot_timeout(orch, clock):
    queue(orch, 7)
    orch.scaler.run_once()
    inst = orch.store.live_instances()[0]
    # Its VM went away and the record was closed without giving the job back (an old bug, a manual edit).
    orch.sandbox_world.terminate(our_vms(orch)[0].instance_id)
    orch.store.update_instance(inst.id, state="terminated")
    assert orch.store.get_job(7).state == "assigned"
    clock.advance(5 * 60)
    assert "requeue-job" not in kinds(orch.reaper.run_once())
    clock.advance(5 * 60 + 1)
    result = orch.reaper.run_once()
    assert "requeue-job" in kinds(result)
    job = orch.store.get_job(7)
    assert job.state == "queued" and job.reason == "no-live-runner"
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    assert orch.store.get_job(7).state == "assigned"


def test_abandoned_launch_claim_is_requeued(orch, clock):
    queue(orch, 8)
    assert orch.store.claim_job(8, "a-worker-that-died")
    clock.advance(STUCK_LAUNCHING_S - 10)
    assert orch.reaper.run_once().actions == []
    clock.advance(20)
    assert kinds(orch.reaper.run_once()) == ["requeue-job"]
    assert orch.store.get_job(8).state == "queued"
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]


# --- spot interruption ------------------------------------------------------------


def _running_spot_job(orch, clock):
    sim_job = orch.github.enqueue_job(REPO, LABELS, duration_s=3600)
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    boot(orch, clock)
    inst = orch.store.live_instances()[0]
    assert inst.spot and inst.candidate_index == 0
    assert inst.state == "busy" and sim_job.status == "in_progress"
    return sim_job, inst


def _rerun_of(orch, sim_job):
    return [j for j in orch.github.jobs.values() if j.rerun_of == sim_job.id]


@pytest.mark.parametrize("how", ["notice", "vanish", "vanish-seen-first"])
def test_spot_interruption_reruns_on_the_next_on_demand_candidate(orch, clock, how):
    sim_job, inst = _running_spot_job(orch, clock)
    vm = our_vms(orch)[0]
    clock.advance(300)
    if how == "notice":
        orch.guest.interrupt(orch.sandbox_world.vms[vm.instance_id])  # posts spot-interruption, then the VM goes
    elif how == "vanish":
        orch.sandbox_world.terminate(vm.instance_id)  # no notice; GitHub fails the job at once
    else:
        # The reaper sees the VM gone before GitHub gives up on the job.
        orch.sandbox_world.on_terminated = None
        orch.sandbox_world.terminate(vm.instance_id)
        clock.advance(30)
        assert kinds(orch.reaper.run_once()) == ["vm-gone"]
        orch.github.runner_lost(inst.id)
    assert sim_job.conclusion == "failure"
    assert orch.store.get_job(sim_job.id).state == "completed"
    clock.advance(30)
    results = [orch.reaper.run_once(), orch.reaper.run_once()]
    assert sum(k == "spot-rerun" for r in results for k in kinds(r)) == 1
    assert orch.github.calls["rerun"] == 1
    assert orch.store.get_instance(inst.id).state == "terminated"
    (rerun,) = _rerun_of(orch, sim_job)
    assert orch.store.get_job(rerun.id).state == "queued"
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    new = next(i for i in orch.store.live_instances() if i.job_id == rerun.id)
    assert new.candidate_index == 1 and not new.spot
    boot(orch, clock)
    assert rerun.status == "in_progress" and rerun.runner_name == new.id
    # Nothing more to do for the old attempt.
    assert "spot-rerun" not in kinds(orch.reaper.run_once())


def test_spot_interruption_with_fail_policy_does_not_rerun(make_orch, sqlite_url, clock):
    orch = make_orch(sandbox_config(sqlite_url, on_spot="fail"))
    sim_job, inst = _running_spot_job(orch, clock)
    orch.guest.interrupt(orch.sandbox_world.vms[our_vms(orch)[0].instance_id])
    results = [orch.reaper.run_once(), orch.reaper.run_once()]
    assert "spot-fail" in [k for r in results for k in kinds(r)]
    assert orch.github.calls["rerun"] == 0 and _rerun_of(orch, sim_job) == []
    job = orch.store.get_job(sim_job.id)
    assert job.state == "completed" and job.reason == "spot-interrupted"
    assert orch.store.launchable_jobs() == []


def test_ordinary_job_failure_is_not_rerun(orch, clock):
    sim_job, inst = _running_spot_job(orch, clock)
    runner = orch.github.runners[sim_job.runner_id]
    orch.github._finish(sim_job, "failure")  # the tests failed; the runner reports it and powers off
    orch.github.runners.pop(runner.id)
    runner.on_completed(sim_job)
    results = [orch.reaper.run_once(), orch.reaper.run_once()]
    assert not any(k.startswith("spot-") for r in results for k in kinds(r))
    assert orch.github.calls["rerun"] == 0


# --- warm pools -------------------------------------------------------------------


def test_warm_pool_keeps_min_idle_and_replaces_a_runner_that_takes_a_job(make_orch, sqlite_url, clock):
    orch = make_orch(sandbox_config(sqlite_url, min_idle=2))
    result = orch.reaper.run_once()
    assert kinds(result) == ["warm-launch", "warm-launch"]
    assert kinds(orch.reaper.run_once()) == []  # booting ones count toward the floor
    boot(orch, clock)
    warm = orch.store.live_instances()
    assert len(warm) == 2 and all(i.warm and i.state == "idle" and i.job_id is None for i in warm)
    assert all(i.runner_scope == "org:octo-org" for i in warm)
    clock.advance(3600)  # far past idle_timeout: the floor keeps them
    assert orch.reaper.run_once().actions == [] and orch.reaper.run_once().actions == []
    assert len(our_vms(orch)) == 2

    sim_job = orch.github.enqueue_job(REPO, LABELS, duration_s=600)  # GitHub hands it to a warm runner
    assert sim_job.status == "in_progress"
    assert orch.scaler.run_once() == []  # nothing to launch: the job already runs
    assert kinds(orch.reaper.run_once()) == ["warm-launch"]
    boot(orch, clock)
    spare = [i for i in orch.store.live_instances() if i.job_id is None and i.state == "idle"]
    assert len(spare) == 2


def test_warm_pool_reload_with_lower_floor_reaps_only_the_excess(make_orch, sqlite_url, clock):
    orch = make_orch(sandbox_config(sqlite_url, min_idle=3))
    orch.reaper.run_once()
    boot(orch, clock)
    assert len(orch.store.live_instances()) == 3
    reloaded = make_orch(sandbox_config(sqlite_url, min_idle=1), sandbox_world=orch.sandbox_world, github=orch.github)
    clock.advance(3600)
    first = reloaded.reaper.run_once()
    second = reloaded.reaper.run_once()
    assert kinds(first).count("idle-check") == 2 and kinds(second).count("idle") == 2
    assert len(reloaded.store.live_instances()) == 1
    assert kinds(reloaded.reaper.run_once()) == []


def test_warm_pool_needs_one_owner_and_org_scope(make_orch, sqlite_url, clock):
    text = CONFIG.format(secret=WEBHOOK_SECRET, admin=ADMIN_TOKEN, db=sqlite_url, min_idle=1, max_lifetime="6h", on_spot="rerun", budgets="[]")
    text = text.replace('allowed_repositories: ["octo-org/*"]', 'allowed_repositories: ["octo-org/*", "other-org/*"]')
    orch = make_orch(load_config_text(text, "<test>"))
    result = orch.reaper.run_once()
    assert kinds(result) == ["warm-launch"] and "skipped" in result.actions[0].detail
    assert orch.store.live_instances() == []


def test_paused_pool_gets_no_warm_runners(make_orch, sqlite_url, clock):
    orch = make_orch(sandbox_config(sqlite_url, min_idle=1))
    orch.store.set_paused("gpu-t4", True)
    assert orch.reaper.run_once().actions == []
    orch.store.set_paused("gpu-t4", False)
    assert kinds(orch.reaper.run_once()) == ["warm-launch"]
