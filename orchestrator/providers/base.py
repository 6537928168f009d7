"""One interface for every cloud: launch, terminate, list what we own, price.

Providers know nothing of jobs or budgets. They tag what they create and never
touch anything whose `orchestrator-id` is not ours.
"""

from __future__ import annotations

import abc
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable

from orchestrator.config import Candidate, PoolConfig

TAG_ID = "orchestrator-id"
TAG_POOL = "orchestrator-pool"
TAG_RUNNER = "orchestrator-runner"

# GCE names: [a-z]([-a-z0-9]*[a-z0-9])?, at most 63; Azure Linux VM names: at most 64.
_MAX_NAME = 63


def vm_name(orchestrator_id: str, pool: str, launch_key: str) -> str:
    """Deterministic VM (and runner) name: the same launch key always names the same VM."""
    digest = hashlib.sha256(launch_key.encode()).hexdigest()[:10]
    head = f"{orchestrator_id}-{pool}"
    head = head[: _MAX_NAME - len(digest) - 1].rstrip("-")
    name = f"{head}-{digest}".lower()
    if not name[0].isalpha():
        name = "r" + name[: _MAX_NAME - 1]
    return re.sub(r"[^a-z0-9-]", "-", name)


def managed_tags(orchestrator_id: str, pool: str, runner: str) -> dict[str, str]:
    return {TAG_ID: orchestrator_id, TAG_POOL: pool, TAG_RUNNER: runner}


@dataclass(frozen=True)
class LaunchSpec:
    name: str                    # VM name == runner name at GitHub
    launch_key: str              # "{job}-{run_attempt}-{launch_attempt}": idempotency token source
    candidate: Candidate
    pool: PoolConfig             # disk_gb, max_lifetime
    user_data: str
    tags: dict[str, str]
    # Read by the sandbox's simulated guest only (real clouds boot from user_data).
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class CloudInstance:
    instance_id: str             # the cloud's id (AWS i-..., GCE name, Azure VM name)
    name: str                    # our VM name (from the orchestrator-runner tag)
    cloud: str
    location: str                # AWS region, GCE zone, Azure location / sandbox region
    instance_type: str
    spot: bool
    state: str                   # pending | running | stopping | terminated
    launched_at: datetime | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def pool(self) -> str | None:
        return self.tags.get(TAG_POOL)


class ProviderError(Exception):
    """Base of every error a provider raises; `code` is the cloud's own error code."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class CapacityError(ProviderError):
    """No capacity for this candidate now: try the next candidate."""


class QuotaError(ProviderError):
    """Account quota exhausted for this candidate: try the next candidate."""


class AuthError(ProviderError):
    """Credentials missing or lacking permission: an operator must act."""


class TransientError(ProviderError):
    """Throttled or a passing fault: retry the same candidate later."""

    def __init__(self, message: str, code: str | None = None, retry_after: float | None = None):
        super().__init__(message, code)
        self.retry_after = retry_after


class LaunchKeyUsedError(ProviderError):
    """The idempotency token was already used by a VM that is now gone: use the next launch attempt."""


class Provider(abc.ABC):
    cloud: str = ""
    min_billing_seconds: int = 60

    @abc.abstractmethod
    def launch(self, spec: LaunchSpec) -> CloudInstance:
        """Create the VM; idempotent on spec.launch_key (a retry returns the same VM)."""

    @abc.abstractmethod
    def terminate(self, instance_id: str, location: str) -> None:
        """Delete the VM; a VM that is already gone is not an error."""

    @abc.abstractmethod
    def list_managed(self, locations: Iterable[str]) -> list[CloudInstance]:
        """Every live VM that carries our orchestrator-id, one list call per location (plus pagination)."""

    @abc.abstractmethod
    def price_per_hour(self, candidate: Candidate) -> float:
        """USD per hour; candidate.price_per_hour overrides any table or API."""

    def expected_gpus(self, candidate: Candidate) -> int:
        """GPUs the preflight must see; 0 skips the GPU check."""
        return candidate.gpu.count if candidate.gpu else 0

    def location_of(self, candidate: Candidate) -> str:
        """Where the candidate launches, in the form list_managed takes."""
        return candidate.region or candidate.zone or candidate.location or ""
