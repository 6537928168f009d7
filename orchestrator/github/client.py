"""The real GitHub, through PyGithub: App or token auth, JIT runners, runner
cleanup, reruns and the missed-webhook backstop.

Every HTTP exchange passes one choke point (`_send`) wrapped around each
PyGithub Requester: it gates on rate limits, retries 5xx and timeouts on the
injected clock/sleep, answers unchanged GETs from an ETag cache, maps refusals
to our error types and counts calls. PyGithub's own retry and throttling sleep
in real time, so both are switched off.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import requests
from github import Auth, Github, GithubException, GithubIntegration
from github.Requester import Requester

from orchestrator.config import GitHubConfig
from orchestrator.core.clock import Clock
from orchestrator.github.auth import (
    InstallationAuth,
    InstallationToken,
    InstallationTokens,
    is_permission_refusal,
    permission_message,
)
from orchestrator.github.base import (
    DeleteResult,
    GitHubError,
    GitHubPermissionError,
    GitHubRateLimited,
    GitHubRunner,
    GitHubUnavailable,
    MAX_CONCURRENT_REQUESTS,
    JitConfig,
    QueuedJob,
    RunnerScope,
)
from orchestrator.github.ratelimit import (
    GITHUB_CALLS,
    GITHUB_RATE_LIMIT_REMAINING,
    Backoff,
    RateLimitGate,
    endpoint_template,
)

__all__ = ["GitHubClient", "GITHUB_CALLS", "GITHUB_RATE_LIMIT_REMAINING"]

log = logging.getLogger("orchestrator.github")

_TRANSPORT_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
_WILDCARD = set("*?[")
DEFAULT_RUNNER_GROUP_ID = 1
_GROUP_CACHE_S = 3600.0


class _NoSecretsInDebugLog(logging.Filter):
    """PyGithub's debug log prints response bodies; minted tokens and JIT configs must not reach it."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not any(isinstance(a, str) and ("access_tokens" in a or "jitconfig" in a) for a in args)


logging.getLogger("github.Requester").addFilter(_NoSecretsInDebugLog())


@dataclass(frozen=True)
class _Cached:
    etag: str
    headers: dict[str, Any]
    body: str


def _message(body: Any) -> str:
    if isinstance(body, str) and body:
        try:
            data = json.loads(body)
        except ValueError:
            return ""
        if isinstance(data, dict):
            return str(data.get("message") or "")
    return ""


def _next_link(link: str | None) -> str | None:
    if not link:
        return None
    for part in requests.utils.parse_header_links(link):
        if part.get("rel") == "next":
            return part.get("url")
    return None


def _q(s: str) -> str:
    return quote(s, safe="")


class GitHubClient:
    """The `GitHub` protocol against the REST API (github.com or GHES)."""

    attempts = 4                 # per call, for 5xx and timeouts
    timeout_s = 15
    etag_cache_size = 2048
    user_agent = "orchestrator/0.1"
    # in_progress too: a matrix run that started some jobs still has queued ones.
    backstop_run_statuses = ("queued", "waiting", "in_progress")

    def __init__(
        self,
        config: GitHubConfig,
        clock: Clock,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.config = config
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._gate = RateLimitGate(clock)
        self._backoff = Backoff(self._rng)
        self._base_url = config.api_url.rstrip("/")
        self._prefix = urlsplit(self._base_url).path.rstrip("/")
        self._lock = threading.RLock()
        self._in_flight = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        self._etags: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self._installations: dict[str, int] = {}          # owner (lower) -> installation id
        self._groups: dict[tuple[str, str], tuple[int, float]] = {}
        self._clients: dict[int | None, Github] = {}
        self._warned: set[str] = set()
        self._app = config.app_id is not None
        self._integration: GithubIntegration | None = None
        self._tokens: InstallationTokens | None = None
        if self._app:
            try:
                key = Path(str(config.private_key_path)).read_text()
            except OSError as e:
                raise GitHubError(f"cannot read GitHub App private key {config.private_key_path}: {e.strerror or e}") from None
            self._integration = GithubIntegration(auth=Auth.AppAuth(config.app_id, key), **self._pygithub_kwargs())
            self._instrument(self._integration.requester, "app")
            self._tokens = InstallationTokens(clock, self._mint)
        elif config.token is not None:
            gh = Github(auth=Auth.Token(config.token.get_secret_value()), **self._pygithub_kwargs())
            self._instrument(gh.requester, "token")
            self._clients[None] = gh
        else:
            raise GitHubError("GitHubClient needs github.app_id/private_key_path or github.token")

    # --- the protocol ---------------------------------------------------------

    def create_jit_config(
        self, scope: RunnerScope, *, name: str, labels: list[str], installation_id: int | None = None
    ) -> JitConfig:
        inst = self._installation_for(scope.owner, scope.repo, installation_id)
        gh = self._github(inst)
        group_id = self._runner_group_id(gh, scope)
        path = f"{self._scope_path(scope)}/actions/runners/generate-jitconfig"
        for attempt in (0, 1):
            try:
                if scope.repo is None:
                    cfg = gh.get_organization(scope.owner).create_self_hosted_runner_jitconfig(
                        name, group_id, list(labels), work_folder="_work"
                    )
                    return JitConfig(cfg.runner.id, cfg.runner.name, cfg.encoded_jit_config)
                body = {"name": name, "runner_group_id": group_id, "labels": list(labels), "work_folder": "_work"}
                _, data = gh.requester.requestJsonAndCheck("POST", path, input=body)
                return JitConfig(int(data["runner"]["id"]), data["runner"]["name"], data["encoded_jit_config"])
            except GithubException as e:
                # 409: a retried POST already registered this name; drop that stale registration once.
                if e.status == 409 and attempt == 0 and self._drop_stale_runner(scope, name, inst):
                    continue
                raise self._error("POST", path, e) from None
        raise GitHubError(f"POST {path}: runner name {name!r} stays taken")  # pragma: no cover

    def list_runners(self, scope: RunnerScope, *, installation_id: int | None = None) -> list[GitHubRunner]:
        inst = self._installation_for(scope.owner, scope.repo, installation_id)
        gh = self._github(inst)
        try:
            if scope.repo is None:
                runners = gh.get_organization(scope.owner).get_self_hosted_runners()
            else:
                runners = gh.get_repo(f"{scope.owner}/{scope.repo}").get_self_hosted_runners()
            return [
                GitHubRunner(
                    id=r.id,
                    name=r.name,
                    status=r.status,
                    busy=bool(r.busy),
                    labels=tuple(str(lbl.get("name")) for lbl in (r.labels or [])),
                )
                for r in runners
            ]
        except GithubException as e:
            raise self._error("GET", f"{self._scope_path(scope)}/actions/runners", e) from None

    def delete_runner(self, scope: RunnerScope, runner_id: int, *, installation_id: int | None = None) -> DeleteResult:
        inst = self._installation_for(scope.owner, scope.repo, installation_id)
        gh = self._github(inst)
        path = f"{self._scope_path(scope)}/actions/runners/{int(runner_id)}"
        try:
            if scope.repo is None:
                gh.get_organization(scope.owner).delete_self_hosted_runner(int(runner_id))
            else:
                gh.requester.requestJsonAndCheck("DELETE", path)
        except GithubException as e:
            if e.status == 404:
                return DeleteResult.GONE
            if e.status == 422:
                return DeleteResult.BUSY
            raise self._error("DELETE", path, e) from None
        return DeleteResult.DELETED

    def rerun_job(self, repository: str, job_id: int, *, installation_id: int | None = None) -> None:
        self._post_repo(repository, f"actions/jobs/{int(job_id)}/rerun", installation_id)

    def rerun_failed_jobs(self, repository: str, run_id: int, *, installation_id: int | None = None) -> None:
        self._post_repo(repository, f"actions/runs/{int(run_id)}/rerun-failed-jobs", installation_id)

    def list_queued_jobs(self) -> list[QueuedJob]:
        found: dict[int, QueuedJob] = {}
        for full_name, inst in self._backstop_repositories():
            for job in self._queued_jobs_of(full_name, inst):
                found[job.id] = job
        return sorted(found.values(), key=lambda j: j.id)

    # --- helpers beyond the protocol -------------------------------------------

    def rate_limit_remaining(self, installation_id: int | None = None) -> int | None:
        """Last X-RateLimit-Remaining seen for this installation (or the token)."""
        seen = self._gate.remaining(self._bucket(installation_id))
        return seen[0] if seen else None

    def close(self) -> None:
        """Close pooled connections; a later call simply opens new ones."""
        with self._lock:
            for gh in self._clients.values():
                gh.close()
            if self._integration is not None:
                self._integration.close()

    # --- installations and tokens ---------------------------------------------

    def _installation_for(self, owner: str, repo: str | None, installation_id: int | None) -> int | None:
        if not self._app:
            return None
        key = owner.lower()
        if installation_id is not None:
            with self._lock:
                self._installations[key] = int(installation_id)
            return int(installation_id)
        with self._lock:
            known = self._installations.get(key)
        if known is not None:
            return known
        assert self._integration is not None
        lookups: list[tuple[str, Callable[[], Any]]] = [
            (f"/orgs/{owner}/installation", lambda: self._integration.get_org_installation(owner)),
        ]
        if repo:
            lookups.append((f"/repos/{owner}/{repo}/installation",
                            lambda: self._integration.get_repo_installation(owner, repo)))
        lookups.append((f"/users/{owner}/installation", lambda: self._integration.get_user_installation(owner)))
        for path, lookup in lookups:
            try:
                inst_id = int(lookup().id)
            except GithubException as e:
                if e.status == 404:
                    continue
                raise self._error("GET", path, e) from None
            with self._lock:
                self._installations[key] = inst_id
            return inst_id
        raise GitHubError(f"the GitHub App is not installed on {owner!r}")

    def _mint(self, installation_id: int) -> InstallationToken:
        assert self._integration is not None
        path = f"/app/installations/{installation_id}/access_tokens"
        try:
            auth = self._integration.get_access_token(installation_id)
        except GithubException as e:
            if e.status == 404:
                self._forget_installation(installation_id)
                raise GitHubError(f"GitHub App installation {installation_id} not found; is the App still installed?") from None
            raise self._error("POST", path, e) from None
        return InstallationToken(auth.token, auth.expires_at)

    def _forget_installation(self, installation_id: int) -> None:
        with self._lock:
            for owner in [o for o, i in self._installations.items() if i == installation_id]:
                del self._installations[owner]

    def _github(self, installation_id: int | None) -> Github:
        with self._lock:
            gh = self._clients.get(installation_id)
            if gh is None:
                assert self._tokens is not None and installation_id is not None
                gh = Github(auth=InstallationAuth(self._tokens, installation_id), **self._pygithub_kwargs())
                self._instrument(gh.requester, self._bucket(installation_id))
                self._clients[installation_id] = gh
            return gh

    def _bucket(self, installation_id: int | None) -> str:
        return f"installation:{installation_id}" if self._app else "token"

    def _pygithub_kwargs(self) -> dict[str, Any]:
        return dict(
            base_url=self._base_url,
            timeout=self.timeout_s,
            user_agent=self.user_agent,
            per_page=100,
            retry=None,                      # retries are ours, on the injected sleep
            seconds_between_requests=None,   # PyGithub's throttle sleeps in real time
            seconds_between_writes=None,
            lazy=True,                       # no GET /orgs/x before every JIT call
        )

    # --- runner groups, paths, errors -------------------------------------------

    def _runner_group_id(self, gh: Github, scope: RunnerScope) -> int:
        name = self.config.runner_group
        # Runner groups exist only for organizations; repository runners use the default.
        if not name or scope.repo is not None:
            return DEFAULT_RUNNER_GROUP_ID
        key = (scope.owner.lower(), name)
        now = self._clock.time()
        with self._lock:
            cached = self._groups.get(key)
        if cached is not None and now - cached[1] < _GROUP_CACHE_S:
            return cached[0]
        path = f"/orgs/{_q(scope.owner)}/actions/runner-groups"
        try:
            groups = list(self._paginate(gh.requester, path, "runner_groups"))
        except GithubException as e:
            raise self._error("GET", path, e) from None
        match = next((g for g in groups if g.get("name") == name), None) or next(
            (g for g in groups if str(g.get("name", "")).lower() == name.lower()), None
        )
        if match is None:
            raise GitHubError(f"runner group {name!r} not found in organization {scope.owner!r}")
        with self._lock:
            self._groups[key] = (int(match["id"]), now)
        return int(match["id"])

    def _drop_stale_runner(self, scope: RunnerScope, name: str, inst: int | None) -> bool:
        for r in self.list_runners(scope, installation_id=inst):
            if r.name == name and r.status == "offline" and not r.busy:
                log.warning("runner name %s was already registered (an earlier answer was lost); re-registering", name)
                return self.delete_runner(scope, r.id, installation_id=inst) is not DeleteResult.BUSY
        return False

    def _post_repo(self, repository: str, tail: str, installation_id: int | None) -> None:
        owner, _, repo = repository.partition("/")
        if not owner or not repo:
            raise GitHubError(f"not an owner/name repository: {repository!r}")
        inst = self._installation_for(owner, repo, installation_id)
        gh = self._github(inst)
        path = f"/repos/{_q(owner)}/{_q(repo)}/{tail}"
        try:
            gh.requester.requestJsonAndCheck("POST", path)
        except GithubException as e:
            raise self._error("POST", path, e) from None

    @staticmethod
    def _scope_path(scope: RunnerScope) -> str:
        if scope.repo is None:
            return f"/orgs/{_q(scope.owner)}"
        return f"/repos/{_q(scope.owner)}/{_q(scope.repo)}"

    @staticmethod
    def _error(verb: str, path: str, e: GithubException) -> GitHubError:
        msg = e.data.get("message") if isinstance(e.data, dict) else None
        err = GitHubError(f"{verb} {path} failed: {e.status} {msg or ''}".rstrip())
        err.status = e.status  # type: ignore[attr-defined]
        return err

    def _paginate(
        self, requester: Requester, url: str, item_key: str | None, params: dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Raw pages through the requester, following Link rel=next."""
        next_url: str | None = url
        while next_url:
            headers, data = requester.requestJsonAndCheck("GET", next_url, parameters=params)
            items = data if item_key is None else (data or {}).get(item_key) or []
            yield from items
            next_url = _next_link(headers.get("link"))
            params = None  # the next link carries them

    # --- backstop -----------------------------------------------------------------

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(msg, *args)

    def _backstop_repositories(self) -> list[tuple[str, int | None]]:
        out: dict[str, tuple[str, int | None]] = {}
        patterns: list[str] = []
        for pat in self.config.allowed_repositories:
            if _WILDCARD & set(pat):
                patterns.append(pat)
                continue
            owner, _, repo = pat.partition("/")
            if not owner or not repo:
                continue
            try:
                inst = self._installation_for(owner, repo, None)
            except GitHubError as e:
                if isinstance(e, (GitHubRateLimited, GitHubUnavailable, GitHubPermissionError)):
                    raise
                self._warn_once(pat, "backstop skips %s: %s", pat, e)
                continue
            out.setdefault(pat.lower(), (pat, inst))
        if patterns:
            for full_name, inst in self._listed_repositories(patterns):
                if self.config.repository_allowed(full_name):
                    out.setdefault(full_name.lower(), (full_name, inst))
        return list(out.values())

    def _listed_repositories(self, patterns: list[str]) -> Iterator[tuple[str, int | None]]:
        if not self._app:
            gh = self._github(None)
            try:
                for repo in self._paginate(gh.requester, "/user/repos", None, {"per_page": 100}):
                    if not repo.get("archived"):
                        yield repo["full_name"], None
            except GithubException as e:
                raise self._error("GET", "/user/repos", e) from None
            return
        owners = {p.partition("/")[0] for p in patterns}
        installations: list[int] = []
        if any(_WILDCARD & set(o) for o in owners):
            assert self._integration is not None
            try:
                for inst in self._paginate(self._integration.requester, "/app/installations", None, {"per_page": 100}):
                    login = str((inst.get("account") or {}).get("login", ""))
                    with self._lock:
                        self._installations.setdefault(login.lower(), int(inst["id"]))
                    installations.append(int(inst["id"]))
            except GithubException as e:
                raise self._error("GET", "/app/installations", e) from None
        else:
            for owner in sorted(owners):
                try:
                    installations.append(self._installation_for(owner, None, None))  # type: ignore[arg-type]
                except GitHubError as e:
                    if isinstance(e, (GitHubRateLimited, GitHubUnavailable, GitHubPermissionError)):
                        raise
                    self._warn_once(owner, "backstop skips %s/*: %s", owner, e)
        for inst in dict.fromkeys(installations):
            gh = self._github(inst)
            try:
                for repo in self._paginate(gh.requester, "/installation/repositories", "repositories", {"per_page": 100}):
                    if not repo.get("archived"):
                        yield repo["full_name"], inst
            except GithubException as e:
                raise self._error("GET", "/installation/repositories", e) from None

    def _queued_jobs_of(self, full_name: str, inst: int | None) -> list[QueuedJob]:
        # Raw dicts through the requester: PyGithub's lazy list items would fetch each run again.
        gh = self._github(inst)
        owner, _, repo = full_name.partition("/")
        base = f"/repos/{_q(owner)}/{_q(repo)}/actions/runs"
        runs: dict[int, dict[str, Any]] = {}
        try:
            for status in self.backstop_run_statuses:
                for run in self._paginate(gh.requester, base, "workflow_runs", {"status": status, "per_page": 100}):
                    runs[int(run["id"])] = run
            jobs: list[QueuedJob] = []
            for run_id, run in sorted(runs.items()):
                repo_obj = run.get("repository") or {}
                name = repo_obj.get("full_name") or full_name
                for job in self._paginate(gh.requester, f"{base}/{run_id}/jobs", "jobs", {"per_page": 100}):
                    if job.get("status") not in ("queued", "waiting"):
                        continue
                    jobs.append(
                        QueuedJob(
                            id=int(job["id"]),
                            run_id=int(job.get("run_id") or run_id),
                            run_attempt=int(job.get("run_attempt") or run.get("run_attempt") or 1),
                            repository=name,
                            labels=tuple(job.get("labels") or ()),
                            status=job["status"],
                            private=bool(repo_obj.get("private", True)),
                            installation_id=inst,
                            extra={
                                k: v
                                for k, v in (
                                    ("name", job.get("name")),
                                    ("workflow_name", job.get("workflow_name") or run.get("name")),
                                    ("head_branch", job.get("head_branch") or run.get("head_branch")),
                                    ("html_url", job.get("html_url")),
                                    ("created_at", job.get("created_at")),
                                )
                                if v is not None
                            },
                        )
                    )
            return jobs
        except GithubException as e:
            if e.status == 404:
                self._warn_once(full_name, "backstop skips %s: not found or not visible to the App", full_name)
                return []
            raise self._error("GET", base, e) from None

    # --- the choke point ----------------------------------------------------------

    def _instrument(self, requester: Requester, bucket: str) -> None:
        """Route every JSON request of this Requester through `_send`.

        requestJsonAndCheck, PaginatedList and lazy completion all call the
        public requestJson, so wrapping it on the instance catches them all.
        """
        original = requester.requestJson

        def request_json(verb: str, url: str, parameters: Any = None, headers: Any = None, input: Any = None,
                         cnx: Any = None, follow_302_redirect: bool = False) -> tuple[int, dict[str, Any], str]:
            return self._send(bucket, original, verb, url, parameters, headers, input, cnx, follow_302_redirect)

        requester.requestJson = request_json  # type: ignore[method-assign]

    def _path(self, url: str) -> str:
        path = urlsplit(url).path if not url.startswith("/") else url.split("?", 1)[0]
        if not url.startswith("/") and self._prefix and path.startswith(self._prefix + "/"):
            path = path[len(self._prefix):]
        return path

    @staticmethod
    def _cache_key(url: str, parameters: dict[str, Any] | None) -> str:
        if not parameters:
            return url
        return f"{url}{'&' if '?' in url else '?'}{urlencode(sorted((k, str(v)) for k, v in parameters.items()))}"

    def _send(self, bucket: str, original: Callable[..., tuple[int, dict[str, Any], str]], verb: str, url: str,
              parameters: Any, headers: Any, input: Any, cnx: Any, follow: bool) -> tuple[int, dict[str, Any], str]:
        path = self._path(url)
        template = endpoint_template(path)
        key = (bucket, self._cache_key(url, parameters)) if verb == "GET" else None
        may_refresh_token = bucket.startswith("installation:")
        attempt = 0
        while True:
            self._gate.check(bucket, f"{verb} {template}")
            hdrs = dict(headers or {})
            cached = self._cache_get(key)
            if cached is not None:
                hdrs["If-None-Match"] = cached.etag
            retry_after: float | None = None
            try:
                with self._in_flight:
                    status, rh, body = original(verb, url, parameters, hdrs, input, cnx, follow_302_redirect=follow)
            except _TRANSPORT_ERRORS as e:
                GITHUB_CALLS.labels(template, "error").inc()
                failure = type(e).__name__
            else:
                GITHUB_CALLS.labels(template, str(status)).inc()
                self._gate.observe(bucket, rh, track_gauge=bucket != "app")
                if status == 304 and cached is not None:
                    merged = dict(cached.headers)
                    merged.update(rh)
                    with self._lock:
                        self._etags.move_to_end(key)  # type: ignore[arg-type]
                    return 200, merged, cached.body
                if status < 500:
                    self._check_refusal(bucket, verb, template, path, status, rh, body)
                    if status == 401 and may_refresh_token:
                        # A revoked or early-expired installation token: mint once more, then give up.
                        may_refresh_token = False
                        assert self._tokens is not None
                        self._tokens.invalidate(int(bucket.split(":", 1)[1]))
                        continue
                    if status == 401 or (status == 403 and is_permission_refusal(status, rh, _message(body))):
                        msg = permission_message(verb, template, path, status, rh, _message(body),
                                                 app=self._app, jwt=bucket == "app")
                        log.error(msg)
                        raise GitHubPermissionError(msg)
                    if key is not None and status == 200 and rh.get("etag"):
                        self._cache_put(key, _Cached(str(rh["etag"]), dict(rh), body))
                    return status, rh, body
                failure = f"HTTP {status}"
                try:
                    retry_after = float(rh.get("retry-after")) if rh.get("retry-after") else None
                except ValueError:
                    retry_after = None
            attempt += 1
            if attempt >= self.attempts:
                raise GitHubUnavailable(f"GitHub unavailable: {verb} {template} failed {attempt} times (last: {failure})")
            self._sleep(self._backoff.delay(attempt - 1, retry_after))

    def _check_refusal(self, bucket: str, verb: str, template: str, path: str, status: int,
                       rh: dict[str, Any], body: str) -> None:
        if status not in (403, 429):
            return
        until = self._gate.limited(bucket, status, rh, _message(body))
        if until is not None:
            log.warning("GitHub rate limit hit on %s %s (%s); paused until %.0f", verb, template, status, until)
            raise GitHubRateLimited(f"GitHub rate limit hit on {verb} {path} ({status}); retry after {until:.0f}", until)

    def _cache_get(self, key: tuple[str, str] | None) -> _Cached | None:
        if key is None:
            return None
        with self._lock:
            return self._etags.get(key)

    def _cache_put(self, key: tuple[str, str], value: _Cached) -> None:
        with self._lock:
            self._etags[key] = value
            self._etags.move_to_end(key)
            while len(self._etags) > self.etag_cache_size:
                self._etags.popitem(last=False)
