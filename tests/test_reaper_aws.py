"""The key reaper rules against EC2, spoken over HTTP to a moto server."""

from __future__ import annotations

import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from orch_support import ADMIN_TOKEN, WEBHOOK_SECRET, job_payload  # noqa: E402
from orchestrator.config import load_config_text  # noqa: E402
from orchestrator.core.clock import FakeClock  # noqa: E402
from orchestrator.providers.aws import AwsProvider  # noqa: E402
from orchestrator.providers.base import TAG_ID, TAG_POOL, TAG_RUNNER, vm_name  # noqa: E402
from orchestrator.store.models import Reservation  # noqa: E402
from tests.fakes.moto import MotoServer, moto_server  # noqa: E402,F401

ORCH_ID = "orch-reaper"
REGION = "us-east-1"
AMI = "ami-760aaa0f"  # a moto default image

CONFIG = """
github:
  simulated: true
  webhook_secret: {secret}
  allowed_repositories: ["octo-org/*"]
server:
  orchestrator_id: {orch_id}
  admin_tokens: [{admin}]
  reaper_interval: 30s
database:
  url: {db}
clouds:
  aws: {{region: {region}, endpoint_url: "{endpoint}"}}
pools:
  - name: gpu-t4
    labels: [gpu-t4]
    max_runners: 5
    boot_timeout: 10m
    max_lifetime: 1h
    candidates:
      - {{cloud: aws, region: {region}, instance_type: g4dn.xlarge, image: {ami}, spot: false, price_per_hour: 0.5}}
budgets:
  - {{name: monthly, scope: global, period: monthly, limit_usd: 100, on_exceed: block}}
"""


@pytest.fixture
def moto(moto_server: MotoServer) -> MotoServer:  # noqa: F811
    moto_server.reset()
    return moto_server


@pytest.fixture
def ec2(moto):
    return moto.client("ec2", REGION)


@pytest.fixture
def aws_clock() -> FakeClock:
    # EC2 stamps LaunchTime from the wall clock: start the fake one there, then move it by hand.
    return FakeClock(datetime.now(timezone.utc))


@pytest.fixture
def orch(make_orch, sqlite_url, moto, aws_clock):
    cfg = load_config_text(
        CONFIG.format(secret=WEBHOOK_SECRET, admin=ADMIN_TOKEN, db=sqlite_url, orch_id=ORCH_ID, region=REGION,
                      endpoint=moto.endpoint_url, ami=AMI),
        "<test>",
    )
    provider = AwsProvider(cfg.clouds.aws, ORCH_ID, aws_clock, session=moto.session(), max_attempts=1)
    return make_orch(cfg, clock=aws_clock, providers={"aws": provider})


def _run(ec2, tags: dict[str, str] | None = None) -> str:
    kw = {}
    if tags:
        kw["TagSpecifications"] = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
    return ec2.run_instances(ImageId=AMI, InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1, **kw)["Instances"][0]["InstanceId"]


def _state(ec2, instance_id: str) -> str:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]


def _launch_job(orch, job_id: int):
    orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("queued", job_id=job_id))
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    inst = orch.store.live_instances()[0]
    assert inst.cloud == "aws" and inst.instance_id.startswith("i-")
    return inst


def _reservation(orch, name: str) -> Reservation:
    with orch.store.session() as s:
        return s.query(Reservation).filter_by(instance_id=name).one()


def test_orphan_is_terminated_and_foreign_vms_are_untouched(orch, ec2):
    name = vm_name(ORCH_ID, "gpu-t4", "lost-1")
    orphan = _run(ec2, {TAG_ID: ORCH_ID, TAG_POOL: "gpu-t4", TAG_RUNNER: name})
    foreign = _run(ec2, {TAG_ID: "someone-else", TAG_POOL: "gpu-t4", TAG_RUNNER: name})
    untagged = _run(ec2)
    result = orch.reaper.run_once()
    assert [(a.kind, a.target) for a in result.actions] == [("orphan", name)], result.errors
    assert result.errors == []
    assert _state(ec2, orphan) in ("shutting-down", "terminated")
    assert _state(ec2, foreign) == "running" and _state(ec2, untagged) == "running"
    # The next pass finds nothing left to do.
    assert orch.reaper.run_once().actions == []


def test_vm_past_max_lifetime_is_terminated_and_settled(orch, ec2, aws_clock):
    inst = _launch_job(orch, 1)
    launched = inst.launched_at.timestamp()  # EC2's LaunchTime
    aws_clock.set(launched + 60)
    orch.lifecycle.apply_event(inst.id, "job-started", {})  # it runs a long job
    aws_clock.set(launched + 30 * 60)
    assert orch.reaper.run_once().actions == []
    aws_clock.set(launched + 3600 - 30)  # max_lifetime less one reaper tick
    result = orch.reaper.run_once()
    assert [a.kind for a in result.actions] == ["max-lifetime"], [str(a) for a in result.actions]
    assert _state(ec2, inst.instance_id) in ("shutting-down", "terminated")
    final = orch.store.get_instance(inst.id)
    assert final.state == "terminated" and final.reason == "max-lifetime"
    res = _reservation(orch, inst.id)
    assert res.settled_at is not None and 0 < res.cost_usd <= res.amount_usd
    assert orch.budgets.view("monthly").reserved_usd == 0


def test_vanished_vm_is_recorded_and_settled(orch, ec2, aws_clock):
    inst = _launch_job(orch, 2)
    aws_clock.advance(20 * 60)
    ec2.terminate_instances(InstanceIds=[inst.instance_id])  # a spot reclaim, or a person
    result = orch.reaper.run_once()
    assert [a.kind for a in result.actions] == ["vm-gone"], [str(a) for a in result.actions]
    final = orch.store.get_instance(inst.id)
    assert final.state == "terminated"
    res = _reservation(orch, inst.id)
    assert res.settled_at is not None and res.cost_usd == pytest.approx(final.cost_usd) and res.cost_usd > 0
    job = orch.store.get_job(2)
    assert job.state == "queued" and job.reason == "vanished"
    # And the job gets a new VM.
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]


def test_one_list_call_per_pass_whatever_the_number_of_vms(orch, ec2):
    for job_id in range(10, 14):
        orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("queued", job_id=job_id))
    assert [o.result for o in orch.scaler.run_once()] == ["launched"] * 4
    provider = orch.providers["aws"]
    before = dict(provider.api_calls)
    assert orch.reaper.run_once().actions == []
    used = {k: v - before.get(k, 0) for k, v in provider.api_calls.items() if v != before.get(k, 0)}
    assert used == {"describe_instances": 1}


def test_vm_that_never_registers_is_terminated_at_boot_timeout(orch, ec2, aws_clock):
    inst = _launch_job(orch, 3)
    aws_clock.advance(9 * 60)
    assert orch.reaper.run_once().actions == []
    aws_clock.advance(2 * 60)
    result = orch.reaper.run_once()
    assert [a.kind for a in result.actions] == ["boot-timeout"], [str(a) for a in result.actions]
    assert _state(ec2, inst.instance_id) in ("shutting-down", "terminated")
    job = orch.store.get_job(3)
    assert job.state == "queued" and job.reason == "boot-timeout"
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]


def test_idle_runner_needs_two_passes_then_is_deregistered_and_terminated(orch, ec2, aws_clock):
    inst = _launch_job(orch, 4)
    # The VM bootstrapped (as bootstrap.sh does); its job ran on another runner and finished.
    orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("completed", job_id=4, runner_name="elsewhere", conclusion="success"))
    now = aws_clock.now()
    orch.store.update_instance(inst.id, state="idle", bootstrapped_at=now, idle_since=now)
    assert orch.store.get_instance(inst.id).job_id is None
    aws_clock.advance(orch.config.pool("gpu-t4").idle_timeout + 1)
    first = orch.reaper.run_once()
    assert [a.kind for a in first.actions] == ["idle-check"], [str(a) for a in first.actions]
    assert _state(ec2, inst.instance_id) == "running"
    second = orch.reaper.run_once()
    assert "idle" in [a.kind for a in second.actions], [str(a) for a in second.actions]
    assert _state(ec2, inst.instance_id) in ("shutting-down", "terminated")
    assert orch.store.get_instance(inst.id).state == "terminated"
    assert all(r.name != inst.id for r in orch.github.runners.values()), "deregistered at GitHub"


def test_vm_lost_mid_job_gets_its_job_rerun_on_demand(orch, ec2, aws_clock):
    sim_job = orch.github.enqueue_job("octo-org/models", ["self-hosted", "gpu-t4"], 600)
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    inst = orch.store.live_instances()[0]
    orch.lifecycle.apply_event(inst.id, "spot-interruption", {})
    orch.lifecycle.apply_event(inst.id, "job-started", {})
    ec2.terminate_instances(InstanceIds=[inst.instance_id])  # reclaimed
    aws_clock.advance(120)
    payload = job_payload("completed", job_id=sim_job.id, runner_name=inst.id, conclusion="failure")
    orch.deliver_direct("workflow_job", str(uuid.uuid4()), payload)
    result = orch.reaper.run_once()
    kinds = [a.kind for a in result.actions]
    assert "spot-rerun" in kinds and "vm-gone" in kinds, [str(a) for a in result.actions]
    assert orch.github.calls["rerun"] == 1
    # The rerun (a new job of the same run) launches on the pool's next non-spot candidate.
    rerun = next(j for j in orch.store.jobs() if j.id != sim_job.id)
    assert rerun.run_id == sim_job.run_id and rerun.state == "queued"
