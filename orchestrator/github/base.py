"""What the rest of the orchestrator needs from GitHub, as one interface.

Two implementations: `github.client.GitHubClient` (the real REST API through
PyGithub) and `github.simulated.SimulatedGitHub` (in-process, for the demo,
the simulator and tests). Nothing outside this package speaks HTTP to GitHub.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

# Requests in flight to GitHub at once, however many launch workers run: GitHub's secondary rate
# limits punish concurrency (100 concurrent requests at most), and a runner config can wait on a
# booting VM, which asks again until it is there.
MAX_CONCURRENT_REQUESTS = 16


@dataclass(frozen=True)
class RunnerScope:
    """Where runners are registered: an org, or one repository."""

    owner: str
    repo: str | None = None      # None = org level

    @property
    def key(self) -> str:
        return f"repo:{self.owner}/{self.repo}" if self.repo else f"org:{self.owner}"

    @classmethod
    def parse(cls, key: str) -> "RunnerScope":
        kind, _, rest = key.partition(":")
        if kind == "repo":
            owner, _, repo = rest.partition("/")
            return cls(owner, repo)
        return cls(rest)


@dataclass(frozen=True)
class JitConfig:
    runner_id: int
    name: str
    encoded_jit_config: str


@dataclass(frozen=True)
class GitHubRunner:
    id: int
    name: str
    status: str                  # online | offline
    busy: bool
    labels: tuple[str, ...] = ()


class DeleteResult(str, enum.Enum):
    DELETED = "deleted"
    GONE = "gone"                # 404: already deregistered
    BUSY = "busy"                # 422: running a job; retry later


@dataclass(frozen=True)
class QueuedJob:
    """A job seen through the API (backstop), in the shape the intake path takes."""

    id: int
    run_id: int
    run_attempt: int
    repository: str              # owner/name
    labels: tuple[str, ...]
    status: str                  # queued | waiting
    private: bool = True
    installation_id: int | None = None
    extra: dict = field(default_factory=dict)


class GitHubError(Exception):
    """A GitHub call failed; the job stays queued and is retried."""

    reason = "github:error"


class GitHubPermissionError(GitHubError):
    """401/403 that is not a rate limit; the message names the missing App permission."""

    reason = "github:permission"


class GitHubRateLimited(GitHubError):
    reason = "github:rate_limited"

    def __init__(self, message: str, reset_at: float):
        super().__init__(message)
        self.reset_at = reset_at  # epoch seconds on the injected clock


class GitHubUnavailable(GitHubError):
    """5xx or timeouts after bounded retries."""

    reason = "github:unavailable"


class GitHub(Protocol):
    def create_jit_config(
        self, scope: RunnerScope, *, name: str, labels: list[str], installation_id: int | None = None
    ) -> JitConfig: ...

    def list_runners(self, scope: RunnerScope, *, installation_id: int | None = None) -> list[GitHubRunner]: ...

    def delete_runner(self, scope: RunnerScope, runner_id: int, *, installation_id: int | None = None) -> DeleteResult: ...

    def rerun_job(self, repository: str, job_id: int, *, installation_id: int | None = None) -> None: ...

    def rerun_failed_jobs(self, repository: str, run_id: int, *, installation_id: int | None = None) -> None: ...

    def list_queued_jobs(self) -> list[QueuedJob]:
        """Missed-webhook backstop: queued/waiting jobs of the allowed (or installed) repositories."""
        ...
