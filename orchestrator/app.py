"""Wiring: one Orchestrator holds the config, store, clock, providers, GitHub,
and the intake, scaler, reaper and backstop built on them; `create_app` puts
the HTTP routers in front."""

from __future__ import annotations

import logging
import random
import threading
import uuid
from typing import Callable

from fastapi import FastAPI

from orchestrator import __version__
from orchestrator.config import Config
from orchestrator.core.breaker import SpotBreaker
from orchestrator.core.budget import Budgets
from orchestrator.core.clock import Clock, SystemClock
from orchestrator.core.intake import Intake, JobEvent
from orchestrator.core.lifecycle import Lifecycle
from orchestrator.core.reaper import Reaper
from orchestrator.core.scaler import Scaler
from orchestrator.core.states import InstanceState
from orchestrator.github.base import DeleteResult, GitHub, GitHubError, RunnerScope
from orchestrator.providers.base import Provider
from orchestrator.store.store import Store

log = logging.getLogger(__name__)


def build_providers(config: Config, orchestrator_id: str, clock: Clock, sandbox_world=None) -> dict[str, Provider]:
    """One provider per configured cloud; SDKs are imported only for clouds in use."""
    used = {c.cloud for p in config.pools for c in p.candidates}
    providers: dict[str, Provider] = {}
    if "sandbox" in used:
        from orchestrator.providers.sandbox import SandboxProvider, SandboxWorld

        world = sandbox_world or SandboxWorld(clock, config.clouds.sandbox)
        providers["sandbox"] = SandboxProvider(world, orchestrator_id)
    if "aws" in used and config.clouds.aws:
        from orchestrator.providers.aws import AwsProvider

        providers["aws"] = AwsProvider(
            config.clouds.aws, orchestrator_id, clock, max_connections=config.server.launch_concurrency + 4,
        )
    if "gcp" in used and config.clouds.gcp:
        from orchestrator.providers.gcp import GcpProvider

        providers["gcp"] = GcpProvider(config.clouds.gcp, orchestrator_id, clock)
    if "azure" in used and config.clouds.azure:
        from orchestrator.providers.azure import AzureProvider

        providers["azure"] = AzureProvider(config.clouds.azure, orchestrator_id, clock)
    return providers


class Orchestrator:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
        github: GitHub | None = None,
        providers: dict[str, Provider] | None = None,
        sandbox_world=None,
        timeline=None,
        worker_id: str | None = None,
    ):
        self.config = config
        self.clock = clock or SystemClock()
        self.store = store or Store(config.database.url, self.clock)
        self.orchestrator_id = self.store.orchestrator_id(config.server.orchestrator_id)
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.webhook_secret = config.github.webhook_secret.get_secret_value().encode()
        self.admin_tokens = [t.get_secret_value().encode() for t in config.server.admin_tokens if t.get_secret_value()]
        self.timeline = timeline
        self.sandbox_world = sandbox_world
        self.github = github or self._build_github()
        self.providers = providers if providers is not None else build_providers(config, self.orchestrator_id, self.clock, self.sandbox_world)
        self.budgets = Budgets(config, self.store, self.clock)
        self.breaker = SpotBreaker(self.clock)
        self.scaler = Scaler(
            config, self.store, self.providers, self.github, self.budgets, self.clock, self.orchestrator_id,
            breaker=self.breaker, worker_id=self.worker_id,
        )
        self.intake = Intake(config, self.store, on_queued=self.scaler.wake)
        self.lifecycle = Lifecycle(self.store, on_change=self.scaler.wake)
        self.reaper = Reaper(
            config, self.store, self.providers, self.github, self.budgets, self.clock, self.orchestrator_id,
            scaler=self.scaler, on_requeue=self.scaler.wake,
        )
        self.guest = None
        if self.sandbox_world is not None and config.github.simulated and self.sandbox_world.guest is None:
            from orchestrator.sim.world import DirectVmApi, Guest

            self.sandbox_world.timeline = self.sandbox_world.timeline or self.timeline
            self.guest = Guest(self.sandbox_world, self.github, DirectVmApi(self.lifecycle))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._scheduler = None

    def _build_github(self) -> GitHub:
        if self.config.github.simulated:
            from orchestrator.github.simulated import SimulatedGitHub
            from orchestrator.sim.timeline import Timeline

            if self.timeline is None:
                self.timeline = Timeline(self.clock)
            if self.sandbox_world is None:
                from orchestrator.providers.sandbox import SandboxWorld

                self.sandbox_world = SandboxWorld(self.clock, self.config.clouds.sandbox, timeline=self.timeline)
            return SimulatedGitHub(self.clock, self.timeline, deliver=self.deliver_direct, rng=random.Random(self.config.clouds.sandbox.seed))
        from orchestrator.github.client import GitHubClient

        return GitHubClient(self.config.github, self.clock)

    # --- intake helpers ------------------------------------------------------

    def deliver_direct(self, event: str, guid: str, payload: dict) -> str:
        """In-process delivery (simulated GitHub): the same intake path as POST /webhook."""
        if event != "workflow_job":
            return "ignored"
        return self.intake.handle(JobEvent.from_payload(payload), delivery=(guid, event))

    def backstop_once(self) -> int:
        """Missed-webhook backstop: queued jobs GitHub knows and we do not enter the intake path."""
        try:
            queued = self.github.list_queued_jobs()
        except GitHubError as e:
            log.warning("backstop listing failed", extra={"error": str(e)[:200]})
            return 0
        added = 0
        for q in queued:
            if self.store.get_job(q.id) is not None:
                continue
            ev = JobEvent(
                action="queued" if q.status == "queued" else "waiting", job_id=q.id, run_id=q.run_id,
                run_attempt=q.run_attempt, repository=q.repository, labels=tuple(q.labels), status=q.status,
                conclusion=None, runner_name=None, installation_id=q.installation_id, private=q.private,
            )
            result = self.intake.handle(ev, source="backstop")
            if result in ("queued", "waiting"):
                added += 1
                log.info("backstop found a job no webhook announced", extra={"job": q.id, "repository": q.repository})
        return added

    # --- admin ---------------------------------------------------------------

    def teardown_runner(self, name: str) -> str:
        """DELETE /api/v1/runners/{id}: deregister at GitHub, then terminate now."""
        inst = self.store.get_instance(name)
        if inst is None:
            raise KeyError(name)
        if InstanceState(inst.state) in (InstanceState.TERMINATED, InstanceState.FAILED):
            return "already-gone"
        if inst.runner_id and inst.runner_scope:
            try:
                if self.github.delete_runner(RunnerScope.parse(inst.runner_scope), inst.runner_id) == DeleteResult.BUSY:
                    log.warning("runner busy at GitHub; terminating anyway on admin request", extra={"instance": name})
            except GitHubError as e:
                log.warning("could not deregister runner; the reaper deletes the ghost later", extra={"instance": name, "error": str(e)[:200]})
        with self.store.session() as s:
            self.store.transition_instance(s, name, InstanceState.DRAINING, reason="admin-delete")
        if inst.instance_id and inst.cloud in self.providers:
            self.providers[inst.cloud].terminate(inst.instance_id, inst.location)
        self.reaper.finish_instance(name, "admin-delete", requeue="runner-deleted-by-admin")
        return "terminated"

    # --- background loops ----------------------------------------------------

    def start_background(self, *, timeline_pump: bool = True) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self._stop.clear()
        t = threading.Thread(target=self.scaler.serve_forever, args=(self._stop,), name="scaler", daemon=True)
        t.start()
        self._threads.append(t)
        if timeline_pump and self.timeline is not None:
            t2 = threading.Thread(target=self._pump_timeline, name="timeline", daemon=True)
            t2.start()
            self._threads.append(t2)
        sched = BackgroundScheduler(timezone="UTC")
        sched.add_job(self._safe(self.reaper.run_once), "interval", seconds=self.config.server.reaper_interval, id="reaper", max_instances=1, coalesce=True)
        sched.add_job(self._safe(self.backstop_once), "interval", seconds=self.config.github.poll_interval, id="backstop", max_instances=1, coalesce=True)
        sched.start()
        self._scheduler = sched
        self.scaler.wake()

    def _pump_timeline(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.timeline.run_due()
            except Exception:
                log.exception("sandbox timeline step failed")

    @staticmethod
    def _safe(fn: Callable) -> Callable:
        def run():
            try:
                fn()
            except Exception:
                log.exception("background job failed", extra={"job": getattr(fn, "__name__", "?")})

        return run

    def stop(self) -> None:
        self._stop.set()
        self.scaler.wake()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()


def create_app(orch: Orchestrator, *, background: bool = False) -> FastAPI:
    from contextlib import asynccontextmanager

    from orchestrator.api import admin, health, vm, webhook

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if background:
            orch.start_background()
        try:
            yield
        finally:
            if background:
                orch.stop()

    app = FastAPI(title="orchestrator", version=__version__, lifespan=lifespan)
    app.state.orch = orch
    app.include_router(webhook.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(vm.router)
    return app
