"""Reaper scale benchmark: one reconcile pass over many managed VMs.

For each size, a fresh SQLite database holds that many live runner VMs (most busy
with a job, the rest just idle), as many ended ones from before (history a pass
must not drag along), their budget reservations, and the runners registered at
the simulated GitHub. The same VMs exist in the cloud: the sandbox cloud, and
(for the smaller sizes) EC2 on a moto server over HTTP. A pass over a healthy
fleet does nothing, so what is measured is the cost of looking.

Prints one JSON object: per cloud and size, the cloud list calls of one pass
(they must stay one per location plus pagination), the GitHub calls (one list
per runner scope), the actions taken (0 expected), the pass time in seconds and the part of it
spent inside the cloud's list call.

    python bench/reaper_scale.py [--sizes 100,1000,10000] [--aws-sizes 100,1000] [--db-url URL]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.app import Orchestrator  # noqa: E402
from orchestrator.config import load_config_text  # noqa: E402
from orchestrator.core.clock import FakeClock  # noqa: E402
from orchestrator.github.base import RunnerScope  # noqa: E402
from orchestrator.providers.base import LaunchSpec, managed_tags, vm_name  # noqa: E402
from orchestrator.store.models import Instance, Job, Reservation  # noqa: E402

ORCH_ID = "orch-bench"
AMI = "ami-760aaa0f"  # a moto default image
CONFIG = """
github:
  simulated: true
  webhook_secret: bench-secret
  allowed_repositories: ["bench-org/*"]
server:
  orchestrator_id: {orch_id}
  admin_tokens: [bench-admin-token]
  reaper_interval: 30s
database:
  url: {db}
{clouds}
pools:
  - name: gpu
    labels: [gpu]
    max_runners: 100000
    idle_timeout: 10m
    boot_timeout: 10m
    max_lifetime: 6h
    candidates:
      - {candidate}
budgets:
  - {{name: monthly, scope: global, period: monthly, limit_usd: 100000000}}
"""
SANDBOX_CANDIDATE = "{cloud: sandbox, instance_type: gpu-sim, spot: true, price_per_hour: 0.25}"
AWS_CANDIDATE = "{cloud: aws, region: us-east-1, instance_type: g4dn.xlarge, image: " + AMI + ", spot: false, price_per_hour: 0.5}"


def _config(db: str, *, aws_endpoint: str | None = None):
    clouds = f'clouds:\n  aws: {{region: us-east-1, endpoint_url: "{aws_endpoint}"}}' if aws_endpoint else ""
    text = CONFIG.format(orch_id=ORCH_ID, db=db, clouds=clouds, candidate=AWS_CANDIDATE if aws_endpoint else SANDBOX_CANDIDATE)
    return load_config_text(text, "<bench>")


def _populate(orch, vms: list[tuple[str, str, datetime]], clock) -> None:
    """Rows for live VMs (name, cloud id, launch time), an equal ended history, reservations, GitHub runners."""
    now = clock.now()
    pool = orch.config.pool("gpu")
    cand = pool.candidates[0]
    provider = orch.providers[cand.cloud]
    price = provider.price_per_hour(cand)
    location = provider.location_of(cand)
    scope = RunnerScope("bench-org")
    gh = orch.github
    jobs, instances, reservations = [], [], []
    for n, (name, cloud_id, launched) in enumerate(vms):
        busy = n % 10 < 7
        jit = gh.create_jit_config(scope, name=name, labels=["self-hosted", "linux", "x64", "gpu"])
        runner = gh.runners[jit.runner_id]
        runner.status, runner.busy = "online", busy
        job_id = 1_000_000 + n
        if busy:
            jobs.append(dict(id=job_id, run_id=job_id, run_attempt=1, repository="bench-org/app", labels=["self-hosted", "gpu"],
                             pool="gpu", state="in_progress", runner_name=name, private=True, launch_attempts=1,
                             on_demand_only=False, source="webhook", created_at=launched, queued_at=launched,
                             updated_at=now, launched_at=launched, started_at=now - timedelta(seconds=30)))
        instances.append(dict(
            id=name, pool="gpu", cloud=cand.cloud, location=location, instance_type=cand.instance_type, spot=cand.spot,
            candidate_index=0, price_per_hour=price, min_billing_s=provider.min_billing_seconds, instance_id=cloud_id,
            state="busy" if busy else "idle", job_id=job_id if busy else None, launch_key=f"live-{n}",
            labels=["self-hosted", "linux", "x64", "gpu"], runner_scope=scope.key, runner_id=jit.runner_id,
            warm=False, created_at=launched, launched_at=launched, bootstrapped_at=launched + timedelta(seconds=40),
            idle_since=None if busy else now - timedelta(seconds=60), busy_since=now - timedelta(seconds=30) if busy else None,
            cost_usd=0.0, bootstrap_used=True, interrupted=False, idle_checks=0,
        ))
        reservations.append(dict(instance_id=name, budget="monthly", amount_usd=price * 6, created_at=launched))
        # Yesterday's VM that ran one job and ended: settled history.
        old = now - timedelta(days=1)
        old_name = vm_name(ORCH_ID, "gpu", f"old-{n}")
        instances.append(dict(
            id=old_name, pool="gpu", cloud=cand.cloud, location=location, instance_type=cand.instance_type, spot=cand.spot,
            candidate_index=0, price_per_hour=price, min_billing_s=provider.min_billing_seconds, instance_id=f"gone-{n}",
            state="terminated", job_id=2_000_000 + n, launch_key=f"old-{n}", labels=["gpu"], runner_scope=scope.key,
            runner_id=None, warm=False, created_at=old, launched_at=old, terminated_at=old + timedelta(minutes=20),
            cost_usd=price / 3, bootstrap_used=True, interrupted=False, idle_checks=0, reason="job-completed",
        ))
        reservations.append(dict(instance_id=old_name, budget="monthly", amount_usd=price * 6, created_at=old,
                                 settled_at=old + timedelta(minutes=20), cost_usd=price / 3))
        jobs.append(dict(id=2_000_000 + n, run_id=2_000_000 + n, run_attempt=1, repository="bench-org/app", labels=["self-hosted", "gpu"],
                         pool="gpu", state="completed", conclusion="success", runner_name=old_name, private=True,
                         launch_attempts=1, on_demand_only=False, source="webhook", created_at=old, queued_at=old,
                         updated_at=old, launched_at=old, started_at=old, completed_at=old + timedelta(minutes=20)))
    with orch.store.session() as s:
        s.bulk_insert_mappings(Job, jobs)
        s.bulk_insert_mappings(Instance, instances)
        s.bulk_insert_mappings(Reservation, reservations)


def _measure(orch, *, cloud_calls) -> dict:
    # Time inside the cloud's list call apart: on moto that is the fake server's own work.
    listing = [0.0]
    for provider in orch.providers.values():
        real = provider.list_managed

        def timed(locations, _real=real):
            t = time.perf_counter()
            try:
                return _real(locations)
            finally:
                listing[0] += time.perf_counter() - t

        provider.list_managed = timed
    gh_before = sum(orch.github.calls.values())
    list_before = cloud_calls()
    t0 = time.perf_counter()
    result = orch.reaper.run_once()
    elapsed = time.perf_counter() - t0
    for provider in orch.providers.values():
        del provider.list_managed
    return {
        "cloud_list_calls": cloud_calls() - list_before,
        "github_calls": sum(orch.github.calls.values()) - gh_before,
        "actions": len(result.actions),
        "errors": len(result.errors),
        "pass_s": round(elapsed, 3),
        "cloud_list_s": round(listing[0], 3),
    }


def bench_sandbox(size: int, db_url: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        # The VMs were launched an hour before the pass.
        clock = FakeClock(datetime(2026, 3, 2, 11, tzinfo=timezone.utc))
        orch = Orchestrator(_config(db_url or f"sqlite:///{tmp}/bench.db"), clock=clock)
        world = orch.sandbox_world
        world.guest = None  # the VMs are already "running a job"; no guest program
        pool = orch.config.pool("gpu")
        provider = orch.providers["sandbox"]
        started = clock.now()
        vms = []
        for n in range(size):
            name = vm_name(ORCH_ID, "gpu", f"live-{n}")
            spec = LaunchSpec(name=name, launch_key=f"live-{n}", candidate=pool.candidates[0], pool=pool, user_data="",
                              tags=managed_tags(ORCH_ID, "gpu", name))
            vm = world.create(spec, provider.price_per_hour(spec.candidate))
            vm.state = "running"
            vms.append((name, vm.instance_id, started))
        clock.advance(3600)
        _populate(orch, vms, clock)
        out = {"cloud": "sandbox", "vms": size, **_measure(orch, cloud_calls=lambda: world.calls["list"])}
        out["second_pass_s"] = _measure(orch, cloud_calls=lambda: world.calls["list"])["pass_s"]
        orch.store.close()
        return out


def bench_aws(sizes: list[int], db_url: str | None) -> list[dict]:
    import boto3

    from orchestrator.providers.aws import AwsProvider
    from tests.fakes.moto import DUMMY_CREDENTIALS, start_moto_server

    out = []
    with start_moto_server() as moto:
        for size in sizes:
            moto.reset()
            ec2 = moto.client("ec2", "us-east-1")
            clock = FakeClock(datetime.now(timezone.utc))

            def run_one(n: int) -> tuple[str, str, datetime]:
                name = vm_name(ORCH_ID, "gpu", f"live-{n}")
                tags = [{"Key": k, "Value": v} for k, v in managed_tags(ORCH_ID, "gpu", name).items()]
                raw = ec2.run_instances(ImageId=AMI, InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1,
                                        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])["Instances"][0]
                return name, raw["InstanceId"], raw["LaunchTime"].astimezone(timezone.utc)

            with ThreadPoolExecutor(8) as ex:
                vms = list(ex.map(run_one, range(size)))
            with tempfile.TemporaryDirectory() as tmp:
                cfg = _config(db_url or f"sqlite:///{tmp}/bench.db", aws_endpoint=moto.endpoint_url)
                session = boto3.Session(region_name="us-east-1", **DUMMY_CREDENTIALS)
                provider = AwsProvider(cfg.clouds.aws, ORCH_ID, clock, session=session, max_attempts=1)
                orch = Orchestrator(cfg, clock=clock, providers={"aws": provider})
                _populate(orch, vms, clock)
                row = {"cloud": "aws-moto", "vms": size,
                       **_measure(orch, cloud_calls=lambda: provider.api_calls["describe_instances"])}
                row["second_pass_s"] = _measure(orch, cloud_calls=lambda: provider.api_calls["describe_instances"])["pass_s"]
                out.append(row)
                orch.store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,1000,10000", help="sandbox fleet sizes")
    p.add_argument("--aws-sizes", default="100,1000", help="moto fleet sizes; empty to skip")
    p.add_argument("--db-url", default=None, help="database (default: a temporary SQLite file per size); must be empty")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    aws_sizes = [int(x) for x in args.aws_sizes.split(",") if x]
    results = [bench_sandbox(n, args.db_url) for n in sizes]
    if aws_sizes:
        results += bench_aws(aws_sizes, args.db_url)
    print(json.dumps({"benchmark": "reaper_scale", "run": uuid.uuid4().hex[:8], "passes": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
