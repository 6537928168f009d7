"""What a VM may say to us: the one-time bootstrap, and its lifecycle events.

Tokens are stored only as SHA-256 hashes; a bootstrap token works once and
expires at the pool's boot_timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from orchestrator.core.clock import as_utc
from orchestrator.core.states import INSTANCE_LIVE, InstanceState, JobState
from orchestrator.store.models import Instance, Job
from orchestrator.store.store import Store

log = logging.getLogger(__name__)

VM_EVENTS = ("job-started", "job-completed", "spot-interruption", "preflight-failed")
# Locked, so two bootstraps racing with one token cannot both be served (Postgres; SQLite serializes writers).
_BY_BOOTSTRAP_TOKEN = select(Instance).where(Instance.bootstrap_token_hash == bindparam("digest")).with_for_update()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_RESERVED_DETAIL = {"s", "kind", "instance_id", "job_id"}


def _event_detail(detail: dict) -> dict[str, str]:
    """What a VM sent, bounded; its own keys never collide with the event's columns (a VM says job_id too)."""
    out: dict[str, str] = {}
    for k, v in list(detail.items())[:20]:
        key = str(k)[:64]
        out[f"vm_{key}" if key in _RESERVED_DETAIL else key] = str(v)[:200]
    return out


class Unauthorized(Exception):
    """Unknown, replayed or expired token. The message never contains the token."""


class UnknownEvent(ValueError):
    pass


class NotReady(Exception):
    """The VM booted before its JIT config was made (callback mode makes it after the launch): retry shortly."""


@dataclass(frozen=True)
class BootstrapResult:
    instance_id: str
    runner_name: str
    jit_config: str
    instance_token: str


class Lifecycle:
    def __init__(self, store: Store, *, on_change: Callable[[], None] | None = None):
        self.store = store
        self.clock = store.clock
        self.on_change = on_change or (lambda: None)

    def bootstrap(self, token: str) -> BootstrapResult:
        """Trade the one-time bootstrap token for the JIT config, exactly once."""
        if not token:
            raise Unauthorized("missing bootstrap token")
        digest = token_hash(token)
        now = self.clock.now()
        instance_token = new_token()
        with self.store.session() as s:
            inst = s.scalars(_BY_BOOTSTRAP_TOKEN, {"digest": digest}).first()
            if inst is None:
                raise Unauthorized("unknown bootstrap token")
            if inst.bootstrap_used:
                log.warning("bootstrap token replayed", extra={"instance": inst.id})
                raise Unauthorized("bootstrap token already used")
            if as_utc(inst.bootstrap_expires_at) is None or as_utc(inst.bootstrap_expires_at) <= now:
                log.warning("bootstrap token expired", extra={"instance": inst.id})
                raise Unauthorized("bootstrap token expired")
            if InstanceState(inst.state) not in INSTANCE_LIVE:
                raise Unauthorized("instance is not expecting a bootstrap")
            if not inst.jit_config:
                raise NotReady("runner config not ready yet")
            jit = inst.jit_config
            inst.bootstrap_used = True
            inst.jit_config = None  # served once; nothing usable stays behind
            inst.instance_token_hash = token_hash(instance_token)
            inst.bootstrapped_at = now
            inst.last_event_at = now
            if inst.state in (InstanceState.REQUESTED.value, InstanceState.BOOTING.value):
                inst.state = InstanceState.IDLE.value
                inst.idle_since = now
            self.store.add_event(s, "bootstrapped", instance_id=inst.id, job_id=inst.job_id)
            name = inst.id
        return BootstrapResult(instance_id=name, runner_name=name, jit_config=jit, instance_token=instance_token)

    def authenticate(self, instance_id: str, token: str, s: Session | None = None) -> Instance:
        """The instance's own token, or its still-unused bootstrap token (a VM failing preflight has no other).

        Given the caller's session, the row is read in it (and stays attached to it)."""
        if not token:
            raise Unauthorized("missing instance token")
        inst = s.get(Instance, instance_id) if s is not None else self.store.get_instance(instance_id)
        if inst is None:
            raise Unauthorized("unknown instance")
        digest = token_hash(token)
        if inst.instance_token_hash and hmac.compare_digest(inst.instance_token_hash, digest):
            return inst
        expires = as_utc(inst.bootstrap_expires_at)
        if (
            inst.bootstrap_token_hash
            and hmac.compare_digest(inst.bootstrap_token_hash, digest)
            and (not inst.bootstrap_used or inst.instance_token_hash is None)
            and expires is not None
            and expires > self.clock.now()
        ):
            return inst
        raise Unauthorized("bad instance token")

    def event(self, instance_id: str, token: str, kind: str, detail: dict | None = None) -> str:
        if kind not in VM_EVENTS:
            raise UnknownEvent(f"unknown event {kind!r}; expected one of {', '.join(VM_EVENTS)}")
        with self.store.session() as s:  # one transaction: the token check and the change
            inst = self.authenticate(instance_id, token, s)
            result, requeued = self._apply_event(s, inst, kind, detail or {})
        if requeued:
            self.on_change()
        return result

    def apply_event(self, name: str, kind: str, detail: dict) -> str:
        with self.store.session() as s:
            inst = s.get(Instance, name)
            if inst is None:
                return "unknown-instance"
            result, requeued = self._apply_event(s, inst, kind, detail)
        if requeued:
            self.on_change()
        return result

    def _apply_event(self, s: Session, inst: Instance, kind: str, detail: dict) -> tuple[str, bool]:
        """The change one VM event makes; and whether it gave a job back to the queue."""
        now = self.clock.now()
        name = inst.id
        self.store.add_event(s, kind, instance_id=name, job_id=inst.job_id, **_event_detail(detail))
        if kind == "job-started":
            if not self.store.transition_instance(
                s, name, InstanceState.BUSY,
                from_states=[InstanceState.REQUESTED, InstanceState.BOOTING, InstanceState.IDLE, InstanceState.BUSY],
                busy_since=now, idle_checks=0, last_event_at=now,
            ):
                inst.last_event_at = now
            return "busy", False
        if kind == "job-completed":
            # Ephemeral: one job, then the VM powers off. Draining makes the reaper confirm teardown.
            if not self.store.transition_instance(s, name, InstanceState.DRAINING, reason="job-completed", last_event_at=now):
                inst.last_event_at = now
            return "draining", False
        inst.last_event_at = now
        if kind == "spot-interruption":
            inst.interrupted = True
            return "interrupted", False
        if kind == "preflight-failed":
            reason = "preflight-failed: " + str(detail.get("reason", ""))[:150]
            self.store.transition_instance(s, name, InstanceState.DRAINING, reason=reason.strip())
            job = s.get(Job, inst.job_id) if inst.job_id else None
            if job is not None and job.state in (JobState.LAUNCHING.value, JobState.ASSIGNED.value):
                self.store.transition_job(s, job.id, JobState.QUEUED, reason="preflight-failed", queued_at=now)
                return "ok", True
        return "ok", False
