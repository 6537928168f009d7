"""The admin API: bearer auth on every endpoint, budgets that persist, runner teardown, pause/resume,
list shapes, OpenAPI and Prometheus metrics."""

from __future__ import annotations

import uuid

import pytest

from orch_support import ADMIN_TOKEN, WEBHOOK_SECRET, job_payload
from orchestrator.config import load_config_text

CONFIG = """
github:
  simulated: true
  webhook_secret: {secret}
  allowed_repositories: ["octo-org/*"]
server:
  admin_tokens: [{admin}, second-admin-token]
  reaper_interval: 30s
database:
  url: {db}
pools:
  - name: gpu-t4
    labels: [gpu-t4]
    max_runners: 10
    max_lifetime: 2h
    candidates:
      - {{cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.5}}
  - name: cpu
    labels: [cpu]
    candidates:
      - {{cloud: sandbox, instance_type: cpu-sim, spot: false, price_per_hour: 0.1}}
budgets:
  - {{name: monthly, scope: global, period: monthly, limit_usd: {limit}, alert_at: [0.5, 1.0], on_exceed: block}}
  - {{name: gpu-daily, scope: "pool:gpu-t4", period: daily, limit_usd: 50, on_exceed: alert}}
"""

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def admin_config(db: str, limit: float = 100):
    return load_config_text(CONFIG.format(secret=WEBHOOK_SECRET, admin=ADMIN_TOKEN, db=db, limit=limit), "<test>")


@pytest.fixture
def orch(make_orch, sqlite_url):
    return make_orch(admin_config(sqlite_url))


@pytest.fixture
def client(orch, client_for):
    return client_for(orch)


def queue(orch, job_id: int, labels=("self-hosted", "gpu-t4")) -> None:
    orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("queued", job_id=job_id, labels=labels))


def launch_one(orch, job_id: int = 1):
    queue(orch, job_id)
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    return next(i for i in orch.store.live_instances() if i.job_id == job_id)


# --- auth ------------------------------------------------------------------------------------


def _endpoints(runner: str):
    return [
        ("GET", "/api/v1/budgets", None),
        ("PUT", "/api/v1/budgets/monthly", {"limit_usd": 120}),
        ("GET", "/api/v1/runners", None),
        ("GET", "/api/v1/jobs", None),
        ("POST", "/api/v1/pools/gpu-t4/pause", None),
        ("POST", "/api/v1/pools/gpu-t4/resume", None),
        ("DELETE", f"/api/v1/runners/{runner}", None),  # last: it ends the runner
    ]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"X-Admin-Token": ADMIN_TOKEN},
    ],
    ids=["none", "wrong", "basic", "no-scheme", "empty", "longer", "other-header"],
)
def test_admin_endpoints_refuse_missing_or_wrong_tokens(orch, client, headers):
    inst = launch_one(orch)
    for method, path, body in _endpoints(inst.id):
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    # Nothing was changed by the refused calls.
    assert orch.store.get_instance(inst.id).state == "booting"
    assert orch.store.paused_pools() == set()
    assert orch.budgets.view("monthly").limit_usd == 100


@pytest.mark.parametrize("token", [ADMIN_TOKEN, "second-admin-token"])
def test_admin_endpoints_accept_each_configured_token(orch, client, token):
    inst = launch_one(orch)
    for method, path, body in _endpoints(inst.id):
        r = client.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, (method, path, r.status_code, r.text)


def test_no_admin_tokens_configured_means_no_admin_access(make_orch, sqlite_url, client_for):
    cfg = admin_config(sqlite_url)
    cfg.server.admin_tokens = []
    client = client_for(make_orch(cfg))
    assert client.get("/api/v1/budgets", headers={"Authorization": "Bearer "}).status_code == 401
    assert client.get("/api/v1/budgets", headers=AUTH).status_code == 401


def test_unknown_names_are_404_not_500(client):
    assert client.put("/api/v1/budgets/nope", json={"limit_usd": 1}, headers=AUTH).status_code == 404
    assert client.delete("/api/v1/runners/nope", headers=AUTH).status_code == 404
    assert client.post("/api/v1/pools/nope/pause", headers=AUTH).status_code == 404
    assert client.post("/api/v1/pools/nope/resume", headers=AUTH).status_code == 404


@pytest.mark.parametrize("body", [{"limit_usd": -1}, {"alert_at": [0]}, {"alert_at": [-0.5]}, {"on_exceed": "panic"}, {"limit_usd": "lots"}])
def test_bad_budget_changes_are_422(client, body):
    r = client.put("/api/v1/budgets/monthly", json=body, headers=AUTH)
    assert r.status_code == 422, r.text


# --- budgets -----------------------------------------------------------------------------------


def test_budget_list_has_every_field(orch, client):
    launch_one(orch)
    items = client.get("/api/v1/budgets", headers=AUTH).json()["items"]
    assert [b["name"] for b in items] == ["monthly", "gpu-daily"]
    fields = {"name", "scope", "period", "limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "period_start", "period_end", "status"}
    for b in items:
        assert fields <= set(b)
    monthly = items[0]
    assert monthly["scope"] == "global" and monthly["period"] == "monthly"
    assert monthly["reserved_usd"] == pytest.approx(1.0)  # 0.5/h for max_lifetime 2h
    assert monthly["remaining_usd"] == pytest.approx(99.0) and monthly["status"] == "ok"
    assert monthly["period_start"].startswith("2026-01-01T00:00:00") and monthly["period_end"].startswith("2026-02-01")


def test_put_budget_takes_effect_for_the_next_launch(orch, client):
    r = client.put("/api/v1/budgets/monthly", json={"limit_usd": 1.5}, headers=AUTH)
    assert r.status_code == 200 and r.json()["limit_usd"] == 1.5
    launch_one(orch, 1)  # $1.00 of $1.50
    queue(orch, 2)
    assert [o.result for o in orch.scaler.run_once()] == ["held:budget:monthly"]
    job = client.get("/api/v1/jobs", headers=AUTH).json()["items"][-1]
    assert job["id"] == 2 and job["state"] == "queued" and job["reason"] == "budget:monthly"
    assert client.get("/api/v1/budgets", headers=AUTH).json()["items"][0]["status"] == "warning"
    r = client.put("/api/v1/budgets/monthly", json={"limit_usd": 2.0}, headers=AUTH)
    assert r.status_code == 200 and r.json()["remaining_usd"] == pytest.approx(1.0)
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    # on_exceed: alert lets launches through; block stops them again.
    client.put("/api/v1/budgets/monthly", json={"on_exceed": "alert"}, headers=AUTH)
    queue(orch, 3)
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    client.put("/api/v1/budgets/monthly", json={"on_exceed": "block"}, headers=AUTH)
    queue(orch, 4)
    assert [o.result for o in orch.scaler.run_once()] == ["held:budget:monthly"]


def test_budget_changes_survive_a_restart_and_a_config_reload(make_orch, sqlite_url, client_for, clock):
    first = make_orch(admin_config(sqlite_url))
    client = client_for(first)
    r = client.put("/api/v1/budgets/monthly", json={"limit_usd": 42.5, "alert_at": [0.9, 0.25], "on_exceed": "alert"}, headers=AUTH)
    assert r.status_code == 200
    assert r.json()["alert_at"] == [0.25, 0.9]
    first.stop()

    # A new process on the same database, and a reloaded config that says 100 (then 300).
    for limit in (100, 300):
        again = make_orch(admin_config(sqlite_url, limit=limit))
        view = again.budgets.view("monthly")
        assert (view.limit_usd, view.alert_at, view.on_exceed) == (42.5, [0.25, 0.9], "alert")
        items = client_for(again).get("/api/v1/budgets", headers=AUTH).json()["items"]
        assert items[0]["limit_usd"] == 42.5
    # Fields not changed through the API still follow the file.
    assert again.budgets.view("gpu-daily").limit_usd == 50


# --- runners -----------------------------------------------------------------------------------


def test_delete_runner_deregisters_and_terminates_now(orch, client, clock):
    inst = launch_one(orch)
    clock.advance(60)
    orch.timeline.run_due()
    assert orch.store.get_instance(inst.id).state == "idle"
    runner = next(r for r in orch.github.runners.values() if r.name == inst.id)
    deleted = []
    real = orch.github.delete_runner
    orch.github.delete_runner = lambda scope, rid, **kw: deleted.append(rid) or real(scope, rid, **kw)

    r = client.delete(f"/api/v1/runners/{inst.id}", headers=AUTH)
    assert r.status_code == 200 and r.json()["result"] == "terminated"
    assert deleted == [runner.id] and runner.id not in orch.github.runners
    assert orch.sandbox_world.live() == []
    final = orch.store.get_instance(inst.id)
    assert final.state == "terminated" and final.cost_usd > 0
    assert orch.budgets.view("monthly").reserved_usd == 0
    # The job it was launched for had not started: it goes back to the queue with a reason.
    job = orch.store.get_job(1)
    assert job.state == "queued" and job.reason
    assert client.delete(f"/api/v1/runners/{inst.id}", headers=AUTH).json()["result"] == "already-gone"


def test_runner_and_job_items_have_the_documented_fields(orch, client, clock):
    inst = launch_one(orch)
    clock.advance(1800)
    runners = client.get("/api/v1/runners", headers=AUTH).json()["items"]
    assert len(runners) == 1
    item = runners[0]
    documented = {"id", "name", "pool", "cloud", "region", "instance_type", "spot", "instance_id", "state", "job_id", "launched_at", "cost_usd"}
    assert documented <= set(item)
    assert item["id"] == item["name"] == inst.id
    assert (item["pool"], item["cloud"], item["region"], item["instance_type"], item["spot"]) == ("gpu-t4", "sandbox", "sandbox-1", "gpu-t4-sim", True)
    assert item["instance_id"] == inst.instance_id and item["state"] == "booting" and item["job_id"] == 1
    assert item["launched_at"].startswith("2026-01-01T00:00:00")
    assert item["cost_usd"] == pytest.approx(0.25)  # half an hour at $0.50 so far
    assert client.get("/api/v1/runners?state=terminated", headers=AUTH).json()["items"] == []

    jobs = client.get("/api/v1/jobs", headers=AUTH).json()["items"]
    job = jobs[0]
    documented = {"id", "run_id", "repository", "labels", "pool", "state", "runner", "reason", "created_at", "started_at", "completed_at"}
    assert documented <= set(job)
    assert (job["id"], job["run_id"], job["repository"], job["labels"]) == (1, 900001, "octo-org/models", ["self-hosted", "gpu-t4"])
    assert (job["pool"], job["state"], job["runner"], job["reason"]) == ("gpu-t4", "assigned", None, None)
    assert job["created_at"].startswith("2026-01-01T00:00:00") and job["started_at"] is None and job["completed_at"] is None
    orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("in_progress", job_id=1, runner_name=inst.id))
    job = client.get("/api/v1/jobs?state=in_progress", headers=AUTH).json()["items"][0]
    assert job["runner"] == inst.id and job["started_at"] is not None


# --- pools -------------------------------------------------------------------------------------


def test_pause_stops_launching_for_one_pool_and_resume_restarts_it(orch, client):
    r = client.post("/api/v1/pools/gpu-t4/pause", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"pool": "gpu-t4", "paused": True}
    queue(orch, 1)
    queue(orch, 2, labels=("self-hosted", "cpu"))
    outcomes = {o.job_id: o.result for o in orch.scaler.run_once()}
    assert outcomes == {1: "held:pool-paused", 2: "launched"}
    assert orch.store.get_job(1).reason == "pool-paused"
    assert orch.scaler.run_once()[0].result == "held:pool-paused"
    r = client.post("/api/v1/pools/gpu-t4/resume", headers=AUTH)
    assert r.status_code == 200 and r.json()["paused"] is False
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    assert orch.store.get_job(1).state == "assigned"


def test_pause_survives_a_restart(make_orch, sqlite_url, client_for):
    client = client_for(make_orch(admin_config(sqlite_url)))
    client.post("/api/v1/pools/gpu-t4/pause", headers=AUTH)
    again = make_orch(admin_config(sqlite_url))
    assert again.store.paused_pools() == {"gpu-t4"}


# --- OpenAPI and metrics -------------------------------------------------------------------------


def test_openapi_is_served_and_lists_the_admin_api(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in ("/api/v1/budgets", "/api/v1/budgets/{name}", "/api/v1/runners", "/api/v1/runners/{runner_id}",
                 "/api/v1/jobs", "/api/v1/pools/{name}/pause", "/api/v1/pools/{name}/resume", "/webhook"):
        assert path in paths, path


def test_metrics_show_budgets_runners_reaper_actions_and_leaks(orch, client, clock):
    inst = launch_one(orch)
    orch.sandbox_world.terminate(orch.sandbox_world.live()[0].instance_id)
    clock.advance(120)
    orch.reaper.run_once()
    queue(orch, 2)
    assert [o.result for o in orch.scaler.run_once()] == ["launched", "launched"]  # job 1 again, and job 2
    orch.reaper.run_once()
    text = client.get("/metrics").text
    for line in (
        'orchestrator_budget_spent_usd{budget="monthly"}',
        'orchestrator_budget_reserved_usd{budget="monthly"} 2.0',
        'orchestrator_budget_limit_usd{budget="monthly"} 100.0',
        'orchestrator_runners{pool="gpu-t4",state="booting"} 2.0',
        'orchestrator_runners{pool="gpu-t4",state="terminated"} 1.0',
        'orchestrator_reaper_actions_total{kind="vm-gone"}',
        "orchestrator_leaked_vms_total ",
        'orchestrator_reaper_passes_total{outcome="ok"}',
    ):
        assert line in text, line
    spent = next(ln for ln in text.splitlines() if ln.startswith('orchestrator_budget_spent_usd{budget="monthly"}'))
    assert float(spent.split()[-1]) > 0
    assert orch.store.get_instance(inst.id).state == "terminated"
