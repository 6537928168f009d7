"""The fake GitHub itself: auth checks, headers, pagination, conditional requests, failure injection."""

from __future__ import annotations

import time as _time

import jwt
import requests

from tests.fakes.github_server import FakeGitHubServer, generate_app_key


def app_jwt(private_pem: str, app_id: int = 4242) -> str:  # conftest's APP_ID
    now = int(_time.time())
    return jwt.encode({"iat": now - 60, "exp": now + 540, "iss": str(app_id)}, private_pem, algorithm="RS256")


def test_app_endpoints_need_a_valid_jwt(github_server, app_key, world):
    url = f"{github_server.url}/orgs/acme/installation"
    assert requests.get(url).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer " + app_jwt(generate_app_key()[0])}).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer " + app_jwt(app_key.private_pem, 1)}).status_code == 401
    ok = requests.get(url, headers={"Authorization": "Bearer " + app_jwt(app_key.private_pem)})
    assert ok.status_code == 200 and ok.json()["id"] == world.acme
    assert ok.json()["account"]["login"] == "acme" and "_repos" not in ok.json()


def test_installation_token_lifecycle_and_headers(github_server, app_key, clock, world):
    mint = requests.post(f"{github_server.ghes_url}/app/installations/{world.acme}/access_tokens",
                         headers={"Authorization": "Bearer " + app_jwt(app_key.private_pem)})
    assert mint.status_code == 201
    token = mint.json()["token"]
    assert token.startswith("ghs_") and mint.json()["expires_at"] == "2026-01-01T01:00:00Z"

    auth = {"Authorization": f"token {token}"}
    r = requests.get(f"{github_server.url}/orgs/acme/actions/runners", headers=auth)
    assert r.status_code == 200 and r.json() == {"total_count": 0, "runners": []}
    assert r.headers["X-RateLimit-Limit"] == "5000" and r.headers["X-RateLimit-Remaining"] == "4999"
    assert int(r.headers["X-RateLimit-Reset"]) == int(clock.time()) + 3600
    again = requests.get(f"{github_server.url}/orgs/acme/actions/runners",
                         headers={**auth, "If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and again.headers["X-RateLimit-Remaining"] == "4999"

    # Tokens only reach their own installation, and die at expiry on the shared clock.
    assert requests.get(f"{github_server.url}/orgs/alice/actions/runners", headers=auth).status_code == 404
    clock.advance(3600)
    assert requests.get(f"{github_server.url}/orgs/acme/actions/runners", headers=auth).status_code == 401


def test_pagination_links_and_failure_injection(github_server, world):
    github_server.add_personal_token("ghp_x")
    for i in range(5):
        github_server.add_runner("acme", f"r-{i}")
    auth = {"Authorization": "token ghp_x"}
    r = requests.get(f"{github_server.ghes_url}/orgs/acme/actions/runners?per_page=2", headers=auth)
    assert [x["name"] for x in r.json()["runners"]] == ["r-0", "r-1"]
    assert r.links["next"]["url"].startswith(github_server.ghes_url + "/orgs/acme/actions/runners?")
    assert "page=3" in r.links["last"]["url"]

    github_server.fail_next("/actions/runners$", 500, times=1, method="GET")
    assert requests.get(f"{github_server.url}/orgs/acme/actions/runners", headers=auth).status_code == 500
    assert requests.get(f"{github_server.url}/orgs/acme/actions/runners", headers=auth).status_code == 200


def test_reset_forgets_everything(github_server, world):
    github_server.add_runner("acme", "r")
    github_server.queue_job("acme/app", ["x"])
    github_server.fail_next(".", 500)
    github_server.reset()
    assert not (github_server.runners or github_server.jobs or github_server.installations or github_server.calls)
    assert requests.get(f"{github_server.url}/installation/repositories").status_code == 401   # no failure left


def test_server_class_runs_standalone():
    with FakeGitHubServer() as server:
        assert requests.get(f"{server.url}/nothing/here").status_code == 404
