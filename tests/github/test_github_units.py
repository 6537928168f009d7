"""Small pure parts of the GitHub module: endpoint templates, backoff, permission naming."""

from __future__ import annotations

import random

import pytest

from orchestrator.github.auth import is_permission_refusal, permission_message
from orchestrator.github.ratelimit import Backoff, endpoint_template


@pytest.mark.parametrize("path, template", [
    ("/orgs/acme/actions/runners/generate-jitconfig", "/orgs/{org}/actions/runners/generate-jitconfig"),
    ("/orgs/acme/actions/runners/42", "/orgs/{org}/actions/runners/{runner_id}"),
    ("/repos/acme/app/actions/runners", "/repos/{owner}/{repo}/actions/runners"),
    ("/repos/acme/app/actions/runs/7/jobs", "/repos/{owner}/{repo}/actions/runs/{run_id}/jobs"),
    ("/repos/acme/app/actions/jobs/9/rerun", "/repos/{owner}/{repo}/actions/jobs/{job_id}/rerun"),
    ("/repos/acme/app/installation", "/repos/{owner}/{repo}/installation"),
    ("/app/installations/5/access_tokens", "/app/installations/{id}/access_tokens"),
    ("/users/alice/installation", "/users/{username}/installation"),
    ("/installation/repositories?per_page=100", "/installation/repositories"),
])
def test_endpoint_template(path, template):
    assert endpoint_template(path) == template


def test_backoff_is_jittered_exponential_and_capped():
    b = Backoff(random.Random(1), base=0.5, cap=8.0)
    for attempt in range(8):
        ceiling = min(8.0, 0.5 * 2**attempt)
        for _ in range(50):
            assert ceiling / 2 <= b.delay(attempt) <= ceiling
    assert b.delay(0, retry_after=20) == 20
    assert b.delay(0, retry_after=3600) == 60     # a huge Retry-After on a 5xx is capped


def test_permission_names_from_the_accepted_permissions_header():
    msg = permission_message("GET", "/x", "/x", 403,
                             {"x-accepted-github-permissions": "actions=read, administration=write; metadata=read"},
                             "Resource not accessible by integration", app=True)
    assert msg == ("GitHub App lacks 'Actions: read' (repository) and 'Administration: write' (repository) "
                   "needed for GET /x")


def test_what_counts_as_a_permission_refusal():
    assert is_permission_refusal(401, {}, "Bad credentials")
    assert is_permission_refusal(403, {}, "Must have admin rights to Repository.")
    assert is_permission_refusal(403, {"x-accepted-github-permissions": "actions=write"}, "")
    assert not is_permission_refusal(403, {}, "This workflow run is not completed yet and cannot be re-run.")
    assert not is_permission_refusal(404, {}, "Not Found")
