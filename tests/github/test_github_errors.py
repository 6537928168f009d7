"""Retries on the injected sleep, rate limits on the injected clock, permission errors that name the permission."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from orchestrator.github.base import (
    GitHubError,
    GitHubPermissionError,
    GitHubRateLimited,
    GitHubUnavailable,
    RunnerScope,
)
from tests.fakes.github_server import FakeGitHubServer

LABELS = ["self-hosted", "linux", "x64", "gpu-t4"]
JIT = "/orgs/{org}/actions/runners/generate-jitconfig"


def calls_metric(endpoint: str, status: str) -> float:
    return REGISTRY.get_sample_value("orchestrator_github_calls_total", {"endpoint": endpoint, "status": status}) or 0.0


def jit(client, world, name="orch-1"):
    return client.create_jit_config(RunnerScope("acme"), name=name, labels=LABELS, installation_id=world.acme)


def test_5xx_then_success_retries_on_the_injected_sleep(make_client, github_server, world, sleeps):
    client = make_client()
    before_502, before_201 = calls_metric(JIT, "502"), calls_metric(JIT, "201")
    github_server.fail_next("generate-jitconfig", 502, times=2)

    cfg = jit(client, world)

    assert cfg.runner_id in github_server.runners
    assert len(sleeps) == 2 and all(0 < s <= 8 for s in sleeps)
    assert calls_metric(JIT, "502") - before_502 == 2
    assert calls_metric(JIT, "201") - before_201 == 1


def test_backoff_grows_and_gives_up_as_unavailable(make_client, github_server, world, sleeps):
    client = make_client()
    github_server.fail_next("generate-jitconfig", 503, times=10)
    with pytest.raises(GitHubUnavailable, match="failed 4 times"):
        jit(client, world)
    assert len(sleeps) == 3
    assert sleeps[0] < sleeps[2]
    assert len(github_server.calls_to("generate-jitconfig")) == 4


def test_dropped_connection_is_retried(make_client, github_server, world, sleeps):
    client = make_client()
    before = calls_metric("/orgs/{org}/actions/runners", "error")
    github_server.drop_next("/actions/runners$")
    assert client.list_runners(RunnerScope("acme"), installation_id=world.acme) == []
    assert len(sleeps) == 1
    assert calls_metric("/orgs/{org}/actions/runners", "error") - before == 1


def test_exhausted_rate_limit_fails_fast_until_reset(make_client, github_server, clock, world):
    client = make_client()
    scope = RunnerScope("acme")
    jit(client, world)                      # mint first; the installation's bucket is what we drain
    bucket = FakeGitHubServer.installation_bucket(world.acme)
    github_server.set_rate_limit(bucket, 2, reset_in=600)
    reset = github_server.rate_limit(bucket)["reset"]

    jit(client, world, "orch-2")
    jit(client, world, "orch-3")            # answered with X-RateLimit-Remaining: 0
    seen = len(github_server.calls)
    for _ in range(3):
        with pytest.raises(GitHubRateLimited) as err:
            client.list_runners(scope, installation_id=world.acme)
        assert err.value.reset_at == reset
    assert len(github_server.calls) == seen  # nothing was sent
    assert client.rate_limit_remaining(world.acme) == 0

    clock.set(reset + 1)
    assert len(client.list_runners(scope, installation_id=world.acme)) == 3
    assert len(github_server.calls) == seen + 1


def test_primary_limit_refusal_blocks_until_reset(make_client, github_server, clock, world):
    client = make_client()
    jit(client, world)
    bucket = FakeGitHubServer.installation_bucket(world.acme)
    github_server.exhaust_rate_limit(bucket, reset_in=300)
    reset = github_server.rate_limit(bucket)["reset"]

    with pytest.raises(GitHubRateLimited) as err:
        jit(client, world, "orch-2")
    assert err.value.reset_at == reset
    assert github_server.calls[-1].status == 403
    seen = len(github_server.calls)
    with pytest.raises(GitHubRateLimited):
        jit(client, world, "orch-2")
    assert len(github_server.calls) == seen

    clock.set(reset)
    jit(client, world, "orch-2")


@pytest.mark.parametrize("status", [403, 429])
def test_secondary_limit_with_retry_after(make_client, github_server, clock, world, status):
    client = make_client()
    jit(client, world)
    github_server.secondary_limit_next("generate-jitconfig", retry_after=30, status=status)
    with pytest.raises(GitHubRateLimited) as err:
        jit(client, world, "orch-2")
    assert err.value.reset_at == clock.time() + 30
    clock.advance(29)
    with pytest.raises(GitHubRateLimited):
        jit(client, world, "orch-2")
    clock.advance(2)
    jit(client, world, "orch-2")


def test_secondary_limit_message_without_retry_after_waits_a_minute(make_client, github_server, clock, world):
    client = make_client()
    jit(client, world)
    github_server.secondary_limit_next("generate-jitconfig", retry_after=None)
    with pytest.raises(GitHubRateLimited) as err:
        jit(client, world, "orch-2")
    assert err.value.reset_at == clock.time() + 60


def test_missing_app_permission_is_named_in_one_log_line(make_client, github_server, world, caplog):
    client = make_client()
    github_server.revoke_permission(world.acme, "organization_self_hosted_runners")
    caplog.set_level(logging.DEBUG)

    with pytest.raises(GitHubPermissionError) as err:
        jit(client, world)

    expected = ("GitHub App lacks 'Self-hosted runners: write' (organization) needed for "
                "POST /orgs/acme/actions/runners/generate-jitconfig")
    assert str(err.value) == expected
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [expected]
    token = next(iter(github_server.tokens))
    assert token not in caplog.text
    assert err.value.reason == "github:permission"


def test_permission_named_from_the_endpoint_when_github_does_not_say(make_client, github_server, world):
    client = make_client()
    github_server.fail_next("/rerun$", 403, body={"message": "Resource not accessible by integration"})
    with pytest.raises(GitHubPermissionError, match=r"lacks 'Actions: write' \(repository\) needed for "
                                                    r"POST /repos/acme/app/actions/jobs/5/rerun"):
        client.rerun_job("acme/app", 5, installation_id=world.acme)


def test_repo_scope_needs_administration(make_client, github_server, world):
    client = make_client()
    github_server.revoke_permission(world.acme, "administration")
    with pytest.raises(GitHubPermissionError, match=r"'Administration: read' \(repository\)"):
        client.list_runners(RunnerScope("acme", "app"), installation_id=world.acme)


def test_forbidden_that_is_not_about_permissions_is_a_plain_error(make_client, github_server, world):
    client = make_client()
    _, job_id = github_server.queue_job("acme/app", LABELS)
    with pytest.raises(GitHubError) as err:
        client.rerun_job("acme/app", job_id, installation_id=world.acme)   # still queued: cannot rerun
    assert not isinstance(err.value, GitHubPermissionError)
    assert "403" in str(err.value)


def test_token_auth_permission_message(make_client, github_server, world):
    github_server.add_personal_token("ghp_limited", permissions={"administration": "read"})
    client = make_client(token="ghp_limited")
    with pytest.raises(GitHubPermissionError, match="^GitHub token lacks 'Self-hosted runners: write'"):
        client.create_jit_config(RunnerScope("acme"), name="orch-1", labels=LABELS)
