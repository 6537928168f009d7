"""Several replicas on one Postgres database: one reaps per pass, the others stand aside."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid

import pytest

from orch_support import ADMIN_TOKEN, WEBHOOK_SECRET, job_payload
from orchestrator.app import Orchestrator
from orchestrator.config import load_config_text
from orchestrator.providers.base import LaunchSpec, managed_tags, vm_name
from orchestrator.store.store import Store

pytestmark = pytest.mark.postgres

CONFIG = """
github:
  simulated: true
  webhook_secret: {secret}
  allowed_repositories: ["octo-org/*"]
server:
  orchestrator_id: orch-pg
  admin_tokens: [{admin}]
  reaper_interval: 30s
database:
  url: {db}
pools:
  - name: gpu-t4
    labels: [gpu-t4]
    candidates:
      - {{cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.25}}
"""


def pg_config(url: str):
    return load_config_text(CONFIG.format(secret=WEBHOOK_SECRET, admin=ADMIN_TOKEN, db=url), "<test>")


@pytest.fixture
def pair(postgres_url, clock):
    """Two replicas sharing the database, the (sandbox) cloud and GitHub, each with its own connections."""
    cfg = pg_config(postgres_url)
    a = Orchestrator(cfg, clock=clock, store=Store(postgres_url, clock), worker_id="a")
    b = Orchestrator(cfg, clock=clock, store=Store(postgres_url, clock), github=a.github,
                     sandbox_world=a.sandbox_world, timeline=a.timeline, worker_id="b")
    yield a, b
    for o in (a, b):
        o.stop()
        o.store.close()


def plant_orphan(orch, key: str = "orphan-1"):
    pool = orch.config.pool("gpu-t4")
    name = vm_name(orch.orchestrator_id, pool.name, key)
    return orch.providers["sandbox"].launch(LaunchSpec(
        name=name, launch_key=key, candidate=pool.candidates[0], pool=pool, user_data="",
        tags=managed_tags(orch.orchestrator_id, pool.name, name),
    ))


def test_only_the_lock_holder_reaps(pair):
    a, b = pair
    orphan = plant_orphan(a)
    with a.store.try_lock("reaper") as got:
        assert got
        result = b.reaper.run_once()
        assert result.leader is False and result.actions == [] and result.errors == []
        assert a.sandbox_world.vms[orphan.instance_id].state != "terminated"  # untouched
        # The holder's own second connection is a different session: it stands aside too.
        assert a.reaper.run_once().leader is False
    result = b.reaper.run_once()
    assert result.leader is True and [x.kind for x in result.actions] == ["orphan"]
    assert a.sandbox_world.vms[orphan.instance_id].state == "terminated"


def test_two_passes_at_once_act_once(pair):
    a, b = pair
    plant_orphan(a)
    inside, release = threading.Event(), threading.Event()
    provider = a.providers["sandbox"]
    real_list = provider.list_managed

    def slow_list(locations):
        inside.set()
        assert release.wait(30)  # holds a's pass open while b tries
        return real_list(locations)

    provider.list_managed = slow_list
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("a", a.reaper.run_once()))
    t.start()
    assert inside.wait(30)
    results["b"] = b.reaper.run_once()
    release.set()
    t.join(30)
    assert results["b"].leader is False and results["b"].actions == []
    assert results["a"].leader is True and [x.kind for x in results["a"].actions] == ["orphan"]
    assert a.sandbox_world.calls["terminate"] == 1


def test_the_lock_is_released_after_a_pass_and_after_an_error(pair):
    a, b = pair
    assert a.reaper.run_once().leader
    assert b.reaper.run_once().leader

    def boom():
        raise RuntimeError("database went away mid-pass")

    a.reaper.plan = boom
    with pytest.raises(RuntimeError):
        a.reaper.run_once()
    assert b.reaper.run_once().leader


def test_replicas_share_one_reaper_lock_but_each_has_its_own_scaler(pair):
    a, b = pair
    for job_id in range(1, 7):
        a.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("queued", job_id=job_id))
    outcomes = a.scaler.run_once() + b.scaler.run_once()
    assert sorted(o.result for o in outcomes if o.result != "skipped") == ["launched"] * 6
    assert len(a.sandbox_world.live()) == 6


def test_reap_once_command_stands_aside_while_another_replica_holds_the_lock(postgres_url, clock, tmp_path):
    cfg_file = tmp_path / "orchestrator.yaml"
    cfg_file.write_text(CONFIG.format(secret=WEBHOOK_SECRET, admin=ADMIN_TOKEN, db=postgres_url))
    holder = Orchestrator(pg_config(postgres_url), clock=clock, store=Store(postgres_url, clock))
    env = {**os.environ, "ORCHESTRATOR_CONFIG": str(cfg_file)}
    cmd = [sys.executable, "-m", "orchestrator.cli", "reap", "--once"]
    try:
        with holder.store.try_lock("reaper") as got:
            assert got
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            assert "another replica holds the reaper lock" in out.stdout
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "another replica" not in out.stdout and "action(s)" in out.stdout
    finally:
        holder.store.close()
