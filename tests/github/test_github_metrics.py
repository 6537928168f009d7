"""GitHub calls per job, read from the Prometheus metrics the client keeps."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from prometheus_client import REGISTRY

from orchestrator.github.base import RunnerScope

LABELS = ["self-hosted", "linux", "x64", "gpu-t4"]


def calls_by_endpoint() -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for metric in REGISTRY.collect():
        if metric.name == "orchestrator_github_calls":
            for s in metric.samples:
                if s.name == "orchestrator_github_calls_total":
                    out[(s.labels["endpoint"], s.labels["status"])] = s.value
    return out


def delta(before: dict, after: dict) -> dict[tuple[str, str], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def test_github_calls_per_job_over_100_jobs(make_client, github_server, world):
    client = make_client()
    before = calls_by_endpoint()
    for i in range(100):
        client.create_jit_config(RunnerScope("acme"), name=f"orch-{i}", labels=LABELS, installation_id=world.acme)
    calls = delta(before, calls_by_endpoint())

    assert calls == {
        ("/orgs/{org}/actions/runners/generate-jitconfig", "201"): 100,
        ("/app/installations/{id}/access_tokens", "201"): 1,
    }
    per_job = sum(calls.values()) / 100
    assert per_job <= 1.05
    assert sum(calls.values()) == len(github_server.calls)   # the metric counts every request sent


def test_concurrent_jobs_share_one_mint(make_client, github_server, world):
    client = make_client()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda i: client.create_jit_config(
            RunnerScope("acme"), name=f"orch-{i}", labels=LABELS, installation_id=world.acme), range(64)))
    assert github_server.mint_count == 1
    assert len(github_server.runners_in("acme")) == 64


def test_every_request_is_counted(make_client, github_server, world):
    github_server.queue_job("acme/app", ["self-hosted"])
    for i in range(130):
        github_server.add_runner("acme", f"r-{i}")
    client = make_client(runner_group=None)
    before = calls_by_endpoint()
    client.list_queued_jobs()
    client.list_queued_jobs()
    client.list_runners(RunnerScope("acme"))
    for runner in client.list_runners(RunnerScope("acme")):
        client.delete_runner(RunnerScope("acme"), runner.id)
    counted = delta(before, calls_by_endpoint())
    assert sum(counted.values()) == len(github_server.calls)
    by_status: dict[str, float] = {}
    for c in github_server.calls:
        by_status[str(c.status)] = by_status.get(str(c.status), 0) + 1
    assert {s: sum(v for (_, st), v in counted.items() if st == s) for s in by_status} == by_status
