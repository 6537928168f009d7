"""App auth (JWT -> installation token -> JIT), token auth, token caching on the injected clock, GHES."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest

from orchestrator.github.base import GitHubError, GitHubPermissionError, JitConfig, RunnerScope
from tests.fakes.github_server import generate_app_key

LABELS = ["self-hosted", "linux", "x64", "gpu-t4"]


def test_org_jit_through_app_auth(make_client, github_server, world):
    client = make_client()
    cfg = client.create_jit_config(RunnerScope("acme"), name="orch-1", labels=LABELS, installation_id=world.acme)

    assert isinstance(cfg, JitConfig) and cfg.name == "orch-1"
    assert ".runner" in json.loads(base64.b64decode(cfg.encoded_jit_config))
    mint, jit = github_server.calls
    assert (mint.method, mint.path, mint.headers["authorization"]) == (
        "POST", f"/app/installations/{world.acme}/access_tokens", "Bearer")
    assert (jit.method, jit.path, jit.headers["authorization"]) == (
        "POST", "/orgs/acme/actions/runners/generate-jitconfig", "token")
    runner = github_server.runners[cfg.runner_id]
    assert runner["_jit_body"] == {"name": "orch-1", "runner_group_id": 1, "labels": LABELS, "work_folder": "_work"}
    assert [lbl["name"] for lbl in runner["labels"]] == LABELS


def test_repo_jit_looks_up_the_installation_once(make_client, github_server, world):
    client = make_client()
    scope = RunnerScope("alice", "tool")
    first = client.create_jit_config(scope, name="orch-1", labels=LABELS)
    client.create_jit_config(scope, name="orch-2", labels=LABELS)

    assert [c.path for c in github_server.calls] == [
        "/orgs/alice/installation",                    # 404: alice is a user
        "/repos/alice/tool/installation",
        f"/app/installations/{world.alice}/access_tokens",
        "/repos/alice/tool/actions/runners/generate-jitconfig",
        "/repos/alice/tool/actions/runners/generate-jitconfig",
    ]
    assert github_server.calls[0].status == 404
    assert github_server.runners[first.runner_id]["_scope"] == "alice/tool"


def test_org_installation_lookup_is_cached(make_client, github_server, world):
    client = make_client()
    for i in range(3):
        client.create_jit_config(RunnerScope("acme"), name=f"orch-{i}", labels=LABELS)
    assert len(github_server.calls_to("/installation$")) == 1
    assert github_server.mint_count == 1


def test_not_installed_owner_is_a_clear_error(make_client, world):
    with pytest.raises(GitHubError, match="not installed on 'nobody'"):
        make_client().create_jit_config(RunnerScope("nobody"), name="orch-1", labels=LABELS)


def test_hundred_jobs_mint_one_token_and_remint_after_expiry_minus_five_minutes(make_client, github_server, clock, world):
    client = make_client()
    for i in range(100):
        client.create_jit_config(RunnerScope("acme"), name=f"orch-{i}", labels=LABELS, installation_id=world.acme)
    assert github_server.mint_count == 1

    clock.advance(timedelta(minutes=55) - timedelta(seconds=1))
    client.create_jit_config(RunnerScope("acme"), name="orch-a", labels=LABELS, installation_id=world.acme)
    assert github_server.mint_count == 1

    clock.advance(timedelta(seconds=2))
    client.create_jit_config(RunnerScope("acme"), name="orch-b", labels=LABELS, installation_id=world.acme)
    assert github_server.mint_count == 2


def test_token_rejected_early_is_reminted_once(make_client, github_server, clock, world):
    client = make_client()
    client.list_runners(RunnerScope("acme"), installation_id=world.acme)
    (token, (inst, _)), = github_server.tokens.items()
    github_server.tokens[token] = (inst, clock.now() - timedelta(seconds=1))  # GitHub revoked it

    client.list_runners(RunnerScope("acme"), installation_id=world.acme)
    assert github_server.mint_count == 2
    assert [c.status for c in github_server.calls_to("/actions/runners$")] == [200, 401, 304]


def test_runner_group_resolved_by_name_and_cached(make_client, github_server, world):
    gid = github_server.add_runner_group("acme", "gpu-runners")
    client = make_client(runner_group="gpu-runners")
    a = client.create_jit_config(RunnerScope("acme"), name="orch-1", labels=LABELS, installation_id=world.acme)
    b = client.create_jit_config(RunnerScope("acme"), name="orch-2", labels=LABELS, installation_id=world.acme)
    assert github_server.runners[a.runner_id]["runner_group_id"] == gid
    assert github_server.runners[b.runner_id]["runner_group_id"] == gid
    assert len(github_server.calls_to("/runner-groups$")) == 1


def test_unknown_runner_group_is_an_error(make_client, world):
    client = make_client(runner_group="missing")
    with pytest.raises(GitHubError, match="runner group 'missing' not found"):
        client.create_jit_config(RunnerScope("acme"), name="orch-1", labels=LABELS, installation_id=world.acme)


def test_ghes_api_prefix(make_client, github_server, world):
    client = make_client(api_url=github_server.ghes_url)
    client.create_jit_config(RunnerScope("acme"), name="orch-1", labels=LABELS)
    for i in range(120):
        github_server.add_runner("acme", f"extra-{i}")
    assert len(client.list_runners(RunnerScope("acme"))) == 121   # two pages; Link URLs keep the prefix
    assert github_server.calls and all(c.prefix == "/api/v3" for c in github_server.calls)
    assert [c.query.get("page") for c in github_server.calls_to("/actions/runners$")] == [None, "2"]


def test_plain_token_auth(make_client, github_server, world):
    github_server.add_personal_token("ghp_testtoken")
    client = make_client(token="ghp_testtoken")
    cfg = client.create_jit_config(RunnerScope("acme"), name="orch-1", labels=LABELS)
    assert cfg.runner_id in github_server.runners
    assert github_server.mint_count == 0
    assert [c.path for c in github_server.calls] == ["/orgs/acme/actions/runners/generate-jitconfig"]


def test_wrong_app_key_names_the_credentials(make_client, github_server, world, tmp_path, caplog):
    other = tmp_path / "other.pem"
    other.write_text(generate_app_key()[0])
    client = make_client(private_key_path=str(other))
    with pytest.raises(GitHubPermissionError, match="app_id and github.private_key_path"):
        client.create_jit_config(RunnerScope("acme"), name="orch-1", labels=LABELS, installation_id=world.acme)


def test_unreadable_private_key(make_client, tmp_path):
    with pytest.raises(GitHubError, match="cannot read GitHub App private key"):
        make_client(private_key_path=str(tmp_path / "missing.pem"))
