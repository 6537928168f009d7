"""A fake GitHub REST API over real HTTP, for driving PyGithub end to end.

It keeps a small world (App installations, repositories, runners, workflow
runs and jobs), checks App JWTs (RS256) and installation tokens, answers with
GitHub's body shapes and headers (X-RateLimit-*, ETag, Link), honours
If-None-Match, accepts the GHES `/api/v3` prefix, and lets tests inject
failures. Token expiry and rate-limit resets follow `clock` (share a FakeClock
with the code under test); JWTs are checked on real time because PyGithub
signs them with it.

    server = FakeGitHubServer(app_id=APP_ID, public_key_pem=pub).start()
    server.add_installation("acme", repositories=["acme/app"])
    server.queue_job("acme/app", ["self-hosted", "gpu-t4"])
"""

from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json
import re
import secrets
import threading
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from orchestrator.core.clock import SystemClock

GHES_PREFIX = "/api/v3"
RATE_LIMIT = 5000
TOKEN_LIFETIME = timedelta(hours=1)
DOCS = "https://docs.github.com/rest"
DEFAULT_PERMISSIONS = {
    "organization_self_hosted_runners": "write",
    "administration": "write",
    "actions": "write",
    "metadata": "read",
}
_LEVEL = {"read": 1, "write": 2, "admin": 3}


def generate_app_key() -> tuple[str, str]:
    """(private PEM, public PEM) of a fresh RSA key for a test App."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Call:
    method: str
    path: str                    # without the GHES prefix or query
    prefix: str                  # "" or "/api/v3"
    query: dict[str, str]
    headers: dict[str, str]      # lower-cased names; Authorization reduced to its scheme
    status: int = 0
    bucket: str | None = None


@dataclass
class _Failure:
    pattern: re.Pattern[str]
    method: str | None
    times: int
    status: int | None           # None: drop the connection
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _error(status: int, message: str, headers: dict[str, str] | None = None, doc: str = "") -> _Reply:
    return _Reply(status, {"message": message, "documentation_url": f"{DOCS}{doc}", "status": str(status)}, headers)


class FakeGitHubServer:
    """See the module docstring. Start once per test session; `reset()` between tests."""

    def __init__(self, *, app_id: int = 4242, public_key_pem: str | None = None, clock: Any = None,
                 host: str = "127.0.0.1"):
        self.app_id = app_id
        self.public_key_pem = public_key_pem
        self.clock = clock or SystemClock()
        self._host = host
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._routes = self._build_routes()
        self.reset()

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> "FakeGitHubServer":
        server = self

        class Handler(_Handler):
            fake = server

        self._httpd = ThreadingHTTPServer((self._host, 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-github", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeGitHubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def ghes_url(self) -> str:
        return self.url + GHES_PREFIX

    def reset(self, clock: Any = None) -> None:
        """Forget everything: world, tokens, rate limits, failures, call log."""
        with self._lock:
            if clock is not None:
                self.clock = clock
            self._ids = itertools.count(1000)
            self.installations: dict[int, dict[str, Any]] = {}
            self.repositories: dict[str, dict[str, Any]] = {}
            self.runners: dict[int, dict[str, Any]] = {}
            self.runner_groups: dict[str, list[dict[str, Any]]] = {}
            self.runs: dict[int, dict[str, Any]] = {}
            self.jobs: dict[int, dict[str, Any]] = {}
            self.tokens: dict[str, tuple[int, datetime]] = {}
            self.personal_tokens: dict[str, dict[str, str] | None] = {}
            self.buckets: dict[str, dict[str, float]] = {}
            self.calls: list[Call] = []
            self.mints: list[int] = []
            self.reruns: list[tuple[str, str, int]] = []
            self._failures: list[_Failure] = []

    # --- world building ------------------------------------------------------------

    def _next_id(self) -> int:
        return next(self._ids)

    def add_repository(self, full_name: str, *, private: bool = True, archived: bool = False) -> dict[str, Any]:
        with self._lock:
            if full_name in self.repositories:
                return self.repositories[full_name]
            owner, name = full_name.split("/", 1)
            repo = {
                "id": self._next_id(),
                "node_id": f"R_{secrets.token_hex(6)}",
                "name": name,
                "full_name": full_name,
                "private": private,
                "visibility": "private" if private else "public",
                "archived": archived,
                "owner": self._account(owner),
                "html_url": f"https://github.com/{full_name}",
                "url": f"https://api.github.com/repos/{full_name}",
                "default_branch": "main",
            }
            self.repositories[full_name] = repo
            return repo

    def _account(self, login: str, kind: str | None = None) -> dict[str, Any]:
        if kind is None:
            inst = self._installation_of_account(login)
            kind = inst["target_type"] if inst else "Organization"
        return {"login": login, "id": zlib.crc32(login.encode()) % 10**7, "type": kind,
                "url": f"https://api.github.com/users/{login}", "site_admin": False}

    def add_installation(self, account: str, *, account_type: str = "Organization",
                         repositories: list[str] | None = None, permissions: dict[str, str] | None = None,
                         repository_selection: str = "all", installation_id: int | None = None) -> int:
        """An App installation on `account`; `repositories` are created (private) if new."""
        with self._lock:
            inst_id = installation_id or self._next_id()
            self.installations[inst_id] = {
                "id": inst_id,
                "account": self._account(account, account_type),
                "repository_selection": repository_selection,
                "access_tokens_url": f"https://api.github.com/app/installations/{inst_id}/access_tokens",
                "repositories_url": "https://api.github.com/installation/repositories",
                "html_url": f"https://github.com/organizations/{account}/settings/installations/{inst_id}",
                "app_id": self.app_id,
                "app_slug": "orchestrator-test",
                "target_id": zlib.crc32(account.encode()) % 10**7,
                "target_type": account_type,
                "permissions": dict(permissions or DEFAULT_PERMISSIONS),
                "events": ["workflow_job"],
                "created_at": "2025-01-01T00:00:00Z",
                "updated_at": "2025-01-01T00:00:00Z",
                "single_file_name": None,
                "suspended_at": None,
                "_repos": set(),
            }
            for full in repositories or []:
                self.add_repository(full)
                self.installations[inst_id]["_repos"].add(full)
            self.runner_groups.setdefault(account.lower(), [self._group(1, "Default", default=True)])
            return inst_id

    def add_personal_token(self, token: str, permissions: dict[str, str] | None = None) -> None:
        """A plain token (the `token:` config); None permissions = may do everything."""
        with self._lock:
            self.personal_tokens[token] = permissions

    def _group(self, group_id: int, name: str, default: bool = False) -> dict[str, Any]:
        return {"id": group_id, "name": name, "visibility": "all", "default": default,
                "runners_url": f"https://api.github.com/orgs/-/actions/runner-groups/{group_id}/runners",
                "inherited": False, "allows_public_repositories": False, "restricted_to_workflows": False,
                "selected_workflows": [], "workflow_restrictions_read_only": False}

    def add_runner_group(self, org: str, name: str) -> int:
        with self._lock:
            gid = self._next_id()
            self.runner_groups.setdefault(org.lower(), [self._group(1, "Default", default=True)]).append(
                self._group(gid, name))
            return gid

    def add_runner(self, scope: str, name: str, *, status: str = "offline", busy: bool = False,
                   labels: tuple[str, ...] = ("self-hosted", "linux", "x64"), group_id: int = 1) -> int:
        """`scope` is 'org' name or 'owner/repo'."""
        with self._lock:
            rid = self._next_id()
            self.runners[rid] = {
                "id": rid, "name": name, "os": "Linux", "status": status, "busy": busy, "ephemeral": True,
                "runner_group_id": group_id,
                "labels": [{"id": i + 1, "name": lbl, "type": "read-only" if lbl in ("self-hosted", "linux", "x64")
                            else "custom"} for i, lbl in enumerate(labels)],
                "_scope": scope.lower(),
            }
            return rid

    def set_runner(self, runner_id: int, *, status: str | None = None, busy: bool | None = None) -> None:
        with self._lock:
            r = self.runners[runner_id]
            if status is not None:
                r["status"] = status
            if busy is not None:
                r["busy"] = busy

    def runners_in(self, scope: str) -> list[dict[str, Any]]:
        with self._lock:
            return [self._public(r) for r in self.runners.values() if r["_scope"] == scope.lower()]

    def queue_job(self, repository: str, labels: list[str], *, status: str = "queued",
                  name: str = "build", run_id: int | None = None) -> tuple[int, int]:
        """A job (in a new run unless run_id is given); returns (run_id, job_id)."""
        with self._lock:
            repo = self.add_repository(repository) if repository not in self.repositories else self.repositories[repository]
            now = _iso(self.clock.now())
            if run_id is None:
                run_id = self._next_id()
                self.runs[run_id] = {
                    "id": run_id, "name": "CI", "node_id": f"WFR_{run_id}", "head_branch": "main",
                    "head_sha": hashlib.sha1(str(run_id).encode()).hexdigest(), "path": ".github/workflows/ci.yml@main",
                    "run_number": len(self.runs) + 1, "event": "push", "status": status, "conclusion": None,
                    "workflow_id": 161335, "url": f"https://api.github.com/repos/{repository}/actions/runs/{run_id}",
                    "html_url": f"https://github.com/{repository}/actions/runs/{run_id}",
                    "jobs_url": f"https://api.github.com/repos/{repository}/actions/runs/{run_id}/jobs",
                    "rerun_url": f"https://api.github.com/repos/{repository}/actions/runs/{run_id}/rerun",
                    "created_at": now, "updated_at": now, "run_attempt": 1, "run_started_at": now,
                    "repository": {k: repo[k] for k in ("id", "node_id", "name", "full_name", "private", "owner",
                                                         "html_url", "url")},
                    "_repo": repository,
                }
            run = self.runs[run_id]
            job_id = self._next_id()
            self.jobs[job_id] = {
                "id": job_id, "run_id": run_id,
                "run_url": run["url"], "node_id": f"CR_{job_id}", "head_sha": run["head_sha"],
                "url": f"https://api.github.com/repos/{repository}/actions/jobs/{job_id}",
                "html_url": f"https://github.com/{repository}/actions/runs/{run_id}/job/{job_id}",
                "status": status, "conclusion": None, "created_at": now, "started_at": None, "completed_at": None,
                "name": name, "steps": [], "check_run_url": f"https://api.github.com/repos/{repository}/check-runs/{job_id}",
                "labels": list(labels), "runner_id": None, "runner_name": None, "runner_group_id": None,
                "runner_group_name": None, "run_attempt": run["run_attempt"], "workflow_name": run["name"],
                "head_branch": run["head_branch"],
            }
            self._refresh_run(run_id)
            return run_id, job_id

    def set_job_status(self, job_id: int, status: str, conclusion: str | None = None) -> None:
        with self._lock:
            job = self.jobs[job_id]
            job["status"] = status
            job["conclusion"] = conclusion if status == "completed" else None
            self._refresh_run(job["run_id"])

    def _refresh_run(self, run_id: int) -> None:
        run = self.runs[run_id]
        states = [j["status"] for j in self.jobs.values() if j["run_id"] == run_id and j["run_attempt"] == run["run_attempt"]]
        if states and all(s == "completed" for s in states):
            run["status"] = "completed"
            concl = [j["conclusion"] for j in self.jobs.values() if j["run_id"] == run_id and j["run_attempt"] == run["run_attempt"]]
            run["conclusion"] = "failure" if any(c in ("failure", "cancelled") for c in concl) else "success"
        elif "in_progress" in states or ("completed" in states):
            run["status"] = "in_progress"
        elif "waiting" in states:
            run["status"] = "waiting"
        elif states:
            run["status"] = "queued"
        run["updated_at"] = _iso(self.clock.now())

    # --- failures and limits ----------------------------------------------------------

    def fail_next(self, path_regex: str, status: int, *, times: int = 1, headers: dict[str, str] | None = None,
                  body: Any = None, method: str | None = None) -> None:
        """The next `times` requests whose path matches answer `status` (before auth; no rate-limit cost)."""
        if body is None:
            body = {"message": {500: "Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
                                504: "Gateway Timeout"}.get(status, "Error"), "documentation_url": DOCS}
        with self._lock:
            self._failures.append(_Failure(re.compile(path_regex), method, times, status, dict(headers or {}), body))

    def drop_next(self, path_regex: str, *, times: int = 1, method: str | None = None) -> None:
        """The next `times` matching requests get their connection closed without an answer."""
        with self._lock:
            self._failures.append(_Failure(re.compile(path_regex), method, times, None))

    def secondary_limit_next(self, path_regex: str, *, retry_after: int | None = 60, status: int = 403) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        self.fail_next(path_regex, status, headers=headers, body={
            "message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again. "
                       "If you reach out to GitHub Support for help, please include the request ID 0000:0000.",
            "documentation_url": f"{DOCS}/overview/rate-limits-for-the-rest-api#about-secondary-rate-limits"})

    @staticmethod
    def installation_bucket(installation_id: int) -> str:
        return f"installation:{installation_id}"

    def set_rate_limit(self, bucket: str, remaining: int, *, reset_in: float = 3600) -> None:
        with self._lock:
            self.buckets[bucket] = {"limit": RATE_LIMIT, "remaining": remaining,
                                    "reset": int(self.clock.time() + reset_in), "used": RATE_LIMIT - remaining}

    def exhaust_rate_limit(self, bucket: str, *, reset_in: float = 600) -> None:
        self.set_rate_limit(bucket, 0, reset_in=reset_in)

    def rate_limit(self, bucket: str) -> dict[str, float]:
        with self._lock:
            return dict(self._bucket(bucket))

    def revoke_permission(self, installation_id: int, permission: str) -> None:
        with self._lock:
            self.installations[installation_id]["permissions"].pop(permission, None)

    # --- introspection --------------------------------------------------------------------

    def calls_to(self, path_regex: str, method: str | None = None) -> list[Call]:
        rx = re.compile(path_regex)
        with self._lock:
            return [c for c in self.calls if rx.search(c.path) and (method is None or c.method == method)]

    @property
    def mint_count(self) -> int:
        return len(self.mints)

    # --- HTTP plumbing -------------------------------------------------------------------

    def _bucket(self, name: str) -> dict[str, float]:
        b = self.buckets.get(name)
        now = self.clock.time()
        if b is None or now >= b["reset"]:
            b = {"limit": RATE_LIMIT, "remaining": RATE_LIMIT, "reset": int(now + 3600), "used": 0}
            self.buckets[name] = b
        return b

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        for f in self._failures:
            if f.times > 0 and f.pattern.search(path) and (f.method is None or f.method == method):
                f.times -= 1
                if f.times == 0:
                    self._failures.remove(f)
                return f
        return None

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes, host: str
               ) -> tuple[int, dict[str, str], bytes] | None:
        """One request -> (status, headers, body), or None to drop the connection."""
        split = urlsplit(raw_path)
        path, prefix = split.path, ""
        if path.startswith(GHES_PREFIX + "/"):
            path, prefix = path[len(GHES_PREFIX):], GHES_PREFIX
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        auth = headers.get("authorization", "")
        call = Call(method, path, prefix, query, {k: (v.split(" ")[0] if k == "authorization" else v)
                                                  for k, v in headers.items()})
        with self._lock:
            self.calls.append(call)
            failure = self._take_failure(method, path)
        if failure is not None:
            if failure.status is None:
                call.status = -1
                return None
            call.status = failure.status
            out = dict(failure.headers)
            out.setdefault("Content-Type", "application/json; charset=utf-8")
            return failure.status, out, json.dumps(failure.body).encode()
        reply_headers: dict[str, str] = {"Content-Type": "application/json; charset=utf-8",
                                         "X-GitHub-Api-Version-Selected": "2022-11-28",
                                         "X-GitHub-Request-Id": secrets.token_hex(8).upper()}
        with self._lock:
            bucket: dict[str, float] | None = None
            try:
                route, params = self._route(method, path)
                principal = self._authenticate(auth, route.auth)
                call.bucket = principal["bucket"]
                bucket = self._bucket(principal["bucket"])
                if bucket["remaining"] <= 0:
                    who = (f"installation ID {principal['installation']}" if principal.get("installation")
                           else "this token")
                    raise _error(403, f"API rate limit exceeded for {who}. If you reach out to GitHub Support for "
                                 "help, please include the request ID.", {},
                                 "/overview/resources-in-the-rest-api#rate-limiting")
                self._authorize(principal, route, params)
                payload = json.loads(body) if body else None
                status, data, extra = route.handler(self, principal, params, query, payload, path,
                                                    f"http://{host}{prefix}")
            except _Reply as r:
                status, data, extra = r.status, r.body, r.headers
            encoded = json.dumps(data).encode() if data is not None else b""
            if bucket is not None:
                if method == "GET" and status == 200:
                    etag = f'W/"{hashlib.sha256(encoded).hexdigest()[:40]}"'
                    reply_headers["ETag"] = etag
                    reply_headers["Cache-Control"] = "private, max-age=60, s-maxage=60"
                    reply_headers["Vary"] = "Accept, Authorization, Cookie, X-GitHub-OTP"
                    if headers.get("if-none-match") == etag:
                        # A 304 on an authorised request does not count against the limit.
                        call.status = 304
                        reply_headers.update(self._rate_headers(bucket))
                        return 304, reply_headers, b""
                if bucket["remaining"] > 0:
                    bucket["remaining"] -= 1
                    bucket["used"] += 1
                reply_headers.update(self._rate_headers(bucket))
            reply_headers.update(extra)
            call.status = status
            return status, reply_headers, encoded

    @staticmethod
    def _rate_headers(bucket: dict[str, float]) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(int(bucket["limit"])),
                "X-RateLimit-Remaining": str(int(bucket["remaining"])),
                "X-RateLimit-Reset": str(int(bucket["reset"])),
                "X-RateLimit-Used": str(int(bucket["used"])),
                "X-RateLimit-Resource": "core"}

    # --- routing, auth -----------------------------------------------------------------

    @dataclass
    class _Route:
        method: str
        pattern: re.Pattern[str]
        handler: Callable[..., tuple[int, Any, dict[str, str]]]
        auth: str                       # "jwt" | "installation"
        permission: tuple[str, str] | None = None

    def _build_routes(self) -> list["FakeGitHubServer._Route"]:
        R = FakeGitHubServer._Route
        o, r = r"(?P<org>[^/]+)", r"(?P<owner>[^/]+)/(?P<repo>[^/]+)"
        spec = [
            ("POST", r"/app/installations/(?P<inst>\d+)/access_tokens", FakeGitHubServer._h_mint, "jwt", None),
            ("GET", r"/app/installations", FakeGitHubServer._h_installations, "jwt", None),
            ("GET", rf"/orgs/{o}/installation", FakeGitHubServer._h_org_installation, "jwt", None),
            ("GET", r"/users/(?P<user>[^/]+)/installation", FakeGitHubServer._h_user_installation, "jwt", None),
            ("GET", rf"/repos/{r}/installation", FakeGitHubServer._h_repo_installation, "jwt", None),
            ("GET", r"/installation/repositories", FakeGitHubServer._h_installation_repos, "installation",
             ("metadata", "read")),
            ("GET", r"/user/repos", FakeGitHubServer._h_user_repos, "installation", None),
            ("GET", rf"/orgs/{o}/actions/runner-groups", FakeGitHubServer._h_runner_groups, "installation",
             ("organization_self_hosted_runners", "read")),
            ("POST", rf"/orgs/{o}/actions/runners/generate-jitconfig", FakeGitHubServer._h_jit, "installation",
             ("organization_self_hosted_runners", "write")),
            ("GET", rf"/orgs/{o}/actions/runners", FakeGitHubServer._h_list_runners, "installation",
             ("organization_self_hosted_runners", "read")),
            ("DELETE", rf"/orgs/{o}/actions/runners/(?P<rid>\d+)", FakeGitHubServer._h_delete_runner,
             "installation", ("organization_self_hosted_runners", "write")),
            ("POST", rf"/repos/{r}/actions/runners/generate-jitconfig", FakeGitHubServer._h_jit, "installation",
             ("administration", "write")),
            ("GET", rf"/repos/{r}/actions/runners", FakeGitHubServer._h_list_runners, "installation",
             ("administration", "read")),
            ("DELETE", rf"/repos/{r}/actions/runners/(?P<rid>\d+)", FakeGitHubServer._h_delete_runner,
             "installation", ("administration", "write")),
            ("GET", rf"/repos/{r}/actions/runs", FakeGitHubServer._h_list_runs, "installation", ("actions", "read")),
            ("GET", rf"/repos/{r}/actions/runs/(?P<run>\d+)/jobs", FakeGitHubServer._h_list_jobs, "installation",
             ("actions", "read")),
            ("POST", rf"/repos/{r}/actions/jobs/(?P<job>\d+)/rerun", FakeGitHubServer._h_rerun_job,
             "installation", ("actions", "write")),
            ("POST", rf"/repos/{r}/actions/runs/(?P<run>\d+)/rerun-failed-jobs",
             FakeGitHubServer._h_rerun_failed, "installation", ("actions", "write")),
        ]
        return [R(m, re.compile(f"^{p}$"), h, a, perm) for m, p, h, a, perm in spec]

    def _route(self, method: str, path: str) -> tuple["FakeGitHubServer._Route", dict[str, str]]:
        for route in self._routes:
            m = route.pattern.match(path)
            if m and route.method == method:
                return route, m.groupdict()
        raise _error(404, "Not Found")

    def _authenticate(self, header: str, kind: str) -> dict[str, Any]:
        scheme, _, credential = header.partition(" ")
        if not credential:
            raise _error(401, "Requires authentication", doc="/overview/authenticating-to-the-rest-api")
        if kind == "jwt":
            if scheme.lower() != "bearer" or self.public_key_pem is None:
                raise _error(401, "A JSON web token could not be decoded")
            try:
                claims = jwt.decode(credential, self.public_key_pem, algorithms=["RS256"], leeway=60,
                                    options={"require": ["iat", "exp", "iss"]})
            except jwt.ExpiredSignatureError:
                raise _error(401, "'Expiration time' claim ('exp') must be a numeric value representing the future "
                                  "time at which the assertion expires") from None
            except jwt.PyJWTError:
                raise _error(401, "A JSON web token could not be decoded") from None
            if str(claims["iss"]) != str(self.app_id):
                raise _error(401, "Integration not found")
            if claims["exp"] - claims["iat"] > 600 + 60:
                raise _error(401, "'Expiration time' claim ('exp') is too far in the future")
            return {"kind": "app", "bucket": "app"}
        if scheme.lower() not in ("token", "bearer"):
            raise _error(401, "Bad credentials")
        if credential in self.tokens:
            inst, expires = self.tokens[credential]
            if self.clock.now() >= expires or inst not in self.installations:
                raise _error(401, "Bad credentials")
            return {"kind": "installation", "installation": inst, "bucket": self.installation_bucket(inst)}
        if credential in self.personal_tokens:
            return {"kind": "pat", "permissions": self.personal_tokens[credential],
                    "bucket": f"token:{hashlib.sha256(credential.encode()).hexdigest()[:8]}"}
        raise _error(401, "Bad credentials")

    def _installation_of_account(self, login: str) -> dict[str, Any] | None:
        return next((i for i in self.installations.values() if i["account"]["login"].lower() == login.lower()), None)

    def _covers(self, inst: dict[str, Any], full_name: str) -> bool:
        owner = full_name.split("/", 1)[0]
        if inst["account"]["login"].lower() != owner.lower() or full_name not in self.repositories:
            return False
        return inst["repository_selection"] == "all" or full_name in inst["_repos"]

    def _authorize(self, principal: dict[str, Any], route: "FakeGitHubServer._Route", params: dict[str, str]) -> None:
        if principal["kind"] == "app":
            return
        if principal["kind"] == "installation":
            inst = self.installations[principal["installation"]]
            if "org" in params:
                if params["org"].lower() != inst["account"]["login"].lower() or inst["target_type"] != "Organization":
                    raise _error(404, "Not Found")
            if "owner" in params and not self._covers(inst, f"{params['owner']}/{params['repo']}"):
                raise _error(404, "Not Found")
            granted = inst["permissions"]
        else:
            if "owner" in params and f"{params['owner']}/{params['repo']}" not in self.repositories:
                raise _error(404, "Not Found")
            granted = principal["permissions"]
            if granted is None:
                return
        if route.permission:
            key, level = route.permission
            if _LEVEL.get(granted.get(key, ""), 0) < _LEVEL[level]:
                who = "integration" if principal["kind"] == "installation" else "personal access token"
                raise _error(403, f"Resource not accessible by {who}",
                             {"X-Accepted-GitHub-Permissions": f"{key}={level}"})

    # --- pagination --------------------------------------------------------------------

    @staticmethod
    def _page(items: list[Any], query: dict[str, str], path: str, base: str) -> tuple[list[Any], dict[str, str]]:
        """One page of `items` plus GitHub's Link header (absolute URLs under `base`)."""
        per_page = max(1, min(int(query.get("per_page", 30)), 100))
        page = max(1, int(query.get("page", 1)))
        last = max(1, -(-len(items) // per_page))

        def link(p: int, rel: str) -> str:
            return f'<{base}{path}?{urlencode({**query, "page": str(p), "per_page": str(per_page)})}>; rel="{rel}"'

        links = []
        if page < last:
            links += [link(page + 1, "next"), link(last, "last")]
        if page > 1:
            links += [link(1, "first"), link(page - 1, "prev")]
        headers = {"Link": ", ".join(links)} if links else {}
        return items[(page - 1) * per_page: page * per_page], headers

    # --- handlers: (self, principal, params, query, body, path, base) -> (status, data, headers)

    def _h_mint(self, principal, params, query, body, path, base):
        inst_id = int(params["inst"])
        inst = self.installations.get(inst_id)
        if inst is None:
            raise _error(404, "Not Found", doc="/apps/apps#create-an-installation-access-token-for-an-app")
        if inst["suspended_at"]:
            raise _error(403, "This installation has been suspended")
        token = "ghs_" + secrets.token_urlsafe(27)[:36]
        expires = self.clock.now() + TOKEN_LIFETIME
        self.tokens[token] = (inst_id, expires)
        self.mints.append(inst_id)
        return 201, {"token": token, "expires_at": _iso(expires), "permissions": dict(inst["permissions"]),
                     "repository_selection": inst["repository_selection"]}, {}

    def _installation_body(self, inst: dict[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in inst.items() if not k.startswith("_")}

    def _h_installations(self, principal, params, query, body, path, base):
        items, headers = self._page([self._installation_body(i) for i in self.installations.values()],
                                    query, path, base)
        return 200, items, headers

    def _h_org_installation(self, principal, params, query, body, path, base):
        inst = self._installation_of_account(params["org"])
        if inst is None or inst["target_type"] != "Organization":
            raise _error(404, "Not Found", doc="/apps/apps#get-an-organization-installation-for-the-authenticated-app")
        return 200, self._installation_body(inst), {}

    def _h_user_installation(self, principal, params, query, body, path, base):
        inst = self._installation_of_account(params["user"])
        if inst is None:
            raise _error(404, "Not Found", doc="/apps/apps#get-a-user-installation-for-the-authenticated-app")
        return 200, self._installation_body(inst), {}

    def _h_repo_installation(self, principal, params, query, body, path, base):
        full = f"{params['owner']}/{params['repo']}"
        inst = next((i for i in self.installations.values() if self._covers(i, full)), None)
        if inst is None:
            raise _error(404, "Not Found", doc="/apps/apps#get-a-repository-installation-for-the-authenticated-app")
        return 200, self._installation_body(inst), {}

    def _h_installation_repos(self, principal, params, query, body, path, base):
        inst = self.installations[principal["installation"]]
        repos = [r for name, r in sorted(self.repositories.items()) if self._covers(inst, name)]
        page, headers = self._page(repos, query, path, base)
        return 200, {"total_count": len(repos), "repository_selection": inst["repository_selection"],
                     "repositories": page}, headers

    def _h_user_repos(self, principal, params, query, body, path, base):
        repos = [r for _, r in sorted(self.repositories.items())]
        page, headers = self._page(repos, query, path, base)
        return 200, page, headers

    def _h_runner_groups(self, principal, params, query, body, path, base):
        groups = self.runner_groups.get(params["org"].lower(), [self._group(1, "Default", default=True)])
        page, headers = self._page(groups, query, path, base)
        return 200, {"total_count": len(groups), "runner_groups": page}, headers

    @staticmethod
    def _scope_of(params: dict[str, str]) -> str:
        return (params["org"] if "org" in params else f"{params['owner']}/{params['repo']}").lower()

    def _public(self, runner: dict[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in runner.items() if not k.startswith("_")}

    def _h_jit(self, principal, params, query, body, path, base):
        scope = self._scope_of(params)
        body = body if isinstance(body, dict) else {}
        name, labels, group = body.get("name"), body.get("labels"), body.get("runner_group_id")
        if not isinstance(name, str) or not name:
            raise _error(422, "Invalid request.\n\n\"name\" wasn't supplied.")
        if not isinstance(labels, list) or not 1 <= len(labels) <= 100:
            raise _error(422, "Invalid request.\n\n\"labels\" must have between 1 and 100 items.")
        if not isinstance(group, int):
            raise _error(422, "Invalid request.\n\n\"runner_group_id\" wasn't supplied.")
        if "org" in params and group not in {g["id"] for g in self.runner_groups.get(scope, [])}:
            raise _error(404, "Not Found")
        if any(r["_scope"] == scope and r["name"] == name for r in self.runners.values()):
            raise _error(409, f"Already exists - A runner with the name {name} already exists.")
        rid = self.add_runner(scope, name, labels=tuple(labels), group_id=group)
        runner = self._public(self.runners[rid])
        self.runners[rid]["_jit_body"] = body
        encoded = base64.b64encode(json.dumps({
            ".runner": base64.b64encode(json.dumps({"AgentId": rid, "AgentName": name,
                                                    "WorkFolder": body.get("work_folder", "_work")}).encode()).decode(),
            ".credentials": base64.b64encode(b'{"scheme":"OAuth"}').decode(),
            ".credentials_rsaparams": base64.b64encode(secrets.token_bytes(32)).decode(),
        }).encode()).decode()
        return 201, {"runner": runner, "encoded_jit_config": encoded}, {}

    def _h_list_runners(self, principal, params, query, body, path, base):
        scope = self._scope_of(params)
        runners = [self._public(r) for _, r in sorted(self.runners.items()) if r["_scope"] == scope]
        if query.get("name"):
            runners = [r for r in runners if r["name"] == query["name"]]
        page, headers = self._page(runners, query, path, base)
        return 200, {"total_count": len(runners), "runners": page}, headers

    def _h_delete_runner(self, principal, params, query, body, path, base):
        scope, rid = self._scope_of(params), int(params["rid"])
        runner = self.runners.get(rid)
        if runner is None or runner["_scope"] != scope:
            raise _error(404, "Not Found")
        if runner["busy"]:
            raise _error(422, f"Bad request - Runner \"{runner['name']}\" is still running a job\"")
        del self.runners[rid]
        return 204, None, {}

    def _repo_runs(self, params: dict[str, str]) -> list[dict[str, Any]]:
        full = f"{params['owner']}/{params['repo']}".lower()
        return [run for _, run in sorted(self.runs.items(), reverse=True) if run["_repo"].lower() == full]

    def _h_list_runs(self, principal, params, query, body, path, base):
        runs = self._repo_runs(params)
        if query.get("status"):
            runs = [r for r in runs if r["status"] == query["status"] or r["conclusion"] == query["status"]]
        runs = [{k: copy.deepcopy(v) for k, v in r.items() if not k.startswith("_")} for r in runs]
        page, headers = self._page(runs, query, path, base)
        return 200, {"total_count": len(runs), "workflow_runs": page}, headers

    def _h_list_jobs(self, principal, params, query, body, path, base):
        run = self.runs.get(int(params["run"]))
        if run is None or run["_repo"].lower() != f"{params['owner']}/{params['repo']}".lower():
            raise _error(404, "Not Found")
        jobs = [copy.deepcopy(j) for _, j in sorted(self.jobs.items()) if j["run_id"] == run["id"]]
        if query.get("filter", "latest") == "latest":
            jobs = [j for j in jobs if j["run_attempt"] == run["run_attempt"]]
        page, headers = self._page(jobs, query, path, base)
        return 200, {"total_count": len(jobs), "jobs": page}, headers

    def _h_rerun_job(self, principal, params, query, body, path, base):
        full = f"{params['owner']}/{params['repo']}"
        job = self.jobs.get(int(params["job"]))
        if job is None or self.runs[job["run_id"]]["_repo"].lower() != full.lower():
            raise _error(404, "Not Found")
        run = self.runs[job["run_id"]]
        if run["status"] != "completed":
            raise _error(403, "This workflow run is not completed yet and cannot be re-run.")
        self._new_attempt(run, [job])
        self.reruns.append(("job", full, job["id"]))
        return 201, {}, {}

    def _h_rerun_failed(self, principal, params, query, body, path, base):
        full = f"{params['owner']}/{params['repo']}"
        run = self.runs.get(int(params["run"]))
        if run is None or run["_repo"].lower() != full.lower():
            raise _error(404, "Not Found")
        if run["status"] != "completed":
            raise _error(403, "This workflow run is not completed yet and cannot be re-run.")
        failed = [j for j in self.jobs.values() if j["run_id"] == run["id"] and j["run_attempt"] == run["run_attempt"]
                  and j["conclusion"] in ("failure", "cancelled")]
        if not failed:
            raise _error(403, "This workflow run has no failed jobs to re-run.")
        self._new_attempt(run, failed)
        self.reruns.append(("run", full, run["id"]))
        return 201, {}, {}

    def _new_attempt(self, run: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
        run["run_attempt"] += 1
        for old in jobs:
            self.queue_job(run["_repo"], old["labels"], name=old["name"], run_id=run["id"])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # headers and body go out in two writes; Nagle would stall each by ~40ms
    fake: FakeGitHubServer

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            result = self.fake.handle(self.command, self.path, headers, body, self.headers.get("Host", ""))
        except Exception as e:  # a bug in the fake must show up as a 500, not a hang
            result = 500, {"Content-Type": "application/json"}, json.dumps({"message": f"fake error: {e!r}"}).encode()
        if result is None:
            self.close_connection = True
            return
        status, headers_out, payload = result
        self.send_response(status)
        for k, v in headers_out.items():
            self.send_header(k, v)
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if status not in (204, 304) and self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _serve

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass
