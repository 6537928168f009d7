"""An in-process simulated GitHub: jobs, JIT runners, assignment, and webhooks.

Used only when `github.simulated: true` (demo, simulate, tests). It behaves
like GitHub where it matters to us: a queued job goes to any online runner whose
labels cover it, ephemeral runners leave after one job, webhooks can be lost,
duplicated or delayed, and a lost runner fails its job.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from orchestrator.core.clock import Clock
from orchestrator.github.base import DeleteResult, GitHubError, GitHubRunner, JitConfig, QueuedJob, RunnerScope

Deliver = Callable[[str, str, dict], None]  # (event name, delivery guid, payload)


@dataclass
class SimJob:
    id: int
    run_id: int
    run_attempt: int
    repository: str
    labels: list[str]
    duration_s: float
    private: bool = True
    status: str = "queued"           # waiting | queued | in_progress | completed
    conclusion: str | None = None
    runner_name: str | None = None
    runner_id: int | None = None
    queued_at: float = 0.0
    started_at: float | None = None
    completed_at: float | None = None
    rerun_of: int | None = None


@dataclass
class SimRunner:
    id: int
    name: str
    labels: list[str]
    status: str = "offline"
    busy: bool = False
    job_id: int | None = None
    on_started: Callable[[SimJob], None] | None = None
    on_completed: Callable[[SimJob], None] | None = None
    extra: dict = field(default_factory=dict)


class SimulatedGitHub:
    def __init__(
        self,
        clock: Clock,
        timeline,
        *,
        deliver: Deliver | None = None,
        rng: random.Random | None = None,
        webhook_loss_rate: float = 0.0,
        webhook_dup_rate: float = 0.0,
        webhook_delay_s: float = 0.0,
        installation_id: int = 4242,
    ):
        self.clock = clock
        self.timeline = timeline
        self.deliver = deliver
        self.rng = rng or random.Random(0)
        self.webhook_loss_rate = webhook_loss_rate
        self.webhook_dup_rate = webhook_dup_rate
        self.webhook_delay_s = webhook_delay_s
        self.installation_id = installation_id
        self.jobs: dict[int, SimJob] = {}
        self._unfinished: dict[int, SimJob] = {}  # what the queue scans look through, as jobs pile up over a day
        self.runners: dict[int, SimRunner] = {}
        self.calls: Counter[str] = Counter()
        self.webhooks_lost = 0
        self.webhooks_duplicated = 0
        self._job_ids = itertools.count(1000001)
        self._run_ids = itertools.count(5000001)
        self._runner_ids = itertools.count(1)
        self._lock = threading.RLock()

    # --- the workflow side -------------------------------------------------

    def enqueue_job(self, repository: str, labels: list[str], duration_s: float, *, private: bool = True, waiting: bool = False) -> SimJob:
        with self._lock:
            job = SimJob(
                id=next(self._job_ids), run_id=next(self._run_ids), run_attempt=1, repository=repository,
                labels=list(labels), duration_s=duration_s, private=private,
                status="waiting" if waiting else "queued", queued_at=self.clock.time(),
            )
            self.jobs[job.id] = self._unfinished[job.id] = job
        self._send(job, "waiting" if waiting else "queued")
        if not waiting:
            self._assign_idle_runner(job)
        return job

    def approve(self, job_id: int) -> None:
        """A deployment approval: waiting -> queued."""
        job = self.jobs[job_id]
        if job.status == "waiting":
            job.status = "queued"
            job.queued_at = self.clock.time()
            self._send(job, "queued")
            self._assign_idle_runner(job)

    # --- the GitHub protocol ----------------------------------------------

    def create_jit_config(self, scope: RunnerScope, *, name: str, labels: list[str], installation_id: int | None = None) -> JitConfig:
        self.calls["jit"] += 1
        with self._lock:
            for r in self.runners.values():
                if r.name == name:
                    raise GitHubError(f"runner {name} already exists")  # GitHub answers 409
            runner = SimRunner(id=next(self._runner_ids), name=name, labels=list(labels))
            self.runners[runner.id] = runner
        encoded = base64.b64encode(json.dumps({"runner_id": runner.id, "name": name, "labels": labels}).encode()).decode()
        return JitConfig(runner_id=runner.id, name=name, encoded_jit_config=encoded)

    def list_runners(self, scope: RunnerScope, *, installation_id: int | None = None) -> list[GitHubRunner]:
        self.calls["list_runners"] += 1
        return [GitHubRunner(r.id, r.name, r.status, r.busy, tuple(r.labels)) for r in self.runners.values()]

    def delete_runner(self, scope: RunnerScope, runner_id: int, *, installation_id: int | None = None) -> DeleteResult:
        self.calls["delete_runner"] += 1
        with self._lock:
            r = self.runners.get(runner_id)
            if r is None:
                return DeleteResult.GONE
            if r.busy:
                return DeleteResult.BUSY
            del self.runners[runner_id]
            return DeleteResult.DELETED

    def rerun_job(self, repository: str, job_id: int, *, installation_id: int | None = None) -> None:
        self.calls["rerun"] += 1
        with self._lock:
            old = self.jobs[job_id]
            job = SimJob(
                id=next(self._job_ids), run_id=old.run_id, run_attempt=old.run_attempt + 1, repository=old.repository,
                labels=list(old.labels), duration_s=old.duration_s, private=old.private,
                queued_at=self.clock.time(), rerun_of=old.rerun_of or old.id,
            )
            self.jobs[job.id] = self._unfinished[job.id] = job
        self._send(job, "queued")
        self._assign_idle_runner(job)

    def rerun_failed_jobs(self, repository: str, run_id: int, *, installation_id: int | None = None) -> None:
        for job in [j for j in self.jobs.values() if j.run_id == run_id and j.conclusion in ("failure", "cancelled")]:
            self.rerun_job(repository, job.id)

    def list_queued_jobs(self) -> list[QueuedJob]:
        self.calls["list_queued"] += 1
        return [
            QueuedJob(j.id, j.run_id, j.run_attempt, j.repository, tuple(j.labels), j.status, j.private, self.installation_id)
            for j in self._unfinished.values()
            if j.status in ("queued", "waiting")
        ]

    # --- the runner side (called by the sandbox guest) --------------------

    def runner_online(self, encoded_jit: str, *, on_started: Callable[[SimJob], None], on_completed: Callable[[SimJob], None]) -> SimRunner | None:
        data = json.loads(base64.b64decode(encoded_jit))
        with self._lock:
            runner = self.runners.get(data["runner_id"])
            if runner is None or runner.status == "online":
                return None  # deleted meanwhile, or a JIT config used twice
            runner.status = "online"
            runner.on_started, runner.on_completed = on_started, on_completed
            job = next((j for j in self._queued_fifo() if self._fits(j, runner)), None)
        if job is not None:
            self._start(job, runner)
        return runner

    def runner_lost(self, name: str) -> None:
        """The VM under a runner vanished: GitHub fails the job it was running."""
        with self._lock:
            runner = next((r for r in self.runners.values() if r.name == name), None)
            if runner is None:
                return
            del self.runners[runner.id]
            job = self.jobs.get(runner.job_id) if runner.job_id else None
        if job is not None and job.status == "in_progress":
            self._finish(job, "failure")

    # --- internals ---------------------------------------------------------

    def _queued_fifo(self) -> list[SimJob]:
        return sorted((j for j in self._unfinished.values() if j.status == "queued"), key=lambda j: (j.queued_at, j.id))

    @staticmethod
    def _fits(job: SimJob, runner: SimRunner) -> bool:
        have = {label.lower() for label in runner.labels}
        return all(label.lower() in have for label in job.labels)

    def _assign_idle_runner(self, job: SimJob) -> None:
        with self._lock:
            runner = next((r for r in self.runners.values() if r.status == "online" and not r.busy and self._fits(job, r)), None)
        if runner is not None:
            self._start(job, runner)

    def _start(self, job: SimJob, runner: SimRunner) -> None:
        with self._lock:
            if job.status != "queued" or runner.busy:
                return
            job.status, job.started_at = "in_progress", self.clock.time()
            job.runner_name, job.runner_id = runner.name, runner.id
            runner.busy, runner.job_id = True, job.id
        self._send(job, "in_progress")
        if runner.on_started:
            runner.on_started(job)
        self.timeline.after(job.duration_s, lambda: self._complete_on(runner, job))

    def _complete_on(self, runner: SimRunner, job: SimJob) -> None:
        if job.status != "in_progress" or job.runner_id != runner.id or runner.id not in self.runners:
            return
        self._finish(job, "success")
        with self._lock:
            self.runners.pop(runner.id, None)  # ephemeral: gone after one job
        if runner.on_completed:
            runner.on_completed(job)

    def _finish(self, job: SimJob, conclusion: str) -> None:
        job.status, job.conclusion, job.completed_at = "completed", conclusion, self.clock.time()
        self._unfinished.pop(job.id, None)
        self._send(job, "completed")

    def _send(self, job: SimJob, action: str) -> None:
        if self.deliver is None:
            return
        if self.rng.random() < self.webhook_loss_rate:
            self.webhooks_lost += 1
            return
        payload = self.payload(job, action)
        guid = str(uuid.UUID(int=self.rng.getrandbits(128)))
        copies = 2 if self.rng.random() < self.webhook_dup_rate else 1
        self.webhooks_duplicated += copies - 1
        deliver = self.deliver
        for _ in range(copies):
            if self.webhook_delay_s > 0:
                self.timeline.after(self.webhook_delay_s, lambda: deliver("workflow_job", guid, payload))
            else:
                deliver("workflow_job", guid, payload)

    def payload(self, job: SimJob, action: str) -> dict:
        owner, _, name = job.repository.partition("/")
        return {
            "action": action,
            "workflow_job": {
                "id": job.id,
                "run_id": job.run_id,
                "run_attempt": job.run_attempt,
                "status": job.status if action != "waiting" else "waiting",
                "conclusion": job.conclusion,
                "labels": job.labels,
                "runner_id": job.runner_id,
                "runner_name": job.runner_name,
                "name": f"job-{job.id}",
                "workflow_name": "ci",
                "head_branch": "main",
            },
            "repository": {"full_name": job.repository, "name": name, "private": job.private, "owner": {"login": owner}},
            "installation": {"id": self.installation_id},
        }
