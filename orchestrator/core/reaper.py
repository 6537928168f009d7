"""One reconcile pass over the cloud inventory, the store and GitHub.

`plan()` decides a list of actions from one snapshot; `run_once()` applies
them, each on its own, so one failing call never stops the rest. Teardown
always goes: deregister at GitHub (busy -> keep), terminate, then record and
settle spend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from orchestrator.config import Config, PoolConfig
from orchestrator.core.budget import Budgets, billed_cost
from orchestrator.core.clock import Clock, as_utc
from orchestrator.core.states import INSTANCE_GONE, INSTANCE_LIVE, InstanceState, JobState
from orchestrator.github.base import DeleteResult, GitHub, GitHubError, RunnerScope
from orchestrator.metrics import JOBS, LEAKED_VMS, REAPER_ACTIONS, REAPER_PASSES, RUNNERS
from orchestrator.providers.base import CloudInstance, Provider, ProviderError
from orchestrator.store.models import Instance, Job
from orchestrator.store.store import Store

log = logging.getLogger(__name__)

LAUNCH_GRACE_S = 120      # a REQUESTED row younger than this may still be mid-launch
LISTING_GRACE_S = 60      # a new VM may be missing from an eventually consistent listing
STUCK_LAUNCHING_S = 300   # a claim older than this belongs to a dead worker
IDLE_CONFIRMATIONS = 2    # passes that must agree a runner is idle before teardown


@dataclass
class Action:
    kind: str
    target: str
    detail: str = ""
    apply: Callable[[], str | None] = field(default=lambda: None, repr=False)

    def __str__(self) -> str:
        return f"{self.kind} {self.target}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class PassResult:
    leader: bool
    actions: list[Action]
    errors: list[str]


class Reaper:
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
        scaler=None,
        on_requeue: Callable[[], None] | None = None,
    ):
        self.config = config
        self.store = store
        self.providers = providers
        self.github = github
        self.budgets = budgets
        self.clock = clock
        self.orchestrator_id = orchestrator_id
        self.scaler = scaler
        self.on_requeue = on_requeue or (lambda: None)
        self.interval_s = config.server.reaper_interval

    # --- entry points ------------------------------------------------------

    def run_once(self) -> PassResult:
        with self.store.try_lock("reaper") as leader:
            if not leader:
                REAPER_PASSES.labels("not-leader").inc()
                return PassResult(False, [], [])
            actions = self.plan()
            errors = []
            for action in actions:
                try:
                    outcome = action.apply()
                    if outcome:
                        action.detail = f"{action.detail}; {outcome}" if action.detail else outcome
                    REAPER_ACTIONS.labels(action.kind).inc()
                except Exception as e:  # each action stands alone; the next pass retries
                    errors.append(f"{action}: {type(e).__name__}: {e}")
                    log.warning("reaper action failed", extra={"action": str(action), "error": str(e)[:300]})
            requeued = any(a.kind in ("requeue-job", "boot-timeout", "never-launched") for a in actions)
            self._after_pass()
            REAPER_PASSES.labels("ok" if not errors else "errors").inc()
        if requeued:
            self.on_requeue()
        return PassResult(True, actions, errors)

    # --- planning ----------------------------------------------------------

    def _inventory(self) -> tuple[dict[str, CloudInstance], set[str]]:
        """Every VM we own, by name; and the clouds whose listing failed (absence there proves nothing)."""
        locations: dict[str, set[str]] = {}
        for pool in self.config.pools:
            for cand in pool.candidates:
                provider = self.providers.get(cand.cloud)
                if provider is not None:
                    locations.setdefault(cand.cloud, set()).add(provider.location_of(cand))
        for inst in self.store.live_instances():
            locations.setdefault(inst.cloud, set()).add(inst.location)
        vms: dict[str, CloudInstance] = {}
        blind: set[str] = set()
        for cloud, locs in locations.items():
            provider = self.providers.get(cloud)
            if provider is None:
                blind.add(cloud)
                continue
            try:
                for vm in provider.list_managed(sorted(locs)):
                    if vm.tags.get("orchestrator-id", self.orchestrator_id) != self.orchestrator_id:
                        continue  # belt and braces: a provider must not list these
                    vms[vm.name] = vm
            except ProviderError as e:
                blind.add(cloud)
                log.warning("cloud inventory failed; skipping absence-based rules", extra={"cloud": cloud, "error": str(e)[:300]})
        return vms, blind

    def plan(self) -> list[Action]:
        now = self.clock.now()
        vms, blind = self._inventory()
        instances = self.store.instances()
        by_name = {i.id: i for i in instances}
        actions: list[Action] = []

        for inst in instances:
            state = InstanceState(inst.state)
            vm = vms.get(inst.id)
            pool = self.config.pool(inst.pool)
            if state in INSTANCE_GONE:
                if vm is not None:
                    actions.append(self._terminate_action("orphan", inst, vm, "record says gone, VM still runs"))
                elif self._unsettled(inst) and inst.cloud not in blind:
                    actions.append(Action("settle", inst.id, "no VM left", lambda i=inst: self._settle_gone(i)))
                continue
            launched = as_utc(inst.launched_at) or as_utc(inst.created_at)
            age = (now - launched).total_seconds()
            if state == InstanceState.REQUESTED:
                if vm is not None:
                    actions.append(Action("adopt", inst.id, f"cloud id {vm.instance_id}", lambda i=inst, v=vm: self._adopt(i, v)))
                elif inst.cloud not in blind and (now - as_utc(inst.created_at)).total_seconds() > LAUNCH_GRACE_S:
                    actions.append(Action("never-launched", inst.id, "recorded, no VM", lambda i=inst: self._never_launched(i)))
                continue
            if vm is None:
                # Only a VM never seen running may be missing from a lagging listing.
                seen_running = inst.bootstrapped_at is not None or state != InstanceState.BOOTING
                if inst.cloud not in blind and (seen_running or age > LISTING_GRACE_S):
                    actions.append(Action("vm-gone", inst.id, f"was {state.value}", lambda i=inst: self._vm_gone(i)))
                continue
            lifetime = pool.max_lifetime if pool else 0
            if lifetime:
                # One tick early: the VM is gone by max_lifetime, so it never costs more than its reservation.
                deadline = lifetime - self.interval_s
                if age > lifetime + self.interval_s:
                    LEAKED_VMS.inc()
                    log.error("VM outlived max_lifetime plus one reaper tick", extra={"instance": inst.id, "age_s": int(age)})
                if age >= max(deadline, 0):
                    actions.append(self._terminate_action("max-lifetime", inst, vm, f"age {int(age)}s"))
                    continue
            if state == InstanceState.DRAINING:
                actions.append(self._terminate_action("drain", inst, vm, inst.reason or ""))
                continue
            if state == InstanceState.BOOTING and pool and age > pool.boot_timeout:
                actions.append(self._terminate_action("boot-timeout", inst, vm, f"not registered after {int(age)}s", requeue="boot-timeout"))
                continue
            if state == InstanceState.IDLE and pool:
                action = self._idle_action(inst, vm, pool, now, instances)
                if action:
                    actions.append(action)

        for name, vm in vms.items():
            if name not in by_name:
                actions.append(Action("orphan", name, f"cloud id {vm.instance_id}, no record", lambda v=vm: self._terminate_vm(v)))

        actions += self._job_actions(now, by_name)
        actions += self._ghost_actions(instances)
        actions += self._warm_actions(instances)
        return actions

    def _idle_action(self, inst: Instance, vm: CloudInstance, pool: PoolConfig, now: datetime, instances: list[Instance]) -> Action | None:
        idle_since = as_utc(inst.idle_since) or as_utc(inst.bootstrapped_at) or as_utc(inst.launched_at)
        if idle_since is None or (now - idle_since).total_seconds() < pool.idle_timeout:
            return None
        if inst.warm and not inst.job_id:
            spare = [i for i in instances if i.pool == pool.name and i.warm and i.job_id is None and i.state == InstanceState.IDLE.value]
            if len(spare) <= pool.min_idle:
                return None  # the warm pool's floor
        if inst.idle_checks + 1 < IDLE_CONFIRMATIONS:
            return Action("idle-check", inst.id, f"idle pass {inst.idle_checks + 1}", lambda i=inst: self._bump_idle(i))
        return self._terminate_action("idle", inst, vm, f"idle {int((now - idle_since).total_seconds())}s", deregister=True)

    def _job_actions(self, now: datetime, by_name: dict[str, Instance]) -> list[Action]:
        out: list[Action] = []
        for job in self.store.jobs([JobState.LAUNCHING, JobState.ASSIGNED]):
            updated = as_utc(job.updated_at)
            if job.state == JobState.LAUNCHING.value and (now - updated).total_seconds() > STUCK_LAUNCHING_S:
                out.append(Action("requeue-job", str(job.id), "claim abandoned", lambda j=job: self._requeue(j.id, "claim-abandoned", [JobState.LAUNCHING])))
            elif job.state == JobState.ASSIGNED.value:
                live = [i for i in by_name.values() if i.job_id == job.id and InstanceState(i.state) in INSTANCE_LIVE and i.state != InstanceState.DRAINING.value]
                pool = self.config.pool(job.pool or "")
                stale = pool is not None and (now - (as_utc(job.launched_at) or updated)).total_seconds() > pool.boot_timeout
                if not live and stale:
                    out.append(Action("requeue-job", str(job.id), "no live runner", lambda j=job: self._requeue(j.id, "no-live-runner", [JobState.ASSIGNED])))
        for job in self.store.jobs([JobState.COMPLETED, JobState.CANCELLED]):
            if job.conclusion in ("failure", "cancelled") and job.reason is None and job.runner_name:
                inst = by_name.get(job.runner_name)
                pool = self.config.pool(job.pool or "")
                if inst is not None and pool is not None and self._was_interrupted(inst):
                    if pool.on_spot_interruption == "rerun":
                        out.append(Action("spot-rerun", str(job.id), f"runner {inst.id} interrupted", lambda j=job: self._rerun(j)))
                    else:
                        out.append(Action("spot-fail", str(job.id), "on_spot_interruption: fail", lambda j=job: self._mark_job(j.id, "spot-interrupted")))
        return out

    @staticmethod
    def _was_interrupted(inst: Instance) -> bool:
        return bool(inst.interrupted) or (inst.reason or "").startswith("vanished-while-busy")

    def _ghost_actions(self, instances: list[Instance]) -> list[Action]:
        live = {i.id for i in instances if InstanceState(i.state) in INSTANCE_LIVE}
        scopes = {i.runner_scope for i in instances if i.runner_scope}
        prefix = f"{self.orchestrator_id}-"
        out: list[Action] = []
        for key in sorted(scopes):
            scope = RunnerScope.parse(key)
            try:
                runners = self.github.list_runners(scope)
            except GitHubError as e:
                log.warning("listing runners failed", extra={"scope": key, "error": str(e)[:200]})
                continue
            for r in runners:
                if r.name.startswith(prefix) and r.name not in live and r.status == "offline":
                    out.append(Action("ghost-runner", r.name, key, lambda s=scope, rid=r.id: self.github.delete_runner(s, rid).value))
        return out

    def _warm_actions(self, instances: list[Instance]) -> list[Action]:
        if self.scaler is None:
            return []
        out = []
        paused = self.store.paused_pools()
        for pool in self.config.pools:
            if pool.min_idle <= 0 or pool.name in paused:
                continue
            spare = [
                i for i in instances
                if i.pool == pool.name and i.job_id is None and i.state in (InstanceState.REQUESTED.value, InstanceState.BOOTING.value, InstanceState.IDLE.value)
            ]
            for _ in range(pool.min_idle - len(spare)):
                out.append(Action("warm-launch", pool.name, f"min_idle {pool.min_idle}", lambda p=pool: self.scaler.launch_warm(p)))
        return out

    # --- appliers ----------------------------------------------------------

    def _terminate_action(self, kind: str, inst: Instance, vm: CloudInstance, detail: str, *, deregister: bool = False, requeue: str | None = None) -> Action:
        return Action(kind, inst.id, detail, lambda: self._teardown(inst, vm, kind, deregister=deregister, requeue=requeue))

    def _teardown(self, inst: Instance, vm: CloudInstance, kind: str, *, deregister: bool, requeue: str | None) -> str | None:
        if deregister and inst.runner_id and inst.runner_scope:
            result = self.github.delete_runner(RunnerScope.parse(inst.runner_scope), inst.runner_id)
            if result == DeleteResult.BUSY:
                # GitHub says it is running a job after all: keep it, and start counting again.
                self.store.update_instance(inst.id, idle_checks=0, state=InstanceState.BUSY.value, busy_since=self.clock.now())
                return "runner busy at GitHub; kept"
        with self.store.session() as s:
            self.store.transition_instance(s, inst.id, InstanceState.DRAINING, reason=inst.reason or kind)
        self.providers[inst.cloud].terminate(vm.instance_id, vm.location)
        self._finish(inst.id, kind, requeue=requeue)
        return None

    def _finish(self, name: str, reason: str, *, requeue: str | None = None, busy_lost: bool = False) -> None:
        """Record the VM as gone, settle its spend, and give its unstarted job back to the queue."""
        now = self.clock.now()
        with self.store.session() as s:
            inst = s.get(Instance, name)
            if inst is None:
                return
            cost = billed_cost(inst.price_per_hour, as_utc(inst.launched_at), now, inst.min_billing_s)
            final_reason = inst.reason or reason
            if busy_lost:
                final_reason = "vanished-while-busy"
            self.store.transition_instance(
                s, name, InstanceState.TERMINATED, from_states=list(INSTANCE_LIVE) + [InstanceState.FAILED],
                terminated_at=now, cost_usd=cost, reason=final_reason, jit_config=None,
            )
            self.budgets.settle(s, name, cost, now)
            job = s.get(Job, inst.job_id) if inst.job_id else None
            if job is not None and job.state in (JobState.LAUNCHING.value, JobState.ASSIGNED.value):
                self.store.transition_job(s, job.id, JobState.QUEUED, reason=requeue or reason, queued_at=now, not_before=None)
                self.store.add_event(s, "job-requeued", job_id=job.id, instance_id=name, reason=requeue or reason)

    def _terminate_vm(self, vm: CloudInstance) -> None:
        self.providers[vm.cloud].terminate(vm.instance_id, vm.location)

    def _adopt(self, inst: Instance, vm: CloudInstance) -> None:
        now = self.clock.now()
        with self.store.session() as s:
            self.store.transition_instance(
                s, inst.id, InstanceState.BOOTING, from_states=[InstanceState.REQUESTED],
                instance_id=vm.instance_id, launched_at=vm.launched_at or now,
            )
            job = s.get(Job, inst.job_id) if inst.job_id else None
            if job is not None and job.state == JobState.LAUNCHING.value:
                self.store.transition_job(s, job.id, JobState.ASSIGNED, launched_at=now, reason=None)
            self.store.add_event(s, "adopted", instance_id=inst.id, job_id=inst.job_id, cloud_id=vm.instance_id)

    def _never_launched(self, inst: Instance) -> None:
        now = self.clock.now()
        with self.store.session() as s:
            if not self.store.transition_instance(s, inst.id, InstanceState.FAILED, from_states=[InstanceState.REQUESTED], reason="never-launched", terminated_at=now, jit_config=None):
                return
            self.budgets.settle(s, inst.id, 0.0, now)
            job = s.get(Job, inst.job_id) if inst.job_id else None
            if job is not None and job.state in (JobState.LAUNCHING.value, JobState.ASSIGNED.value):
                self.store.transition_job(s, job.id, JobState.QUEUED, reason="never-launched", queued_at=now)

    def _vm_gone(self, inst: Instance) -> None:
        self._finish(inst.id, "vanished", busy_lost=inst.state == InstanceState.BUSY.value)

    def _settle_gone(self, inst: Instance) -> None:
        end = as_utc(inst.terminated_at) or self.clock.now()
        cost = billed_cost(inst.price_per_hour, as_utc(inst.launched_at), end, inst.min_billing_s) if inst.launched_at else 0.0
        with self.store.session() as s:
            self.budgets.settle(s, inst.id, cost, self.clock.now())
            row = s.get(Instance, inst.id)
            if row is not None:
                row.cost_usd = cost

    def _unsettled(self, inst: Instance) -> bool:
        from orchestrator.store.models import Reservation

        with self.store.session() as s:
            return s.query(Reservation).filter(Reservation.instance_id == inst.id, Reservation.settled_at.is_(None)).count() > 0

    def _bump_idle(self, inst: Instance) -> None:
        self.store.update_instance(inst.id, idle_checks=inst.idle_checks + 1)

    def _requeue(self, job_id: int, reason: str, from_states: list[JobState]) -> None:
        now = self.clock.now()
        with self.store.session() as s:
            self.store.transition_job(s, job_id, JobState.QUEUED, from_states=from_states, reason=reason, queued_at=now, not_before=None)

    def _rerun(self, job: Job) -> str:
        self.github.rerun_job(job.repository, job.id, installation_id=job.installation_id)
        # The rerun comes back as a new attempt; on_demand_only sends it to the next non-spot candidate.
        self.store.update_job(job.id, reason="spot-rerun-requested", on_demand_only=True)
        return "rerun requested"

    def _mark_job(self, job_id: int, reason: str) -> None:
        self.store.update_job(job_id, reason=reason)

    # --- after every pass --------------------------------------------------

    def _after_pass(self) -> None:
        self.budgets.views()  # refreshes the budget gauges
        try:
            self.budgets.check_alerts()
        except Exception:
            log.exception("budget alert check failed")
        refresh_gauges(self.store)


def refresh_gauges(store: Store) -> None:
    counts: dict[tuple[str, str], int] = {}
    for inst in store.instances():
        counts[(inst.state, inst.pool)] = counts.get((inst.state, inst.pool), 0) + 1
    RUNNERS.clear()
    for (state, pool), n in counts.items():
        RUNNERS.labels(state, pool).set(n)
    by_state = store.count_jobs_by_state()
    for state in JobState:
        JOBS.labels(state.value).set(by_state.get(state.value, 0))
