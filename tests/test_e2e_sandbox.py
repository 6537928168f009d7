"""End to end through the simulated GitHub: its webhooks are delivered in-process into the same
intake path as POST /webhook; the sandbox VMs bootstrap through the lifecycle service, run the
job at the simulated GitHub and power off. Time is the FakeClock, moved by the test."""

from __future__ import annotations

from orch_support import make_config

BUDGET = "[{name: daily, scope: global, period: daily, limit_usd: 50, on_exceed: block}]"
REPO = "octo-org/models"


def settle(orch, clock, seconds: float, step: float = 5.0) -> None:
    """Move simulated time forward, running whatever falls due on the way."""
    elapsed = 0.0
    while elapsed < seconds:
        clock.advance(step)
        elapsed += step
        orch.timeline.run_due()


def live_vms(orch) -> list:
    return orch.sandbox_world.live()


def test_job_runs_end_to_end(make_orch, sqlite_url, clock):
    orch = make_orch(make_config(sqlite_url, budgets=BUDGET))
    sim_job = orch.github.enqueue_job(REPO, ["self-hosted", "gpu-t4"], duration_s=120)
    job = orch.store.get_job(sim_job.id)
    assert job.state == "queued" and job.pool == "gpu-t4"

    outcomes = orch.scaler.run_once()
    assert [o.result for o in outcomes] == ["launched"]
    assert orch.store.get_job(sim_job.id).state == "assigned"
    inst_name = outcomes[0].instance
    assert len(live_vms(orch)) == 1

    # The VM boots, trades its bootstrap token for the JIT config, and GitHub gives it the job.
    settle(orch, clock, 60)
    assert sim_job.status == "in_progress" and sim_job.runner_name == inst_name
    job = orch.store.get_job(sim_job.id)
    assert job.state == "in_progress" and job.runner_name == inst_name
    assert orch.store.get_instance(inst_name).state == "busy"

    settle(orch, clock, 130)
    assert sim_job.status == "completed" and sim_job.conclusion == "success"
    assert orch.store.get_job(sim_job.id).state == "completed"

    orch.reaper.run_once()
    assert live_vms(orch) == []
    inst = orch.store.get_instance(inst_name)
    assert inst.state == "terminated" and inst.cost_usd > 0
    # The JIT config is not kept once served.
    assert inst.jit_config is None
    budget = orch.budgets.view("daily")
    assert budget.spent_usd > 0 and budget.reserved_usd == 0
    assert abs(budget.spent_usd - inst.cost_usd) < 1e-9
    # The runner left GitHub with its job (ephemeral).
    assert all(r.name != inst_name for r in orch.github.runners.values())


def test_max_runners_holds_the_third_job(make_orch, sqlite_url, clock):
    orch = make_orch(make_config(sqlite_url, max_runners=2, budgets=BUDGET))
    jobs = [orch.github.enqueue_job(REPO, ["self-hosted", "gpu-t4"], duration_s=60) for _ in range(3)]
    outcomes = {o.job_id: o.result for o in orch.scaler.run_once()}
    assert sorted(outcomes.values()) == ["held:max_runners", "launched", "launched"]
    held = next(j for j in jobs if outcomes[j.id] == "held:max_runners")
    row = orch.store.get_job(held.id)
    assert (row.state, row.reason) == ("queued", "max_runners")
    assert len(orch.store.live_instances("gpu-t4")) == 2 and len(live_vms(orch)) == 2

    # Still full while the first two run: nothing more launches.
    settle(orch, clock, 60)
    assert [o.result for o in orch.scaler.run_once() if o.job_id == held.id] in ([], ["held:max_runners"])
    assert len(live_vms(orch)) == 2

    # The first two finish and their VMs go; the third launches.
    settle(orch, clock, 60)
    orch.reaper.run_once()
    assert live_vms(orch) == []
    # GitHub hands queued jobs to runners oldest first, whichever job a VM was launched for;
    # the job left without a VM is the one queued again now.
    (waiting,) = [j for j in jobs if orch.store.get_job(j.id).state == "queued"]
    outcomes = orch.scaler.run_once()
    assert [(o.job_id, o.result) for o in outcomes] == [(waiting.id, "launched")]
    settle(orch, clock, 130)
    orch.reaper.run_once()
    assert all(j.status == "completed" and j.conclusion == "success" for j in jobs)
    assert all(orch.store.get_job(j.id).state == "completed" for j in jobs)
    assert live_vms(orch) == []


def test_waiting_job_launches_only_after_approval(make_orch, clock):
    orch = make_orch()
    sim_job = orch.github.enqueue_job(REPO, ["self-hosted", "gpu-t4"], duration_s=30, waiting=True)
    assert orch.store.get_job(sim_job.id).state == "waiting"
    assert orch.scaler.run_once() == []
    settle(orch, clock, 600)
    assert orch.scaler.run_once() == [] and live_vms(orch) == []

    orch.github.approve(sim_job.id)
    assert orch.store.get_job(sim_job.id).state == "queued"
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    settle(orch, clock, 90)
    orch.reaper.run_once()
    assert sim_job.status == "completed"
    assert orch.store.get_job(sim_job.id).state == "completed"
    assert live_vms(orch) == []


def test_unique_runner_job_end_to_end(make_orch, clock):
    orch = make_orch()
    sim_job = orch.github.enqueue_job(REPO, ["self-hosted", "gpu-t4--run7-0"], duration_s=30)
    plain = orch.github.enqueue_job(REPO, ["self-hosted", "gpu-t4"], duration_s=30)
    outcomes = {o.job_id: o for o in orch.scaler.run_once()}
    assert {o.result for o in outcomes.values()} == {"launched"}
    settle(orch, clock, 90)
    # Each job ran on the VM launched for it: the unique runner was not taken by the plain job.
    assert sim_job.runner_name == outcomes[sim_job.id].instance
    assert plain.runner_name == outcomes[plain.id].instance
    orch.reaper.run_once()
    assert live_vms(orch) == []


def test_unmatched_and_disallowed_jobs_launch_nothing(make_orch, clock):
    orch = make_orch()
    orch.github.enqueue_job(REPO, ["self-hosted", "tpu-v5"], duration_s=30)
    orch.github.enqueue_job("someone-else/repo", ["self-hosted", "gpu-t4"], duration_s=30)
    orch.github.enqueue_job(REPO, ["ubuntu-latest"], duration_s=30)
    assert orch.scaler.run_once() == []
    settle(orch, clock, 120)
    assert live_vms(orch) == []
    assert sorted(j.reason for j in orch.store.jobs()) == ["no-matching-pool", "repository-not-allowed"]
