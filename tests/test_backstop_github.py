"""Missed webhooks: a job GitHub only shows through its API still gets a runner.

The real GitHub client (PyGithub over HTTP) against the fake GitHub API server,
the real intake and scaler, and the sandbox cloud."""

from __future__ import annotations

from orch_support import ADMIN_TOKEN, WEBHOOK_SECRET
from orchestrator.config import load_config_text
from tests.fakes.github_server import FakeGitHubServer


def test_job_seen_only_through_the_api_gets_a_runner(make_orch, sqlite_url):
    gh = FakeGitHubServer().start()
    try:
        gh.add_personal_token("test-token-0123456789")
        gh.add_repository("acme/app")
        config = load_config_text(
            f"""
github: {{api_url: "{gh.url}", token: test-token-0123456789, webhook_secret: {WEBHOOK_SECRET},
          allowed_repositories: [acme/app], runner_scope: repo}}
server: {{admin_tokens: [{ADMIN_TOKEN}]}}
database: {{url: "{sqlite_url}"}}
pools:
  - name: gpu-t4
    labels: [gpu-t4]
    candidates: [{{cloud: sandbox, instance_type: gpu-t4-sim, price_per_hour: 0.3}}]
""",
            "<backstop>",
        )
        orch = make_orch(config)
        _, job_id = gh.queue_job("acme/app", ["self-hosted", "gpu-t4"])
        gh.queue_job("acme/app", ["ubuntu-latest"])  # GitHub-hosted: not ours
        assert orch.backstop_once() == 1
        job = orch.store.get_job(job_id)
        assert job.state == "queued" and job.source == "backstop"
        assert [o.result for o in orch.scaler.run_once()] == ["launched"]
        inst = orch.store.live_instances()[0]
        assert inst.job_id == job_id and inst.runner_id is not None
        assert [r["name"] for r in gh.runners_in("acme/app")] == [inst.id]
        # A second poll finds nothing new and launches nothing more.
        assert orch.backstop_once() == 0
        assert orch.scaler.run_once() == []
    finally:
        gh.stop()
