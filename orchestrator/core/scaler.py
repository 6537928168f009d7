"""Queued jobs -> launches along each pool's candidate chain.

Per job: claim (atomic), check max_runners and budgets, record the instance
(REQUESTED) with its reservation, get a JIT config, launch, mark BOOTING.
The record exists before the cloud call, so a crash in between leaves a row the
reaper can match against the VM's tags (adopt) or fail (relaunch).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from sqlalchemy import select

from orchestrator.config import Candidate, Config, PoolConfig
from orchestrator.core.breaker import SpotBreaker
from orchestrator.core.budget import Budgets, reservation_amount
from orchestrator.core.clock import Clock, as_utc
from orchestrator.core.lifecycle import new_token, token_hash
from orchestrator.core.routing import candidates_for_arch, runner_labels
from orchestrator.core.states import INSTANCE_LIVE, InstanceState, JobState
from orchestrator.github.base import GitHub, GitHubError, GitHubRateLimited, RunnerScope
from orchestrator.metrics import BUDGET_BLOCKED, LAUNCHES, WEBHOOK_TO_LAUNCH
from orchestrator.providers.base import (
    AuthError,
    CapacityError,
    LaunchKeyUsedError,
    LaunchSpec,
    Provider,
    ProviderError,
    QuotaError,
    TransientError,
    managed_tags,
    vm_name,
)
from orchestrator.store.models import Instance, Job
from orchestrator.store.store import Store

log = logging.getLogger(__name__)

MAX_LAUNCH_ATTEMPTS = 6          # boot timeouts, preflight failures, reused tokens: then a person looks
RETRY_BASE_S = 15
RETRY_MAX_S = 300


@dataclass
class LaunchOutcome:
    job_id: int
    result: str                  # launched | held:<reason> | skipped
    instance: str | None = None


UserDataFn = Callable[..., str]


def backoff_s(failures: int) -> float:
    return min(RETRY_BASE_S * 2 ** max(failures - 1, 0), RETRY_MAX_S)


def runner_scope(config: Config, repository: str) -> RunnerScope:
    owner, _, repo = repository.partition("/")
    return RunnerScope(owner, repo) if config.github.runner_scope == "repo" else RunnerScope(owner)


class Scaler:
    def __init__(
        self,
        config: Config,
        store: Store,
        providers: dict[str, Provider],
        github: GitHub,
        budgets: Budgets,
        clock: Clock,
        orchestrator_id: str,
        *,
        breaker: SpotBreaker | None = None,
        worker_id: str = "scaler",
        user_data: UserDataFn | None = None,
    ):
        self.config = config
        self.store = store
        self.providers = providers
        self.github = github
        self.budgets = budgets
        self.clock = clock
        self.orchestrator_id = orchestrator_id
        self.breaker = breaker or SpotBreaker(clock)
        self.worker_id = worker_id
        self.user_data = user_data or _render_user_data
        self.concurrency = config.server.launch_concurrency
        self._github_down_until = 0.0  # while GitHub fails, configs are made before launching, so no VM waits on it
        self._wake = threading.Event()
        self._lock = threading.Lock()

    # --- loop --------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def serve_forever(self, stop: threading.Event, interval_s: float = 5.0) -> None:
        """Background worker: runs on every wake-up, and every few seconds for retries."""
        while not stop.is_set():
            self._wake.wait(interval_s)
            self._wake.clear()
            if stop.is_set():
                break
            try:
                self.run_once()
            except Exception:
                log.exception("scaler pass failed")

    def run_once(self, limit: int = 200) -> list[LaunchOutcome]:
        with self._lock:
            with self.store.reading() as s:
                awaiting_jit = self.store.instances_awaiting_jit(s)
                paused = self.store.paused_pools(s)
                launchable = self.store.launchable_jobs(limit, s)
            for name in awaiting_jit:  # runner configs that failed right after their launch
                self.attach_jit(name)
            out = []
            eligible = []
            for job in launchable:
                if job.pool in paused:
                    out.append(self._waits(job, "pool-paused"))
                else:
                    eligible.append(job)
            workers = min(self.concurrency, len(eligible))
            if workers > 1:
                # A burst waits for cloud calls, not CPU: request several VMs at once. Claims, max_runners
                # and budgets stay exact because each is decided in its own locked transaction.
                with ThreadPoolExecutor(workers, thread_name_prefix="launch") as pool:
                    return out + list(pool.map(self.launch_job, eligible))
            return out + self._launch_serially(eligible)

    def _launch_serially(self, jobs: list[Job]) -> list[LaunchOutcome]:
        full: set[str] = set()  # pools found at max_runners in this pass: the rest of their jobs wait
        out = []
        for job in jobs:
            if job.pool in full:
                out.append(self._waits(job, "max_runners"))
                continue
            outcome = self.launch_job(job)
            if outcome.result == "held:max_runners" and job.pool:
                full.add(job.pool)
            out.append(outcome)
        return out

    def _waits(self, job: Job, reason: str) -> LaunchOutcome:
        """Left queued without a launch attempt; the reason is shown (written only when it changes)."""
        if job.reason != reason:
            self.store.update_job(job.id, reason=reason)
        return LaunchOutcome(job.id, f"held:{reason}")

    # --- one job -----------------------------------------------------------

    def launch_job(self, job: Job) -> LaunchOutcome:
        if not self.store.claim_job(job.id, self.worker_id):
            return LaunchOutcome(job.id, "skipped")
        try:
            return self._launch(job)
        except Exception as e:
            log.exception("launch failed unexpectedly", extra={"job": job.id})
            self._hold(job, f"error:{type(e).__name__}", backoff_s(job.launch_attempts + 1))
            return LaunchOutcome(job.id, f"held:error:{type(e).__name__}")

    def _hold(self, job: Job, reason: str, retry_in_s: float | None = None) -> None:
        """Back to queued with a visible reason; never dropped."""
        not_before = self.clock.now() + timedelta(seconds=retry_in_s) if retry_in_s else None
        with self.store.session() as s:
            self.store.transition_job(
                s, job.id, JobState.QUEUED, from_states=[JobState.LAUNCHING], reason=reason, not_before=not_before
            )

    def _launch(self, job: Job) -> LaunchOutcome:
        pool = self.config.pool(job.pool or "")
        if pool is None:
            with self.store.session() as s:
                self.store.transition_job(s, job.id, JobState.IGNORED, from_states=[JobState.LAUNCHING], reason="pool-removed")
            return LaunchOutcome(job.id, "held:pool-removed")
        if job.launch_attempts >= MAX_LAUNCH_ATTEMPTS:
            self._hold(job, f"gave-up:{job.launch_attempts}-launch-attempts", 3600)
            return LaunchOutcome(job.id, "held:gave-up")
        on_demand = job.on_demand_only or self._reruns_interrupted(job)
        candidates = [
            (i, c) for i, c in candidates_for_arch(pool, job.labels) if not (on_demand and c.spot)
        ]
        last_reason = "no-candidate"
        for index, cand in candidates:
            if cand.spot and self.breaker.is_open(cand.key()):
                LAUNCHES.labels(cand.key(), "breaker-open").inc()
                last_reason = "spot-breaker-open"
                continue
            result = self._try_candidate(job, pool, index, cand)
            if result.result == "launched":
                return result
            if result.result.startswith("stop:"):
                return LaunchOutcome(job.id, "held:" + result.result[5:])
            last_reason = result.result
        # A full pool or an exhausted budget frees up without a launch failing: retry on the next pass, no backoff.
        waits = last_reason.startswith("budget:") or last_reason == "max_runners"
        self._hold(job, last_reason, None if waits else backoff_s(job.launch_attempts + 1))
        return LaunchOutcome(job.id, f"held:{last_reason}")

    def _reruns_interrupted(self, job: Job) -> bool:
        """A later attempt of a job whose spot runner was interrupted: GitHub gives a rerun a new job id."""
        if job.run_attempt <= 1 or not job.run_id:
            return False
        with self.store.session() as s:
            earlier = s.scalars(
                select(Job).where(
                    Job.run_id == job.run_id, Job.repository == job.repository, Job.id != job.id,
                    Job.run_attempt < job.run_attempt, Job.on_demand_only.is_(True),
                )
            ).all()
            mine = sorted(label.lower() for label in job.labels)
            if not any(sorted(label.lower() for label in e.labels) == mine for e in earlier):
                return False
            row = s.get(Job, job.id)
            if row is not None:
                row.on_demand_only = True  # visible, and kept for its own later attempts
        return True

    def _try_candidate(self, job: Job, pool: PoolConfig, index: int, cand: Candidate) -> LaunchOutcome:
        provider = self.providers.get(cand.cloud)
        if provider is None:
            return LaunchOutcome(job.id, f"cloud-unavailable:{cand.cloud}")
        try:
            price = provider.price_per_hour(cand)
        except ProviderError as e:
            log.error("no price for candidate", extra={"candidate": cand.key(), "error": str(e)})
            return LaunchOutcome(job.id, "no-price")

        for _ in range(3):  # a reused idempotency token moves to the next attempt
            inst, token, held = self._record(job, pool, index, cand, price, provider)
            if held:
                return LaunchOutcome(job.id, held)
            jit = None
            # Inline: the config travels in user-data. GitHub failing: no VM until it answers again.
            if pool.bootstrap == "inline" or self._github_unhealthy():
                try:
                    jit = self._create_jit(inst)
                except GitHubError as e:
                    self._fail_instance(inst.id, e.reason)
                    self._hold(job, e.reason, self._github_retry_s(e, job))
                    return LaunchOutcome(job.id, "stop:" + e.reason)
            spec = self._spec(pool, cand, inst, token, jit.encoded_jit_config if jit else None, provider)
            try:
                vm = provider.launch(spec)
            except LaunchKeyUsedError:
                self._fail_instance(inst.id, "launch-key-used")
                job = self.store.get_job(job.id) or job
                continue
            except (CapacityError, QuotaError, AuthError) as e:
                kind = {CapacityError: "capacity", QuotaError: "quota", AuthError: "auth"}[type(e)]
                if isinstance(e, AuthError):
                    log.error("cloud credentials rejected", extra={"candidate": cand.key(), "error": str(e)[:300]})
                if cand.spot and isinstance(e, CapacityError):
                    self.breaker.record_failure(cand.key())
                LAUNCHES.labels(cand.key(), kind).inc()
                self._fail_instance(inst.id, f"{kind}:{e.code or ''}".rstrip(":"))
                return LaunchOutcome(job.id, kind)
            except TransientError as e:
                LAUNCHES.labels(cand.key(), "transient").inc()
                # The VM may exist after all (a timeout): keep the reservation; the reaper adopts or settles it.
                self._fail_instance(inst.id, "transient", settle=False)
                self._hold(job, "cloud-throttled", e.retry_after or backoff_s(job.launch_attempts + 1))
                return LaunchOutcome(job.id, "stop:cloud-throttled")
            outcome = self._launched(job, inst, vm, cand)
            if jit is None:
                # Callback mode: the VM needs its config only once booted, so GitHub is asked after the launch
                # (no need to read the row again: it has no runner yet, and its VM cannot have bootstrapped).
                self._try_jit(inst)
            return outcome
        self._hold(job, "launch-key-used", backoff_s(job.launch_attempts + 1))
        return LaunchOutcome(job.id, "stop:launch-key-used")

    def _github_retry_s(self, e: GitHubError, job: Job) -> float:
        if isinstance(e, GitHubRateLimited):
            return max(e.reset_at - self.clock.time(), 1)
        return backoff_s(job.launch_attempts + 1)

    def _github_unhealthy(self) -> bool:
        return self.clock.time() < self._github_down_until

    def _create_jit(self, inst: Instance):
        try:
            jit = self.github.create_jit_config(
                RunnerScope.parse(inst.runner_scope), name=inst.id, labels=inst.labels, installation_id=inst.installation_id
            )
        except GitHubError as e:
            retry = e.reset_at - self.clock.time() if isinstance(e, GitHubRateLimited) else RETRY_BASE_S * 4
            self._github_down_until = self.clock.time() + max(retry, 1)
            raise
        self._github_down_until = 0.0
        pool = self.config.pool(inst.pool)
        keep = pool is not None and pool.bootstrap == "callback"
        self.store.set_runner(inst.id, jit.runner_id, jit.encoded_jit_config if keep else None)
        return jit

    def attach_jit(self, name: str) -> bool:
        """Make the runner config a booted callback VM will fetch; until then its bootstrap answers 503."""
        inst = self.store.get_instance(name)
        if inst is None or inst.runner_id is not None or inst.bootstrap_used or InstanceState(inst.state) not in INSTANCE_LIVE:
            return False
        return self._try_jit(inst)

    def _try_jit(self, inst: Instance) -> bool:
        try:
            self._create_jit(inst)
        except GitHubError as e:
            log.warning("runner config not made yet; retried next pass", extra={"instance": inst.id, "reason": e.reason})
            return False
        return True

    def _record(self, job: Job, pool: PoolConfig, index: int, cand: Candidate, price: float, provider: Provider) -> tuple[Instance | None, str, str | None]:
        """Record the instance and its reservations in one transaction, or say why not.

        Returns (instance, bootstrap token, hold reason); the token lives only in memory and user-data.
        """
        now = self.clock.now()
        with self.store.session() as s:
            fresh = s.get(Job, job.id)
            if fresh is None or fresh.state != JobState.LAUNCHING.value:
                return None, "", "stop:job-changed"
            # The count and the insert under one lock (the budget's), so replicas cannot both take the last slot.
            self.store.xact_lock(s, "budget")
            if self.store.count_live(s, pool.name) >= pool.max_runners:
                return None, "", "max_runners"
            attempt = fresh.launch_attempts + 1
            launch_key = f"{fresh.id}-{fresh.run_attempt}-{attempt}"
            name = vm_name(self.orchestrator_id, pool.name, launch_key)
            amount = reservation_amount(reservation_price(cand, price), pool.max_lifetime, provider.min_billing_seconds)
            blocked = self.budgets.reserve(s, instance_id=name, pool=pool.name, repository=fresh.repository, amount_usd=amount)
            if blocked:
                BUDGET_BLOCKED.labels(blocked).inc()
                return None, "", f"budget:{blocked}"
            fresh.launch_attempts = attempt
            token = new_token()
            inst = Instance(
                id=name, pool=pool.name, cloud=cand.cloud, location=provider.location_of(cand),
                instance_type=cand.instance_type, spot=cand.spot, candidate_index=index, price_per_hour=price,
                min_billing_s=provider.min_billing_seconds, state=InstanceState.REQUESTED.value, job_id=fresh.id,
                launch_key=launch_key, labels=runner_labels(pool, cand, fresh.unique_label),
                runner_scope=runner_scope(self.config, fresh.repository).key, installation_id=fresh.installation_id,
                created_at=now, bootstrap_token_hash=token_hash(token),
                bootstrap_expires_at=now + timedelta(seconds=pool.boot_timeout), cost_usd=0.0,
            )
            s.add(inst)
            self.store.add_event(s, "launch-requested", instance_id=name, job_id=fresh.id, candidate=cand.key(), price=price)
        return inst, token, None

    def launch_warm(self, pool: PoolConfig) -> str:
        """A spare runner for the pool's min_idle floor: no job, org-wide labels, first candidate that works."""
        owner = warm_owner(self.config)
        if owner is None:
            return "skipped: warm runners need runner_scope org and one allowed owner"
        import uuid

        for index, cand in candidates_for_arch(pool, []):
            provider = self.providers.get(cand.cloud)
            if provider is None or (cand.spot and self.breaker.is_open(cand.key())):
                continue
            price = provider.price_per_hour(cand)
            now = self.clock.now()
            launch_key = f"warm-{pool.name}-{uuid.uuid4().hex[:12]}"
            name = vm_name(self.orchestrator_id, pool.name, launch_key)
            token = new_token()
            with self.store.session() as s:
                self.store.xact_lock(s, "budget")
                if self.store.count_live(s, pool.name) >= pool.max_runners:
                    return "skipped: max_runners"
                amount = reservation_amount(reservation_price(cand, price), pool.max_lifetime, provider.min_billing_seconds)
                blocked = self.budgets.reserve(s, instance_id=name, pool=pool.name, repository=f"{owner}/*", amount_usd=amount)
                if blocked:
                    return f"skipped: budget:{blocked}"
                inst = Instance(
                    id=name, pool=pool.name, cloud=cand.cloud, location=provider.location_of(cand),
                    instance_type=cand.instance_type, spot=cand.spot, candidate_index=index, price_per_hour=price,
                    min_billing_s=provider.min_billing_seconds, state=InstanceState.REQUESTED.value, job_id=None,
                    launch_key=launch_key, labels=runner_labels(pool, cand, None), runner_scope=RunnerScope(owner).key,
                    warm=True, created_at=now, bootstrap_token_hash=token_hash(token),
                    bootstrap_expires_at=now + timedelta(seconds=pool.boot_timeout), cost_usd=0.0,
                )
                s.add(inst)
            try:
                jit = self.github.create_jit_config(RunnerScope(owner), name=name, labels=inst.labels)
                self.store.set_runner(name, jit.runner_id, jit.encoded_jit_config)
                vm = provider.launch(self._spec(pool, cand, inst, token, jit.encoded_jit_config, provider))
            except (GitHubError, ProviderError) as e:
                self._fail_instance(name, f"warm:{type(e).__name__}", settle=not isinstance(e, TransientError))
                continue
            with self.store.session() as s:
                self.store.transition_instance(s, name, InstanceState.BOOTING, from_states=[InstanceState.REQUESTED], instance_id=vm.instance_id, launched_at=vm.launched_at or now)
            return f"launched {name}"
        return "skipped: no candidate launched"

    def _spec(self, pool: PoolConfig, cand: Candidate, inst: Instance, token: str, jit: str | None, provider: Provider) -> LaunchSpec:
        user_data = self.user_data(
            instance_name=inst.id,
            cloud=cand.cloud,
            orchestrator_url=self.config.server.public_url,
            bootstrap_mode=pool.bootstrap,
            bootstrap_token=token,
            jit_config=jit if pool.bootstrap == "inline" else None,
            max_lifetime_s=pool.max_lifetime,
            deadline_epoch=int(self.clock.time()) + pool.max_lifetime,
            expected_gpus=provider.expected_gpus(cand),
            runner=pool.runner,
            arch=cand.arch,
        )
        return LaunchSpec(
            name=inst.id,
            launch_key=inst.launch_key,
            candidate=cand,
            pool=pool,
            user_data=user_data,
            tags=managed_tags(self.orchestrator_id, pool.name, inst.id),
            metadata={
                "orchestrator_url": self.config.server.public_url,
                "bootstrap_token": token,
                "instance_name": inst.id,
                "max_lifetime_s": str(pool.max_lifetime),
            },
        )

    def _launched(self, job: Job, inst: Instance, vm, cand: Candidate) -> LaunchOutcome:
        now = self.clock.now()
        with self.store.session() as s:
            self.store.transition_instance(
                s, inst.id, InstanceState.BOOTING, from_states=[InstanceState.REQUESTED],
                instance_id=vm.instance_id, launched_at=vm.launched_at or now,
            )
            self.store.transition_job(s, job.id, JobState.ASSIGNED, from_states=[JobState.LAUNCHING], launched_at=now, reason=None, not_before=None)
            self.store.add_event(s, "launched", instance_id=inst.id, job_id=job.id, cloud_id=vm.instance_id)
        if cand.spot:
            self.breaker.record_success(cand.key())
        LAUNCHES.labels(cand.key(), "launched").inc()
        queued_at = as_utc(job.queued_at) or as_utc(job.created_at)
        if queued_at is not None:
            WEBHOOK_TO_LAUNCH.observe(max((now - queued_at).total_seconds(), 0.0))
        log.info("runner launched", extra={"job": job.id, "instance": inst.id, "candidate": cand.key(), "cloud_id": vm.instance_id})
        return LaunchOutcome(job.id, "launched", inst.id)

    def _fail_instance(self, name: str, reason: str, *, settle: bool = True) -> None:
        """A launch the cloud refused: no VM, so its reservation settles at $0."""
        now = self.clock.now()
        with self.store.session() as s:
            self.store.transition_instance(s, name, InstanceState.FAILED, reason=reason, terminated_at=now, jit_config=None)
            if settle:
                self.budgets.settle(s, name, 0.0, now)


def reservation_price(cand: Candidate, price: float) -> float:
    """A spot bid cap bounds what the VM can ever cost per hour; reserve at it, so a rising spot price stays inside the cap."""
    return max(price, cand.max_price or 0.0) if cand.spot else price


def warm_owner(config: Config) -> str | None:
    if config.github.runner_scope != "org":
        return None
    owners = {p.split("/", 1)[0] for p in config.github.allowed_repositories}
    owners = {o for o in owners if o and not any(ch in o for ch in "*?[")}
    return owners.pop() if len(owners) == 1 else None


def _render_user_data(*, runner, **kwargs) -> str:
    from orchestrator.userdata import UserDataContext, render_user_data

    ctx = UserDataContext(
        runner_version=runner.version,
        runner_sha256=runner.sha256,
        runner_preinstalled_path=runner.preinstalled_path,
        **kwargs,
    )
    return render_user_data(ctx)
