"""The one intake path for workflow_job events, from webhooks and from the backstop poller.

It records and binds; it never calls GitHub or a cloud, so webhook acks stay fast.
Deliveries repeat and arrive out of order: every branch here is idempotent.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from orchestrator.config import Config
from orchestrator.core.routing import route
from orchestrator.core.states import INSTANCE_LIVE, JOB_FINAL, InstanceState, JobState
from orchestrator.store.models import Instance, Job
from orchestrator.store.store import Store

log = logging.getLogger(__name__)

ACTIONS = ("queued", "waiting", "in_progress", "completed")


class NotAJobPayload(ValueError):
    """The body is JSON but not a workflow_job payload."""


@dataclass(frozen=True)
class JobEvent:
    action: str
    job_id: int
    run_id: int
    run_attempt: int
    repository: str
    labels: tuple[str, ...]
    status: str
    conclusion: str | None
    runner_name: str | None
    installation_id: int | None
    private: bool

    @classmethod
    def from_payload(cls, payload: Any) -> "JobEvent":
        if not isinstance(payload, dict):
            raise NotAJobPayload("payload is not a JSON object")
        job = payload.get("workflow_job")
        repo = payload.get("repository")
        action = payload.get("action")
        if not isinstance(job, dict) or not isinstance(repo, dict) or not isinstance(action, str):
            raise NotAJobPayload("missing workflow_job, repository or action")
        job_id = _int(job.get("id"), "workflow_job.id", required=True)
        run_id = _int(job.get("run_id"), "workflow_job.run_id") or 0
        run_attempt = _int(job.get("run_attempt"), "workflow_job.run_attempt", limit=_INT32_MAX) or 1
        full_name = repo.get("full_name")
        if not isinstance(full_name, str) or not _REPO_RE.match(full_name):
            raise NotAJobPayload("repository.full_name must be OWNER/NAME")
        labels = job.get("labels") or []
        if not isinstance(labels, list) or not all(_clean(x, MAX_LABEL) is not None for x in labels):
            raise NotAJobPayload(f"workflow_job.labels must be a list of strings of at most {MAX_LABEL} characters")
        if job_id <= 0:
            raise NotAJobPayload("bad workflow_job id")
        installation = payload.get("installation")
        inst_id = installation.get("id") if isinstance(installation, dict) else None
        try:
            inst = _int(inst_id, "installation.id")
        except NotAJobPayload:
            inst = None  # only used to pick credentials; a bad one is as good as none
        status = _clean(job.get("status"), 32) or action
        return cls(
            # An action GitHub adds later is acknowledged and ignored, not stored verbatim.
            action=action if action in ACTIONS else "unknown",
            job_id=job_id,
            run_id=run_id,
            run_attempt=run_attempt,
            repository=full_name,
            labels=tuple(labels),
            status=status,
            conclusion=_clean(job.get("conclusion"), 32),
            runner_name=_clean(job.get("runner_name"), 200),
            installation_id=inst,
            private=bool(repo.get("private", True)),
        )


# Column sizes (store/models.py): a payload that would not fit is a bad payload, never a 5xx.
_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1
MAX_LABEL = 200
_REPO_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _int(value: Any, name: str, *, required: bool = False, limit: int = _INT64_MAX) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 20:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise NotAJobPayload(f"{name} must be a non-negative integer")
    return value


def _clean(value: Any, max_len: int) -> str | None:
    """A short printable string, or None."""
    if not isinstance(value, str) or not value or len(value) > max_len or _CONTROL_RE.search(value):
        return None
    return value


Item = tuple[JobEvent, "tuple[str, str] | None", str]  # (event, (delivery guid, event name) or None, source)


class Intake:
    def __init__(self, config: Config, store: Store, *, on_queued: Callable[[], None] | None = None):
        self.config = config
        self.store = store
        self.on_queued = on_queued or (lambda: None)

    # --- public ------------------------------------------------------------

    def handle(self, ev: JobEvent, *, delivery: tuple[str, str] | None = None, source: str = "webhook") -> str:
        """Record one event; returns a short result for metrics and logs.

        `delivery` is (guid, event name): deduped in the same transaction as the change.
        """
        result = self.handle_many([(ev, delivery, source)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def handle_many(self, items: list[Item]) -> list[str | Exception]:
        """Record several events in one transaction (group commit); one result per event, in order.

        An event that cannot be recorded gets its exception as its result; the others still land.
        """
        try:
            results: list[str | Exception] = list(self._record(items))
        except Exception as e:
            if len(items) == 1:
                return [e]
            return [self.handle_many([item])[0] for item in items]
        if any(r in ("queued", "requeued") for r in results):
            self.on_queued()
        return results

    def _record(self, items: list[Item]) -> list[str]:
        for attempt in range(5):
            try:
                with self.store.session() as s:
                    return self._apply_batch(s, items)
            except (IntegrityError, OperationalError):
                # Two replicas inserted the same job at once (or a deadlock); the retry sees the winner's row.
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def ignore_reason(self, ev: JobEvent) -> str | None:
        gh = self.config.github
        if not gh.repository_allowed(ev.repository):
            return "repository-not-allowed"
        if not ev.private and not gh.allow_public_repositories:
            return "public-repository"
        return None

    # --- state changes -----------------------------------------------------

    def _apply_batch(self, s: Session, items: list[Item]) -> list[str]:
        """The common case, a delivery about a job not yet known, costs a few statements per batch:
        deliveries in one INSERT, known jobs in one SELECT, new jobs in one executemany.
        Anything else goes through `_apply` one by one, after the pending rows are written."""
        results: list[str] = [""] * len(items)
        todo: list[int] = []
        deliveries: dict[str, tuple[str, str | None]] = {}
        for i, (ev, delivery, _) in enumerate(items):
            if ev.action not in ACTIONS:
                results[i] = "ignored:action"
            else:
                if delivery is not None:
                    deliveries.setdefault(delivery[0], (delivery[1], ev.action))
                todo.append(i)
        fresh = self.store.insert_deliveries(s, deliveries, "accepted") if deliveries else set()
        work: list[int] = []
        for i in todo:
            delivery = items[i][1]
            if delivery is not None:
                if delivery[0] not in fresh:
                    results[i] = "duplicate"
                    continue
                fresh.discard(delivery[0])  # the same id twice in one batch: the second is the repeat
            work.append(i)
        if not work:
            return results
        events = [items[i][0] for i in work]
        known = self.store.existing_job_ids(s, {ev.job_id for ev in events})
        off_spot = self.store.on_demand_runs(s, {ev.run_id for ev in events if ev.job_id not in known})
        pending: list[dict[str, Any]] = []
        for i, ev in zip(work, events):
            source = items[i][2]
            if ev.job_id not in known:
                row, result = self._new_job_row(ev, source, ev.run_id in off_spot)
                if row is None or row["state"] != JobState.IN_PROGRESS.value:
                    results[i] = result
                    if row is not None:
                        pending.append(row)
                        known.add(ev.job_id)
                    continue
            if pending:
                self.store.insert_jobs(s, pending)
                pending = []
            results[i] = self._apply(s, ev, source)
            known.add(ev.job_id)
        if pending:
            self.store.insert_jobs(s, pending)
        return results

    def _new_job_row(self, ev: JobEvent, source: str, on_demand_only: bool) -> tuple[dict[str, Any] | None, str]:
        """The row a first event about a job creates (None: GitHub-hosted traffic), and the result."""
        reason = self.ignore_reason(ev)
        r = route(self.config, list(ev.labels)) if reason is None else None
        if reason is None and r is None:
            reason = "no-matching-pool"
        if reason is not None:
            # Only jobs meant for self-hosted runners are worth a row; the rest is GitHub-hosted traffic.
            if any(label.lower() == "self-hosted" for label in ev.labels):
                return self._job_values(ev, JobState.IGNORED, None, None, reason, source), f"ignored:{reason}"
            return None, f"ignored:{reason}"
        state = self._initial_state(ev)
        row = self._job_values(ev, state, r.pool.name, r.unique_label, None, source)
        # A rerun after a spot interruption comes back as a new job of the same run: keep it off spot.
        row["on_demand_only"] = on_demand_only
        return row, "queued" if state == JobState.QUEUED else state.value

    def _apply(self, s: Session, ev: JobEvent, source: str) -> str:
        job = s.get(Job, ev.job_id)
        if job is None:
            off_spot = ev.run_id in self.store.on_demand_runs(s, {ev.run_id})
            row, result = self._new_job_row(ev, source, off_spot)
            if row is None:
                return result
            s.add(Job(**row))
            s.flush()
            if row["state"] == JobState.IN_PROGRESS.value:
                self._bind_runner(s, ev)
            return result
        if job.state == JobState.IGNORED.value:
            return "ignored:known"
        if ev.run_attempt > job.run_attempt and ev.action in ("queued", "waiting"):
            return self._rerun(s, job, ev)
        if ev.run_attempt < job.run_attempt:
            return "stale"
        return self._advance(s, job, ev)

    def _initial_state(self, ev: JobEvent) -> JobState:
        if ev.action == "completed":
            return JobState.CANCELLED if ev.conclusion == "cancelled" else JobState.COMPLETED
        if ev.action == "in_progress":
            return JobState.IN_PROGRESS
        if ev.action == "waiting" or ev.status == "waiting":
            return JobState.WAITING
        return JobState.QUEUED

    def _job_values(self, ev: JobEvent, state: JobState, pool: str | None, unique: str | None, reason: str | None, source: str) -> dict[str, Any]:
        now = self.store.clock.now()
        return dict(
            id=ev.job_id,
            run_id=ev.run_id,
            run_attempt=ev.run_attempt,
            repository=ev.repository,
            labels=list(ev.labels),
            pool=pool,
            unique_label=unique,
            state=state.value,
            reason=reason,
            conclusion=ev.conclusion if state in (JobState.COMPLETED, JobState.CANCELLED) else None,
            runner_name=ev.runner_name if state == JobState.IN_PROGRESS else None,
            installation_id=ev.installation_id,
            private=ev.private,
            launch_attempts=0,
            source=source,
            created_at=now,
            queued_at=now if state == JobState.QUEUED else None,
            updated_at=now,
            started_at=now if state == JobState.IN_PROGRESS else None,
            completed_at=now if state in (JobState.COMPLETED, JobState.CANCELLED) else None,
            on_demand_only=False,
        )

    def _rerun(self, s: Session, job: Job, ev: JobEvent) -> str:
        state = self._initial_state(ev)
        now = self.store.clock.now()
        self.store.transition_job(
            s, job.id, state,
            from_states=list(JobState),
            run_attempt=ev.run_attempt, reason=None, conclusion=None, runner_name=None,
            launch_attempts=0, not_before=None, queued_at=now if state == JobState.QUEUED else None,
            started_at=None, completed_at=None, launched_at=None,
        )
        return "requeued" if state == JobState.QUEUED else state.value

    def _advance(self, s: Session, job: Job, ev: JobEvent) -> str:
        now = self.store.clock.now()
        if ev.action in ("queued", "waiting"):
            if job.state == JobState.WAITING.value and ev.status == "queued" and ev.action == "queued":
                self.store.transition_job(s, job.id, JobState.QUEUED, from_states=[JobState.WAITING], queued_at=now)
                return "queued"
            return "unchanged"
        if ev.action == "in_progress":
            if job.state in (JobState.IN_PROGRESS.value,) or JobState(job.state) in JOB_FINAL:
                return "unchanged"
            self.store.transition_job(s, job.id, JobState.IN_PROGRESS, runner_name=ev.runner_name, started_at=now, reason=None)
            self._bind_runner(s, ev)
            return "in_progress"
        if ev.action == "completed":
            if JobState(job.state) in JOB_FINAL:
                return "unchanged"
            target = JobState.CANCELLED if ev.conclusion == "cancelled" else JobState.COMPLETED
            self.store.transition_job(
                s, job.id, target, conclusion=ev.conclusion, completed_at=now,
                runner_name=ev.runner_name or job.runner_name, reason=None,
            )
            self._release_runner(s, job, ev)
            return target.value
        return "ignored:action"

    # --- runner binding ----------------------------------------------------

    def _bind_runner(self, s: Session, ev: JobEvent) -> None:
        """GitHub gave this job to `runner_name`; make our records say the same.

        Runners of one pool are interchangeable, so GitHub may hand job B the VM we
        launched for job A. Then A inherits B's VM, or is queued again: no job is lost.
        """
        if not ev.runner_name:
            return
        runner = s.get(Instance, ev.runner_name)
        if runner is None or InstanceState(runner.state) not in INSTANCE_LIVE:
            return
        now = self.store.clock.now()
        previous_job = runner.job_id
        own = self.store.instance_for_job(s, ev.job_id)
        self.store.transition_instance(
            s, runner.id, InstanceState.BUSY,
            from_states=[InstanceState.REQUESTED, InstanceState.BOOTING, InstanceState.IDLE, InstanceState.BUSY],
            job_id=ev.job_id, busy_since=now, idle_checks=0, last_event_at=now,
        )
        if previous_job is None or previous_job == ev.job_id:
            if own is not None and own.id != runner.id and own.state != InstanceState.BUSY.value:
                own.job_id = None  # a spare now; the reaper's idle rule covers it
            return
        prev = s.get(Job, previous_job)
        if prev is None or prev.state not in (JobState.LAUNCHING.value, JobState.ASSIGNED.value):
            if own is not None and own.id != runner.id and own.state != InstanceState.BUSY.value:
                own.job_id = None
            return
        if own is not None and own.id != runner.id and own.state != InstanceState.BUSY.value:
            own.job_id = prev.id
            self.store.add_event(s, "job-swapped", instance_id=own.id, job_id=prev.id, from_job=ev.job_id)
        else:
            self.store.transition_job(s, prev.id, JobState.QUEUED, reason="runner-taken", queued_at=now)
            self.store.add_event(s, "job-requeued", job_id=prev.id, reason="runner-taken")

    def _release_runner(self, s: Session, job: Job, ev: JobEvent) -> None:
        """An ephemeral runner ends with its job: mark its VM for teardown (the VM also powers itself off)."""
        name = ev.runner_name or job.runner_name
        inst = s.get(Instance, name) if name else None
        if inst is None:
            inst = self.store.instance_for_job(s, job.id)
        if inst is None or InstanceState(inst.state) not in INSTANCE_LIVE:
            return
        ran_here = inst.state == InstanceState.BUSY.value or inst.id == name
        if ran_here or inst.labels_unique:
            self.store.transition_instance(
                s, inst.id, InstanceState.DRAINING,
                reason="job-completed" if ran_here else "job-gone", last_event_at=self.store.clock.now(),
            )
        else:
            inst.job_id = None  # launched for a job that ended elsewhere; a spare until idle_timeout
