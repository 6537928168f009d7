"""The missed-webhook backstop: queued jobs seen only through the API, with conditional requests."""

from __future__ import annotations

from prometheus_client import REGISTRY

from orchestrator.github.base import QueuedJob
from tests.fakes.github_server import FakeGitHubServer

LABELS = ["self-hosted", "gpu-t4"]


def test_queued_job_visible_only_through_the_api(make_client, github_server, world):
    run_id, job_id = github_server.queue_job("acme/app", LABELS)
    github_server.queue_job("acme/lib", ["ubuntu-latest"], status="in_progress")   # not waiting for a runner
    client = make_client(allowed_repositories=["acme/*"])

    jobs = client.list_queued_jobs()

    assert jobs == [QueuedJob(id=job_id, run_id=run_id, run_attempt=1, repository="acme/app",
                              labels=tuple(LABELS), status="queued", private=True, installation_id=world.acme,
                              extra=jobs[0].extra)]
    assert jobs[0].extra["workflow_name"] == "CI"


def test_unchanged_second_poll_is_all_304_and_costs_no_rate_limit(make_client, github_server, world):
    github_server.queue_job("acme/app", LABELS)
    client = make_client(allowed_repositories=["acme/*"])
    first = client.list_queued_jobs()
    bucket = FakeGitHubServer.installation_bucket(world.acme)
    remaining = github_server.rate_limit(bucket)["remaining"]
    gauge = REGISTRY.get_sample_value("orchestrator_github_rate_limit_remaining")
    seen = len(github_server.calls)

    second = client.list_queued_jobs()

    assert second == first
    polled = github_server.calls[seen:]
    assert polled and all(c.status == 304 and "if-none-match" in c.headers for c in polled)
    assert github_server.rate_limit(bucket)["remaining"] == remaining
    assert REGISTRY.get_sample_value("orchestrator_github_rate_limit_remaining") == gauge == remaining
    assert client.rate_limit_remaining(world.acme) == remaining


def test_change_between_polls_is_seen(make_client, github_server, world):
    client = make_client(allowed_repositories=["alice/tool"])       # no wildcard: used directly
    run_id, job_id = github_server.queue_job("alice/tool", LABELS, status="waiting")
    assert [(j.id, j.status) for j in client.list_queued_jobs()] == [(job_id, "waiting")]

    github_server.set_job_status(job_id, "queued")
    assert [(j.id, j.status) for j in client.list_queued_jobs()] == [(job_id, "queued")]

    github_server.set_job_status(job_id, "in_progress")
    assert client.list_queued_jobs() == []
    assert not github_server.calls_to("/installation/repositories")


def test_queued_job_of_a_started_matrix_run(make_client, github_server, world):
    run_id, started = github_server.queue_job("acme/app", LABELS)
    _, waiting = github_server.queue_job("acme/app", LABELS, run_id=run_id)
    github_server.set_job_status(started, "in_progress")
    assert github_server.runs[run_id]["status"] == "in_progress"
    assert [j.id for j in make_client().list_queued_jobs()] == [waiting]


def test_patterns_filter_listed_repositories(make_client, github_server, world):
    github_server.add_repository("acme/api", private=False)
    github_server.queue_job("acme/app", LABELS)
    _, api_job = github_server.queue_job("acme/api", LABELS)
    github_server.queue_job("acme/lib", LABELS)
    jobs = make_client(allowed_repositories=["acme/ap?"]).list_queued_jobs()
    assert sorted(j.repository for j in jobs) == ["acme/api", "acme/app"]
    assert next(j for j in jobs if j.id == api_job).private is False
    assert not github_server.calls_to("/repos/acme/lib/")


def test_user_owner_wildcard_finds_the_user_installation(make_client, github_server, world):
    _, job_id = github_server.queue_job("alice/tool", LABELS)
    jobs = make_client(allowed_repositories=["alice/*"]).list_queued_jobs()
    assert [(j.id, j.installation_id) for j in jobs] == [(job_id, world.alice)]
    assert [c.path for c in github_server.calls[:2]] == ["/orgs/alice/installation", "/users/alice/installation"]


def test_any_owner_wildcard_lists_app_installations(make_client, github_server, world):
    _, a = github_server.queue_job("acme/lib", LABELS)
    _, b = github_server.queue_job("alice/tool", LABELS)
    jobs = make_client(allowed_repositories=["*/*"]).list_queued_jobs()
    assert sorted(j.id for j in jobs) == sorted([a, b])
    assert github_server.calls_to("^/app/installations$")


def test_repository_without_the_app_is_skipped(make_client, github_server, world):
    github_server.add_repository("stranger/repo")
    _, job_id = github_server.queue_job("acme/app", LABELS)
    jobs = make_client(allowed_repositories=["stranger/repo", "acme/app"]).list_queued_jobs()
    assert [j.id for j in jobs] == [job_id]


def test_token_mode_lists_the_users_repositories(make_client, github_server, world):
    github_server.add_personal_token("ghp_backstop")
    _, job_id = github_server.queue_job("acme/lib", LABELS)
    jobs = make_client(token="ghp_backstop", allowed_repositories=["acme/*"]).list_queued_jobs()
    assert [(j.id, j.installation_id) for j in jobs] == [(job_id, None)]
    assert github_server.calls_to("^/user/repos$")
