"""HA: two `orchestrator serve` processes on one PostgreSQL behind a load balancer.

One is killed with SIGKILL in the middle of a burst. GitHub (a fake GitHub API
server) and AWS (a moto server) are shared by both, as in production. After
the survivor's reaper runs, every job has exactly one VM: 0 lost, 0 duplicate.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from orch_support import REPO, WEBHOOK_SECRET, sign
from orchestrator.config import load_config
from orchestrator.core.clock import FakeClock
from orchestrator.providers.base import TAG_ID, TAG_RUNNER
from tests.fakes.github_server import FakeGitHubServer, generate_app_key
from tests.fakes.moto import DUMMY_CREDENTIALS, start_moto_server

JOBS = 40
KILL_AFTER = 16
AMI = "ami-760aaa0f"  # one of moto's built-in images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, db_url: str, github_url: str, key_path, moto_url: str) -> str:
    path = tmp_path / "ha.yaml"
    path.write_text(
        f"""
github:
  api_url: {github_url}
  app_id: 4242
  private_key_path: {key_path}
  webhook_secret: {WEBHOOK_SECRET}
  allowed_repositories: ["ha-org/*"]
  runner_scope: org
  poll_interval: 5s
server:
  orchestrator_id: orch-ha
  public_url: http://127.0.0.1:1
  admin_tokens: [ha-admin]
  reaper_interval: 2s
database:
  url: {db_url}
clouds:
  aws: {{region: us-east-1, endpoint_url: "{moto_url}"}}
pools:
  - name: gpu-t4
    labels: [gpu-t4]
    max_runners: 100
    boot_timeout: 30m
    candidates:
      - {{cloud: aws, region: us-east-1, instance_type: g4dn.xlarge, image: {AMI}, spot: true, price_per_hour: 0.2}}
"""
    )
    return str(path)


def _serve(config_path: str, port: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--config", config_path, "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _wait_healthy(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited early: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail("serve did not become ready")


def _payload(gh: FakeGitHubServer, job_id: int, installation: int) -> dict:
    job = dict(gh.jobs[job_id])
    job = {k: v for k, v in job.items() if not k.startswith("_")}
    return {
        "action": "queued",
        "workflow_job": job,
        "repository": {"full_name": "ha-org/train", "name": "train", "private": True, "owner": {"login": "ha-org"}},
        "installation": {"id": installation},
    }


def test_two_replicas_sigkill_mid_burst_loses_nothing(postgres_url, tmp_path):
    private, public = generate_app_key()
    key_path = tmp_path / "app.pem"
    key_path.write_text(private)
    gh = FakeGitHubServer(app_id=4242, public_key_pem=public).start()
    installation = gh.add_installation("ha-org", repositories=["ha-org/train"])
    with start_moto_server() as moto:
        config_path = _config(tmp_path, postgres_url, gh.url, key_path, moto.endpoint_url)
        env = {**os.environ, **{k.upper(): v for k, v in DUMMY_CREDENTIALS.items()}, "AWS_DEFAULT_REGION": "us-east-1"}
        env.pop("CI", None)
        ports = [_free_port(), _free_port()]
        procs = [_serve(config_path, p, env) for p in ports]
        try:
            for port, proc in zip(ports, procs):
                _wait_healthy(port, proc)
            job_ids = [gh.queue_job("ha-org/train", ["self-hosted", "gpu-t4"])[1] for _ in range(JOBS)]
            alive = [True, True]
            acked = 0
            with httpx.Client(timeout=10) as client:
                for n, job_id in enumerate(job_ids):
                    if n == KILL_AFTER:
                        procs[0].send_signal(signal.SIGKILL)  # mid-burst: launches of replica 0 are in flight
                        procs[0].wait()
                        alive[0] = False
                    body = json.dumps(_payload(gh, job_id, installation)).encode()
                    headers = {"X-GitHub-Event": "workflow_job", "X-GitHub-Delivery": f"d-{job_id}",
                               "X-Hub-Signature-256": sign(body), "Content-Type": "application/json"}
                    # The load balancer alternates, and skips a dead backend.
                    for target in (n % 2, 1 - n % 2):
                        if not alive[target]:
                            continue
                        try:
                            r = client.post(f"http://127.0.0.1:{ports[target]}/webhook", content=body, headers=headers)
                        except httpx.HTTPError:
                            continue
                        assert r.status_code == 202, r.text
                        acked += 1
                        break
            assert acked == JOBS
            # Let the survivor launch what it was handed, then stop it too.
            deadline = time.monotonic() + 60
            ec2 = moto.client("ec2", "us-east-1")
            while time.monotonic() < deadline and len(_our_vms(ec2)) < JOBS - 4:
                time.sleep(0.5)
            procs[1].send_signal(signal.SIGTERM)
            procs[1].wait(timeout=30)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

        # The survivor's reaper, later: claims abandoned by the dead replica are older than any grace period.
        from orchestrator.app import Orchestrator

        os.environ.update({k.upper(): v for k, v in DUMMY_CREDENTIALS.items()})
        later = FakeClock(datetime.now(timezone.utc) + timedelta(minutes=15))
        orch = Orchestrator(load_config(config_path), clock=later)
        try:
            for _ in range(3):
                orch.reaper.run_once()
                orch.scaler.run_once()
                later.advance(60)
            jobs = {j.id: j for j in orch.store.jobs()}
            instances = orch.store.instances()
        finally:
            orch.store.close()
        ec2 = moto.client("ec2", "us-east-1")
        vms = _our_vms(ec2)
        gh.stop()

    assert set(jobs) == set(job_ids), "a job was lost"
    assert all(j.state == "assigned" for j in jobs.values()), {j.id: (j.state, j.reason) for j in jobs.values() if j.state != "assigned"}
    live = [i for i in instances if i.state in ("requested", "booting", "idle", "busy")]
    per_job: dict[int, int] = {}
    for inst in live:
        per_job[inst.job_id] = per_job.get(inst.job_id, 0) + 1
    assert per_job == {j: 1 for j in job_ids}, "a job has no VM or more than one"
    names = [vm[TAG_RUNNER] for vm in vms]
    assert len(names) == len(set(names)) == JOBS, f"{len(names)} VMs in the cloud for {JOBS} jobs"
    assert set(names) == {i.id for i in live}


def _our_vms(ec2) -> list[dict]:
    out = []
    for page in ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{TAG_ID}", "Values": ["orch-ha"]}, {"Name": "instance-state-name", "Values": ["pending", "running"]}]
    ):
        for res in page["Reservations"]:
            for inst in res["Instances"]:
                out.append({t["Key"]: t["Value"] for t in inst.get("Tags", [])})
    return out
