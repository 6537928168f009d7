"""GitHub App credentials: installation tokens cached on the injected clock, and
naming the App permission a refused call needed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from github import Auth

from orchestrator.core.clock import Clock

# Refresh this long before GitHub's expiry so no call carries a dying token.
TOKEN_REFRESH_MARGIN = timedelta(minutes=5)


@dataclass(frozen=True)
class InstallationToken:
    token: str
    expires_at: datetime

    def __repr__(self) -> str:  # keeps the secret out of tracebacks and logs
        return f"InstallationToken(expires_at={self.expires_at.isoformat()})"


class InstallationTokens:
    """One cached access token per installation; minted again 5 minutes before expiry."""

    def __init__(self, clock: Clock, mint: Callable[[int], InstallationToken]):
        self._clock = clock
        self._mint = mint
        self._tokens: dict[int, InstallationToken] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, installation_id: int) -> str:
        tok = self._tokens.get(installation_id)
        if tok is not None and self._fresh(tok):
            return tok.token
        with self._guard:
            lock = self._locks.setdefault(installation_id, threading.Lock())
        with lock:  # one mint per installation even when many threads need it at once
            tok = self._tokens.get(installation_id)
            if tok is None or not self._fresh(tok):
                tok = self._mint(installation_id)
                self._tokens[installation_id] = tok
            return tok.token

    def invalidate(self, installation_id: int) -> None:
        self._tokens.pop(installation_id, None)

    def _fresh(self, tok: InstallationToken) -> bool:
        expires = tok.expires_at if tok.expires_at.tzinfo else tok.expires_at.replace(tzinfo=timezone.utc)
        return self._clock.now() < expires - TOKEN_REFRESH_MARGIN


class InstallationAuth(Auth.Auth):
    """PyGithub auth that asks the cache for a live token on every request."""

    def __init__(self, tokens: InstallationTokens, installation_id: int):
        self._tokens = tokens
        self.installation_id = installation_id

    @property
    def token_type(self) -> str:
        return "token"

    @property
    def token(self) -> str:
        return self._tokens.get(self.installation_id)

    @property
    def _masked_token(self) -> str:
        return "token (installation token removed)"


# --- which permission a refused call needed -----------------------------------

# GitHub's permission keys (X-Accepted-GitHub-Permissions) -> (settings page name, level)
_PERMISSION_NAMES = {
    "organization_self_hosted_runners": ("Self-hosted runners", "organization"),
    "organization_administration": ("Administration", "organization"),
    "administration": ("Administration", "repository"),
    "actions": ("Actions", "repository"),
    "metadata": ("Metadata", "repository"),
    "members": ("Members", "organization"),
}

# What each endpoint this client calls needs, for when GitHub does not say.
ENDPOINT_PERMISSIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("POST", "/orgs/{org}/actions/runners/generate-jitconfig"): ("organization_self_hosted_runners", "write"),
    ("GET", "/orgs/{org}/actions/runners"): ("organization_self_hosted_runners", "read"),
    ("DELETE", "/orgs/{org}/actions/runners/{runner_id}"): ("organization_self_hosted_runners", "write"),
    ("GET", "/orgs/{org}/actions/runner-groups"): ("organization_self_hosted_runners", "read"),
    ("POST", "/repos/{owner}/{repo}/actions/runners/generate-jitconfig"): ("administration", "write"),
    ("GET", "/repos/{owner}/{repo}/actions/runners"): ("administration", "read"),
    ("DELETE", "/repos/{owner}/{repo}/actions/runners/{runner_id}"): ("administration", "write"),
    ("POST", "/repos/{owner}/{repo}/actions/jobs/{job_id}/rerun"): ("actions", "write"),
    ("POST", "/repos/{owner}/{repo}/actions/runs/{run_id}/rerun-failed-jobs"): ("actions", "write"),
    ("GET", "/repos/{owner}/{repo}/actions/runs"): ("actions", "read"),
    ("GET", "/repos/{owner}/{repo}/actions/runs/{run_id}/jobs"): ("actions", "read"),
    ("GET", "/installation/repositories"): ("metadata", "read"),
}


def _describe(key: str, level: str) -> str:
    name, where = _PERMISSION_NAMES.get(key, (key, "repository"))
    return f"'{name}: {level}' ({where})"


def _accepted(headers: Mapping[str, object]) -> list[tuple[str, str]]:
    raw = headers.get("x-accepted-github-permissions") or headers.get("X-Accepted-GitHub-Permissions")
    if not raw:
        return []
    # "a=read, b=write; c=write": ';' separates alternatives, ',' joins what one alternative needs
    first = str(raw).split(";")[0]
    out = []
    for part in first.split(","):
        key, _, level = part.strip().partition("=")
        if key:
            out.append((key, level or "read"))
    return out


def permission_message(
    verb: str, template: str, path: str, status: int, headers: Mapping[str, object], message: str,
    *, app: bool, jwt: bool = False,
) -> str:
    """One line naming what is missing, e.g. "GitHub App lacks 'Self-hosted runners: write'
    (organization) needed for POST /orgs/x/actions/runners/generate-jitconfig"."""
    who = "GitHub App" if app else "GitHub token"
    where = f"{verb} {path}"
    if jwt and status == 401:
        return (f"GitHub App authentication failed ({status} {message or 'no message'}) for {where}: "
                "check github.app_id and github.private_key_path")
    if status == 401:
        return f"{who} credentials were refused ({status} {message or 'Bad credentials'}) for {where}"
    needed = _accepted(headers)
    if not needed and (verb, template) in ENDPOINT_PERMISSIONS:
        needed = [ENDPOINT_PERMISSIONS[(verb, template)]]
    if needed:
        what = " and ".join(_describe(k, lvl) for k, lvl in needed)
        return f"{who} lacks {what} needed for {where}"
    return f"{who} is not allowed {where} ({status} {message or 'Forbidden'})"


def is_permission_refusal(status: int, headers: Mapping[str, object], message: str) -> bool:
    """401 always; 403 only when it is about access, not e.g. 'run still in progress'."""
    if status == 401:
        return True
    if status != 403:
        return False
    if _accepted(headers):
        return True
    m = (message or "").lower()
    return any(s in m for s in ("not accessible by", "must have admin", "permission", "forbids access"))
