"""Runner listing and deletion, ghost cleanup, reruns, and JIT name conflicts."""

from __future__ import annotations

import pytest

from orchestrator.github.base import DeleteResult, GitHubError, GitHubRunner, RunnerScope

LABELS = ["self-hosted", "linux", "x64", "gpu-t4"]


@pytest.mark.parametrize("scope", [RunnerScope("acme"), RunnerScope("acme", "app")], ids=["org", "repo"])
def test_list_runners_paginates(make_client, github_server, world, scope):
    key = scope.owner if scope.repo is None else f"{scope.owner}/{scope.repo}"
    for i in range(150):
        github_server.add_runner(key, f"r-{i}", status="online" if i % 2 else "offline", busy=i == 3)
    github_server.add_runner("acme/lib" if scope.repo else "alice", "elsewhere")

    runners = make_client().list_runners(scope, installation_id=world.acme)

    assert len(runners) == 150
    assert runners[3] == GitHubRunner(id=runners[3].id, name="r-3", status="online", busy=True,
                                      labels=("self-hosted", "linux", "x64"))
    assert len(github_server.calls_to("/actions/runners$")) == 2


@pytest.mark.parametrize("scope", [RunnerScope("acme"), RunnerScope("acme", "app")], ids=["org", "repo"])
def test_delete_runner_results(make_client, github_server, world, scope):
    key = scope.owner if scope.repo is None else f"{scope.owner}/{scope.repo}"
    idle = github_server.add_runner(key, "idle")
    busy = github_server.add_runner(key, "busy", status="online", busy=True)
    client = make_client()

    assert client.delete_runner(scope, idle, installation_id=world.acme) is DeleteResult.DELETED
    assert client.delete_runner(scope, idle, installation_id=world.acme) is DeleteResult.GONE
    assert client.delete_runner(scope, busy, installation_id=world.acme) is DeleteResult.BUSY
    assert busy in github_server.runners and idle not in github_server.runners
    assert [c.status for c in github_server.calls_to("/actions/runners/", "DELETE")] == [204, 404, 422]


def test_ghost_cleanup_primitives_in_repo_scope_with_runner_gone_meanwhile(make_client, github_server, world):
    """The reaper's ghost rule lists, then deletes: a runner removed in between answers 404 = gone."""
    github_server.add_runner("acme/app", "orch-a")
    vanishing = github_server.add_runner("acme/app", "orch-b")
    client = make_client()
    scope = RunnerScope("acme", "app")
    listed = {r.name: r.id for r in client.list_runners(scope, installation_id=world.acme)}
    assert set(listed) == {"orch-a", "orch-b"}
    github_server.fail_next(f"/actions/runners/{vanishing}$", 404, body={"message": "Not Found"})
    results = {name: client.delete_runner(scope, rid, installation_id=world.acme) for name, rid in listed.items()}
    assert results == {"orch-a": DeleteResult.DELETED, "orch-b": DeleteResult.GONE}


def test_rerun_job_and_failed_jobs(make_client, github_server, world):
    client = make_client()
    run_id, job_id = github_server.queue_job("acme/app", LABELS)
    github_server.set_job_status(job_id, "completed", "failure")

    client.rerun_job("acme/app", job_id, installation_id=world.acme)
    assert github_server.reruns == [("job", "acme/app", job_id)]
    assert github_server.runs[run_id]["run_attempt"] == 2

    new_job = max(github_server.jobs)
    github_server.set_job_status(new_job, "completed", "cancelled")
    client.rerun_failed_jobs("acme/app", run_id)          # installation looked up from the repository
    assert github_server.reruns[-1] == ("run", "acme/app", run_id)
    assert github_server.runs[run_id]["status"] == "queued"


def test_rerun_of_unknown_job_is_an_error(make_client, world):
    with pytest.raises(GitHubError, match="404"):
        make_client().rerun_job("acme/app", 999999, installation_id=world.acme)


def test_jit_name_taken_by_a_stale_registration_is_recovered(make_client, github_server, world):
    stale = github_server.add_runner("acme", "orch-1")
    cfg = make_client().create_jit_config(RunnerScope("acme"), name="orch-1", labels=LABELS,
                                          installation_id=world.acme)
    assert cfg.runner_id != stale and stale not in github_server.runners
    assert [c.status for c in github_server.calls_to("generate-jitconfig")] == [409, 201]


def test_jit_name_taken_by_a_busy_runner_is_an_error(make_client, github_server, world):
    github_server.add_runner("acme", "orch-1", status="online", busy=True)
    with pytest.raises(GitHubError, match="409"):
        make_client().create_jit_config(RunnerScope("acme"), name="orch-1", labels=LABELS,
                                        installation_id=world.acme)


def test_jit_validation_error_surfaces(make_client, world):
    with pytest.raises(GitHubError, match="422"):
        make_client().create_jit_config(RunnerScope("acme"), name="orch-1", labels=[], installation_id=world.acme)
