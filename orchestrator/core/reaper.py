"""One reconcile pass over the cloud inventory, the store and GitHub.

`plan()` decides a list of actions from one snapshot; `run_once()` applies
them, each on its own, so one failing call never stops the rest. Teardown
always goes: deregister at GitHub (busy -> keep), terminate, then record and
settle spend.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Iterable

from sqlalchemy import bindparam, func, select, text

from orchestrator.config import Config, PoolConfig
from orchestrator.core.budget import Budgets, billed_cost
from orchestrator.core.clock import Clock, as_utc
from orchestrator.core.states import INSTANCE_GONE, INSTANCE_LIVE, InstanceState, JobState
from orchestrator.github.base import DeleteResult, GitHub, GitHubError, RunnerScope
from orchestrator.metrics import LEAKED_VMS, REAPER_ACTIONS, REAPER_PASSES
from orchestrator.providers.base import CloudInstance, Provider, ProviderError, vm_name
from orchestrator.store.models import Event, Instance, Job, PoolState, Reservation
from orchestrator.store.store import Store

log = logging.getLogger(__name__)

LAUNCH_GRACE_S = 120      # a REQUESTED row younger than this may still be mid-launch
LISTING_GRACE_S = 60      # a new VM may be missing from an eventually consistent listing
STUCK_LAUNCHING_S = 300   # a claim older than this belongs to a dead worker
IDLE_CONFIRMATIONS = 2    # passes that must agree a runner is idle before teardown
WAKE_SCALER = frozenset({"requeue-job", "boot-timeout", "never-launched", "vm-gone", "drain", "idle", "max-lifetime", "orphan", "settle"})
RERUN_WINDOW_S = 86400    # failed jobs older than this are not looked at again for spot reruns
_DIGEST_RE = re.compile(r"^[0-9a-f]{10}$")

# A pass runs every interval for the life of the service: its reads are built once, so each
# execution skips statement construction and SQLAlchemy's cache-key work.
_LIVE = [st.value for st in INSTANCE_LIVE]
_LIVE_LOCATIONS = select(Instance.cloud, Instance.location).where(Instance.state.in_(_LIVE)).distinct()
_UNSETTLED = select(Reservation.instance_id).where(Reservation.settled_at.is_(None)).distinct()
_LIVE_INSTANCES = select(Instance).where(Instance.state.in_(_LIVE)).order_by(Instance.created_at, Instance.id)
_GONE_BY_ID = select(Instance).where(
    Instance.id.in_(bindparam("ids", expanding=True)), Instance.state.in_([st.value for st in INSTANCE_GONE])
)
_CLAIMED_JOBS = (
    select(Job).where(Job.state.in_([JobState.LAUNCHING.value, JobState.ASSIGNED.value])).order_by(Job.created_at, Job.id)
)
# Recently failed jobs not yet looked at whose runner was interrupted (or vanished mid-job), with that runner.
_INTERRUPTED_JOBS = (
    select(Job, Instance)
    .join(Instance, Instance.id == Job.runner_name)
    .where(
        Job.state.in_([JobState.COMPLETED.value, JobState.CANCELLED.value]),
        Job.conclusion.in_(["failure", "cancelled"]),
        Job.reason.is_(None),
        Job.completed_at >= bindparam("since"),
        Instance.interrupted.is_(True) | Instance.reason.startswith("vanished-while-busy"),
    )
    .order_by(Job.completed_at, Job.id)
)
_OTHER_LIVE_FOR_JOB = select(func.count()).select_from(Instance).where(
    Instance.job_id == bindparam("job_id"), Instance.id != bindparam("name"), Instance.state.in_(_LIVE)
)
_TOLD_JOB_COMPLETED = select(func.count()).select_from(Event).where(
    Event.instance_id == bindparam("name"), Event.kind == "job-completed"
)


def _distinct_instance_values(column: str):
    """The distinct non-null values of an indexed instances column, by a loose index scan: one
    index probe per value, where SELECT DISTINCT would walk every row the history has kept."""
    return text(
        f"WITH RECURSIVE seen(v) AS (SELECT min({column}) FROM instances"
        f" UNION ALL SELECT (SELECT min({column}) FROM instances WHERE {column} > seen.v) FROM seen WHERE seen.v IS NOT NULL)"
        " SELECT v FROM seen WHERE v IS NOT NULL"
    )


_RUNNER_SCOPES = _distinct_instance_values("runner_scope")
_POOLS_SEEN = _distinct_instance_values("pool")
_PAUSED_POOLS = select(PoolState.name).where(PoolState.paused.is_(True))


@dataclass
class _Snapshot:
    """What one pass reads from the store, in one read transaction."""

    instances: list[Instance]
    unsettled: set[str]
    claimed_jobs: list[Job]
    interrupted_jobs: list[tuple[Job, Instance]]
    runner_scopes: set[str]
    pools_seen: set[str]
    paused: set[str]


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
            # A requeued job, or a VM gone (a max_runners slot and its reservation freed): the scaler looks again now.
            requeued = any(a.kind in WAKE_SCALER for a in actions)
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
        with self.store.reading() as s:
            for cloud, loc in s.connection().execute(_LIVE_LOCATIONS):
                locations.setdefault(cloud, set()).add(loc)
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

    def _snapshot(self, now: datetime) -> _Snapshot:
        """Live instances, plus ended ones whose spend is not settled yet (history stays in the
        database), the jobs the rules look at, and what the ghost and warm rules need."""
        with self.store.reading() as s:
            conn = s.connection()  # plain values need no ORM
            unsettled = set(conn.execute(_UNSETTLED).scalars())
            live = list(s.scalars(_LIVE_INSTANCES))
            gone_ids = sorted(unsettled - {i.id for i in live})
            return _Snapshot(
                instances=live + self._by_ids(s, _GONE_BY_ID, gone_ids),
                unsettled=unsettled,
                claimed_jobs=list(s.scalars(_CLAIMED_JOBS)),
                interrupted_jobs=[(j, i) for j, i in s.execute(_INTERRUPTED_JOBS, {"since": now - timedelta(seconds=RERUN_WINDOW_S)})],
                runner_scopes=set(conn.execute(_RUNNER_SCOPES).scalars()),
                pools_seen=set(conn.execute(_POOLS_SEEN).scalars()),
                paused=set(conn.execute(_PAUSED_POOLS).scalars()),
            )

    @staticmethod
    def _by_ids(s, statement, ids: list[str]) -> list[Instance]:
        out: list[Instance] = []
        for chunk in range(0, len(ids), 500):  # under every driver's bound-parameter limit
            out += s.scalars(statement, {"ids": ids[chunk:chunk + 500]})
        return out

    def plan(self) -> list[Action]:
        now = self.clock.now()
        # The listing comes first: a row is written before its VM is created, so every listed VM has its row below.
        vms, blind = self._inventory()
        snap = self._snapshot(now)
        instances, unsettled = snap.instances, snap.unsettled
        by_name = {i.id: i for i in instances}
        live = [i for i in instances if InstanceState(i.state) in INSTANCE_LIVE]
        warm_reapable = self._warm_reapable(live, now)
        actions: list[Action] = []

        for inst in instances:
            state = InstanceState(inst.state)
            vm = vms.get(inst.id)
            pool = self.config.pool(inst.pool)
            if state in INSTANCE_GONE:
                if vm is not None:
                    actions.append(Action("orphan", inst.id, "record says gone, VM still runs", lambda v=vm: self._orphan(v)))
                elif inst.id in unsettled and inst.cloud not in blind:
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
                # Deregister first: GitHub calling it busy means it runs a job we missed, so it stays.
                actions.append(self._terminate_action("boot-timeout", inst, vm, f"not registered after {int(age)}s", deregister=True, requeue="boot-timeout"))
                continue
            if state == InstanceState.IDLE and pool:
                action = self._idle_action(inst, vm, pool, now, warm_reapable)
                if action:
                    actions.append(action)

        for name, vm in vms.items():
            if name not in by_name:
                actions.append(Action("orphan", name, f"cloud id {vm.instance_id}, no live record", lambda v=vm: self._orphan(v)))

        actions += self._job_actions(now, live, snap)
        actions += self._ghost_actions(live, snap)
        actions += self._warm_actions(live, snap.paused)
        return actions

    def _idle_for(self, inst: Instance, now: datetime) -> float | None:
        since = as_utc(inst.idle_since) or as_utc(inst.bootstrapped_at) or as_utc(inst.launched_at)
        return None if since is None else (now - since).total_seconds()

    def _warm_reapable(self, live: list[Instance], now: datetime) -> set[str]:
        """Warm spares past idle_timeout that may go without taking the pool under min_idle."""
        out: set[str] = set()
        for pool in self.config.pools:
            spare = [i for i in live if i.pool == pool.name and i.warm and i.job_id is None and i.state == InstanceState.IDLE.value]
            excess = len(spare) - pool.min_idle
            if excess <= 0:
                continue
            due = [i for i in spare if (self._idle_for(i, now) or 0) >= pool.idle_timeout]
            # Those already being confirmed go first, so two passes agree on which ones leave.
            due.sort(key=lambda i: (-i.idle_checks, -(self._idle_for(i, now) or 0), i.id))
            out.update(i.id for i in due[:excess])
        return out

    def _idle_action(self, inst: Instance, vm: CloudInstance, pool: PoolConfig, now: datetime, warm_reapable: set[str]) -> Action | None:
        idle_s = self._idle_for(inst, now)
        if idle_s is None or idle_s < pool.idle_timeout:
            return None
        if inst.warm and not inst.job_id and inst.id not in warm_reapable:
            return None  # the warm pool's floor
        if inst.idle_checks + 1 < IDLE_CONFIRMATIONS:
            return Action("idle-check", inst.id, f"idle pass {inst.idle_checks + 1}", lambda i=inst: self._bump_idle(i))
        return self._terminate_action("idle", inst, vm, f"idle {int(idle_s)}s", deregister=True)

    def _job_actions(self, now: datetime, live: list[Instance], snap: _Snapshot) -> list[Action]:
        out: list[Action] = []
        serving: dict[int, int] = {}
        for i in live:
            if i.job_id is not None and i.state != InstanceState.DRAINING.value:
                serving[i.job_id] = serving.get(i.job_id, 0) + 1
        for job in snap.claimed_jobs:
            updated = as_utc(job.updated_at)
            if job.state == JobState.LAUNCHING.value and (now - updated).total_seconds() > STUCK_LAUNCHING_S:
                out.append(Action("requeue-job", str(job.id), "claim abandoned", lambda j=job: self._requeue(j.id, "claim-abandoned", [JobState.LAUNCHING])))
            elif job.state == JobState.ASSIGNED.value:
                pool = self.config.pool(job.pool or "")
                stale = pool is not None and (now - (as_utc(job.launched_at) or updated)).total_seconds() > pool.boot_timeout
                if not serving.get(job.id) and stale:
                    out.append(Action("requeue-job", str(job.id), "no live runner", lambda j=job: self._requeue(j.id, "no-live-runner", [JobState.ASSIGNED])))
        for job, inst in snap.interrupted_jobs:
            pool = self.config.pool(job.pool or "")
            if pool is not None:
                if pool.on_spot_interruption == "rerun":
                    out.append(Action("spot-rerun", str(job.id), f"runner {inst.id} interrupted", lambda j=job: self._rerun(j)))
                else:
                    out.append(Action("spot-fail", str(job.id), "on_spot_interruption: fail", lambda j=job: self._mark_job(j.id, "spot-interrupted")))
        return out

    def _ghost_actions(self, live: list[Instance], snap: _Snapshot) -> list[Action]:
        names = {i.id for i in live}
        heads = self._name_heads(snap.pools_seen | {p.name for p in self.config.pools})
        out: list[Action] = []
        for key in sorted(snap.runner_scopes):
            scope = RunnerScope.parse(key)
            try:
                runners = self.github.list_runners(scope)
            except GitHubError as e:
                log.warning("listing runners failed", extra={"scope": key, "error": str(e)[:200]})
                continue
            for r in runners:
                if r.status == "offline" and r.name not in names and self._ours(r.name, heads):
                    out.append(Action("ghost-runner", r.name, key, lambda s=scope, rid=r.id: self.github.delete_runner(s, rid).value))
        return out

    def _name_heads(self, pools: Iterable[str]) -> set[str]:
        # vm_name() is "<head>-<10 hex>"; the head is fixed per pool.
        return {vm_name(self.orchestrator_id, p, "x")[:-11] for p in pools}

    @staticmethod
    def _ours(name: str, heads: set[str]) -> bool:
        """Named by vm_name() for one of our pools: a prefix match alone would take another orchestrator's runners."""
        head, sep, digest = name.rpartition("-")
        return bool(sep) and head in heads and bool(_DIGEST_RE.match(digest))

    def _warm_actions(self, live: list[Instance], paused: set[str]) -> list[Action]:
        if self.scaler is None:
            return []
        out = []
        for pool in self.config.pools:
            if pool.min_idle <= 0 or pool.name in paused:
                continue
            spare = [
                i for i in live
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
        self.finish_instance(inst.id, kind, requeue=requeue, started=vm.launched_at)
        return None

    def finish_instance(
        self, name: str, reason: str, *, requeue: str | None = None, started: datetime | None = None, vanished: bool = False,
    ) -> None:
        """Record the VM as gone, settle its spend, and give its unstarted job back to the queue.

        `vanished`: it went without our teardown; if it went mid-job, its reason says so (spot reruns read it)."""
        now = self.clock.now()
        with self.store.session() as s:
            inst = s.get(Instance, name)
            if inst is None:
                return
            # A VM that ran without its launch being recorded still cost money from when the cloud started it.
            start = as_utc(inst.launched_at) or as_utc(started)
            end = now
            pool = self.config.pool(inst.pool)
            if vanished and start is not None and pool is not None:
                # It went between two passes, and no pass saw it alive at max_lifetime (it would have
                # been killed): it ended by then, so it is not billed past its reservation.
                end = min(now, start + timedelta(seconds=pool.max_lifetime))
            cost = billed_cost(inst.price_per_hour, start, end, inst.min_billing_s)
            final_reason = inst.reason or reason
            if vanished and self._lost_mid_job(s, inst):
                final_reason = "vanished-while-busy"
            if not self.store.transition_instance(
                s, name, InstanceState.TERMINATED, from_states=list(INSTANCE_LIVE) + [InstanceState.FAILED],
                terminated_at=now, cost_usd=cost, reason=final_reason, jit_config=None,
            ):
                return  # someone else ended it meanwhile, and settled it and its job
            self.budgets.settle(s, name, cost, now)
            job = s.get(Job, inst.job_id) if inst.job_id else None
            if job is not None and job.state in (JobState.LAUNCHING.value, JobState.ASSIGNED.value) and not self._served_elsewhere(s, job.id, name):
                self.store.transition_job(s, job.id, JobState.QUEUED, reason=requeue or reason, queued_at=now, not_before=None)
                self.store.add_event(s, "job-requeued", job_id=job.id, instance_id=name, reason=requeue or reason)

    @staticmethod
    def _served_elsewhere(s, job_id: int, name: str) -> bool:
        """Another live VM already carries this job (it was relaunched): requeueing would launch a duplicate."""
        return bool(s.connection().execute(_OTHER_LIVE_FOR_JOB, {"job_id": job_id, "name": name}).scalar_one())

    def _terminate_vm(self, vm: CloudInstance) -> None:
        self.providers[vm.cloud].terminate(vm.instance_id, vm.location)

    def _orphan(self, vm: CloudInstance) -> None:
        """Terminate a VM no live record owns; if an ended record has its name, spend follows what it cost."""
        self._terminate_vm(vm)
        now = self.clock.now()
        with self.store.session() as s:
            inst = s.get(Instance, vm.name)
            if inst is None:
                return
            cost = billed_cost(inst.price_per_hour, as_utc(inst.launched_at) or as_utc(vm.launched_at), now, inst.min_billing_s)
            if not self.store.transition_instance(
                s, inst.id, InstanceState.TERMINATED, from_states=[InstanceState.FAILED],
                terminated_at=now, cost_usd=cost, instance_id=inst.instance_id or vm.instance_id,
            ) and cost > (inst.cost_usd or 0.0):
                inst.cost_usd = cost
            self.budgets.settle(s, inst.id, cost, now)

    def _adopt(self, inst: Instance, vm: CloudInstance) -> None:
        now = self.clock.now()
        with self.store.session() as s:
            if not self.store.transition_instance(
                s, inst.id, InstanceState.BOOTING, from_states=[InstanceState.REQUESTED],
                instance_id=vm.instance_id, launched_at=vm.launched_at or now,
            ):
                return
            job = s.get(Job, inst.job_id) if inst.job_id else None
            if job is not None and job.state == JobState.LAUNCHING.value:
                self.store.transition_job(s, job.id, JobState.ASSIGNED, launched_at=now, reason=None, not_before=None)
            self.store.add_event(s, "adopted", instance_id=inst.id, job_id=inst.job_id, cloud_id=vm.instance_id)
        if self.scaler is not None:
            self.scaler.attach_jit(inst.id)  # the launch died before asking GitHub for the runner config

    def _never_launched(self, inst: Instance) -> None:
        now = self.clock.now()
        with self.store.session() as s:
            if not self.store.transition_instance(s, inst.id, InstanceState.FAILED, from_states=[InstanceState.REQUESTED], reason="never-launched", terminated_at=now, jit_config=None):
                return
            self.budgets.settle(s, inst.id, 0.0, now)
            job = s.get(Job, inst.job_id) if inst.job_id else None
            if job is not None and job.state in (JobState.LAUNCHING.value, JobState.ASSIGNED.value) and not self._served_elsewhere(s, job.id, inst.id):
                self.store.transition_job(s, job.id, JobState.QUEUED, reason="never-launched", queued_at=now, not_before=None)
        self._deregister_quietly(inst)

    def _vm_gone(self, inst: Instance) -> None:
        self.finish_instance(inst.id, "vanished", vanished=True)
        if inst.busy_since is None:
            # It never took a job, so its registration lingers; an ephemeral runner that ran one is gone already.
            self._deregister_quietly(inst)

    @staticmethod
    def _lost_mid_job(s, inst: Instance) -> bool:
        """The VM went away while it ran a job, rather than powering off after it."""
        if inst.state == InstanceState.BUSY.value:
            return True
        if inst.state != InstanceState.DRAINING.value or inst.busy_since is None or inst.reason != "job-completed":
            return False
        # GitHub's webhook said the job failed, but the VM never said it was done (the runner hook posts
        # job-completed before it powers off): GitHub failed the job because its runner was lost.
        job = s.get(Job, inst.job_id) if inst.job_id else None
        if job is None or job.conclusion != "failure":
            return False  # succeeded, or a person cancelled it
        return not s.connection().execute(_TOLD_JOB_COMPLETED, {"name": inst.id}).scalar_one()

    def _deregister_quietly(self, inst: Instance) -> None:
        """Drop the runner registration of a VM that is gone; the ghost rule retries what fails here."""
        if not (inst.runner_id and inst.runner_scope):
            return
        try:
            self.github.delete_runner(RunnerScope.parse(inst.runner_scope), inst.runner_id)
        except GitHubError as e:
            log.info("deregistering a gone runner failed; the ghost rule retries", extra={"instance": inst.id, "error": str(e)[:200]})

    def _settle_gone(self, inst: Instance) -> None:
        end = as_utc(inst.terminated_at) or self.clock.now()
        cost = billed_cost(inst.price_per_hour, as_utc(inst.launched_at), end, inst.min_billing_s) if inst.launched_at else 0.0
        with self.store.session() as s:
            self.budgets.settle(s, inst.id, cost, self.clock.now())
            row = s.get(Instance, inst.id)
            if row is not None:
                row.cost_usd = cost

    def _bump_idle(self, inst: Instance) -> None:
        self.store.update_instance(inst.id, idle_checks=inst.idle_checks + 1)

    def _requeue(self, job_id: int, reason: str, from_states: list[JobState]) -> None:
        now = self.clock.now()
        with self.store.session() as s:
            self.store.transition_job(s, job_id, JobState.QUEUED, from_states=from_states, reason=reason, queued_at=now, not_before=None)

    def _rerun(self, job: Job) -> str:
        # Marked before asking: the new attempt may be queued and launched before we hear back.
        # The scaler sends a later attempt of a job so marked to the pool's next non-spot candidate.
        self.store.update_job(job.id, on_demand_only=True)
        self.github.rerun_job(job.repository, job.id, installation_id=job.installation_id)
        self.store.update_job(job.id, reason="spot-rerun-requested")
        return "rerun requested"

    def _mark_job(self, job_id: int, reason: str) -> None:
        self.store.update_job(job_id, reason=reason)

    # --- after every pass --------------------------------------------------

    def _after_pass(self) -> None:
        try:
            self.budgets.check_alerts(self.budgets.views())  # views() also refreshes the budget gauges
        except Exception:
            log.exception("budget alert check failed")
