"""Other tools' scaling policies, replayed on the same trace and world model.

These are small dedicated models of other tools, not their code:

- `cml`: CML-style reusable runners: a runner is launched when a job finds no
  idle or booting runner, takes job after job, and leaves after 5 minutes idle;
  no max lifetime. On demand, as `cml runner launch` requests unless given
  `--cloud-spot`: the pool's on-demand candidates (or its instance types on demand).
- `cml-spot`: the same policy on the pool's own candidate chain (spot first), so
  the scaling policy alone is compared.
- `tf-aws`: terraform-aws-github-runner-style: each `queued` webhook reaches the
  scale-up function 30 s later, which launches a runner if the job is still
  queued; runners take job after job; scale-down every 5 minutes removes idle
  runners that have run at least 5 minutes. Lost webhooks mean no scale-up.
- `ideal`: the physical limit: a VM of the cheapest candidate launched the instant
  a job is queued, the job starts the instant it boots, the VM ends with the job.
  No capacity errors, no interruptions, no minimum beyond the cloud's billing.

The world model is the sandbox's: boot time and jitter (per instance type where
set), capacity errors at the configured rate, per-second billing with the
minimum, spot interruptions as a constant hazard (`spot_interruption_rate` is the
chance within an hour of running). Interrupted jobs are re-queued at once (as our spot rerun does), so the
policies are compared on the same work. Each draws from its own stream seeded
with the run's seed. GitHub and cloud call counts are modelled per policy.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Callable

from orchestrator.config import Candidate, Config, PoolConfig
from orchestrator.core.routing import route
from orchestrator.providers.sandbox import boot_profile, sandbox_price
from orchestrator.sim.report import JobRecord, VmRecord, figures
from orchestrator.sim.trace import SimOptions, TraceJob
from orchestrator.sim.world import interruption_delay

CML_IDLE_TIMEOUT_S = 300
TF_WEBHOOK_DELAY_S = 30
TF_SCALE_DOWN_EVERY_S = 300
TF_MIN_RUNNING_S = 300
CAPACITY_RETRY_S = 30


class WorldModel:
    def __init__(self, config: Config, options: SimOptions, rng: random.Random):
        from orchestrator.sim.simulate import boot_overrides

        self.sandbox = config.clouds.sandbox
        self.rng = rng
        self.boot_times = boot_overrides(options, self.sandbox)

    def boot_s(self, cand: Candidate) -> float:
        mean, jitter = boot_profile(cand, self.sandbox, self.boot_times)
        return max(mean + self.rng.uniform(-1, 1) * jitter, 1.0)

    def capacity_error(self, cand: Candidate) -> bool:
        return cand.spot and self.rng.random() < self.sandbox.capacity_error_rate

    def interruption_after_boot(self, cand: Candidate) -> float | None:
        if not cand.spot:
            return None
        return interruption_delay(self.rng, self.sandbox.spot_interruption_rate)


def on_demand_of(config: Config, cand: Candidate) -> float:
    for pool in config.pools:
        for c in pool.candidates:
            if c.instance_type == cand.instance_type and not c.spot:
                return sandbox_price(c)
    return sandbox_price(cand.model_copy(update={"spot": False, "price_per_hour": None}))


# --- a small event engine ------------------------------------------------------------


class Engine:
    def __init__(self, start: float = 0.0):
        self.now = start
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn))

    def run(self, until: float) -> None:
        while self._heap and self._heap[0][0] <= until:
            t, _, fn = heapq.heappop(self._heap)
            self.now = t
            fn()


@dataclass
class BJob:
    index: int                       # trace job it belongs to
    pool: PoolConfig
    duration_s: float
    queued_at: float
    repo: str
    attempt: int = 1
    started_at: float | None = None
    done: bool = False
    runner: "Runner | None" = None


@dataclass
class Runner:
    id: int
    pool: PoolConfig
    cand: Candidate
    price: float
    launched_at: float
    booted_at: float | None = None
    ended_at: float | None = None
    state: str = "booting"           # booting | idle | busy | gone
    job: BJob | None = None
    idle_since: float | None = None
    busy_s: float = 0.0
    repo: str | None = None
    interrupted: bool = False
    for_job: tuple[int, int] | None = None   # the job attempt that caused the launch
    ran_jobs: list = field(default_factory=list)


class RunnerPolicy:
    """Reusable (non-ephemeral) runners assigned FIFO per pool, as GitHub does."""

    name = "runners"

    def __init__(self, config: Config, trace: list[TraceJob], options: SimOptions):
        self.config = config
        self.trace = trace
        self.options = options
        self.world = WorldModel(config, options, random.Random(config.clouds.sandbox.seed * 31 + 7))
        self.hooks_rng = random.Random(config.clouds.sandbox.seed * 53 + 11)
        from orchestrator.sim.simulate import START

        self.eng = Engine(START.timestamp())
        self.runners: list[Runner] = []
        self.queue: dict[str, list[BJob]] = {p.name: [] for p in config.pools}
        self.records: list[JobRecord | None] = [None] * len(trace)
        self.launched_for: dict[tuple[int, int], list[Runner]] = {}
        self.github_calls = 0
        self.cloud_calls = 0
        self._ids = itertools.count(1)
        self.arrivals_left = 0

    # --- hooks for a policy ---
    def on_queued(self, job: BJob) -> None: ...

    def on_idle(self, r: Runner) -> None: ...

    def on_gone(self, r: Runner) -> None: ...

    def start(self) -> None: ...

    # --- world ---
    def candidates(self, pool: PoolConfig) -> list[Candidate]:
        return list(pool.candidates)

    def live(self, pool: PoolConfig) -> list[Runner]:
        return [r for r in self.runners if r.pool is pool and r.state != "gone"]

    def launch(self, pool: PoolConfig, cause: BJob | None) -> Runner | None:
        if len(self.live(pool)) >= pool.max_runners:
            return None
        for cand in self.candidates(pool):
            self.cloud_calls += 1
            if self.world.capacity_error(cand):
                continue
            r = Runner(next(self._ids), pool, cand, sandbox_price(cand), self.eng.now)
            if cause is not None:
                r.for_job = (cause.index, cause.attempt)
                self.launched_for.setdefault(r.for_job, []).append(r)
                rec = self.records[cause.index]
                if rec.decided_at is None:
                    rec.decided_at = self.eng.now
            self.runners.append(r)
            self.eng.at(self.eng.now + self.world.boot_s(cand), lambda r=r: self._booted(r))
            return r
        return None

    def _booted(self, r: Runner) -> None:
        if r.state != "booting":
            return
        r.booted_at = self.eng.now
        delay = self.world.interruption_after_boot(r.cand)
        if delay is not None:
            self.eng.at(self.eng.now + delay, lambda: self._interrupt(r))
        self._free(r)

    def _free(self, r: Runner) -> None:
        """Runner is ready: take the oldest queued job of its pool, or go idle."""
        q = self.queue[r.pool.name]
        if q:
            self._start(q.pop(0), r)
        else:
            r.state, r.idle_since = "idle", self.eng.now
            self.on_idle(r)

    def _start(self, job: BJob, r: Runner) -> None:
        now = self.eng.now
        r.state, r.job, r.idle_since = "busy", job, None
        r.repo = r.repo or job.repo
        r.ran_jobs.append((job.index, job.attempt))
        job.started_at, job.runner = now, r
        rec = self.records[job.index]
        if rec.started_at is None:
            rec.started_at = now
        if rec.decided_at is None:
            rec.decided_at = now
        self.eng.at(now + job.duration_s, lambda: self._complete(job, r))

    def _complete(self, job: BJob, r: Runner) -> None:
        if r.job is not job or r.state != "busy":
            return
        r.busy_s += self.eng.now - job.started_at
        r.job = None
        job.done = True
        self.records[job.index].completed = True
        self._free(r)

    def _interrupt(self, r: Runner) -> None:
        if r.state == "gone":
            return
        r.interrupted = True
        job = r.job
        self.terminate(r)
        if job is not None:
            self.enqueue(BJob(job.index, job.pool, job.duration_s, self.eng.now, job.repo, job.attempt + 1))

    def terminate(self, r: Runner) -> None:
        if r.state == "gone":
            return
        if r.job is not None:
            r.busy_s += self.eng.now - r.job.started_at
            r.job = None
        r.state, r.ended_at = "gone", self.eng.now
        self.cloud_calls += 1
        self.github_calls += 1  # deregister
        self.on_gone(r)

    def enqueue(self, job: BJob) -> None:
        idle = [r for r in self.live(job.pool) if r.state == "idle"]
        if idle:
            self._start(job, min(idle, key=lambda r: r.idle_since))
            return
        self.queue[job.pool.name].append(job)
        self.on_queued(job)

    def _arrive(self, index: int, tj: TraceJob, pool: PoolConfig) -> None:
        self.arrivals_left -= 1
        self.records[index] = JobRecord(queued_at=self.eng.now)
        self.enqueue(BJob(index, pool, tj.duration_s, self.eng.now, tj.repo))

    # --- run ---
    def run(self) -> dict:
        routed = []
        for i, tj in enumerate(self.trace):
            r = route(self.config, list(tj.labels))
            if r is not None:
                routed.append(i)
                self.arrivals_left += 1
                self.eng.at(tj.t, lambda i=i, tj=tj, p=r.pool: self._arrive(i, tj, p))
        self.start()
        last = self.trace[-1].t if self.trace else 0.0
        self.eng.run(last + self.options.drain_s)
        end = self.eng.now
        jobs = [self.records[i] or JobRecord(queued_at=self.trace[i].t) for i in routed]
        cfg = self.config
        vms, leaked = [], 0
        for r in self.runners:
            stop = r.ended_at if r.ended_at is not None else end
            if r.ended_at is None:
                leaked += 1
                if r.job is not None:
                    r.busy_s += end - r.job.started_at
            elif stop - r.launched_at > r.pool.max_lifetime + cfg.server.reaper_interval and self.enforces_lifetime:
                leaked += 1
            vms.append(VmRecord(
                launched_at=r.launched_at, booted_at=r.booted_at, ended_at=r.ended_at, price_per_hour=r.price,
                on_demand_price_per_hour=on_demand_of(cfg, r.cand), busy_s=r.busy_s, pool=r.pool.name,
                repository=r.repo, interrupted=r.interrupted,
            ))
        dup = 0
        for launched in self.launched_for.values():
            for k, r in enumerate(launched[1:], 1):
                if any((p.ended_at is None or p.ended_at > r.launched_at) and not [x for x in p.ran_jobs if x != p.for_job] for p in launched[:k]):
                    dup += 1
        return figures(
            policy=self.name, config=cfg, jobs=jobs, vms=vms, end=end, min_billing=cfg.clouds.sandbox.min_billing,
            github_calls=self.github_calls, cloud_api_calls=self.cloud_calls, duplicate_vms=dup, leaked_vms=leaked,
            extra={"spare_vms": sum(1 for r in self.runners if not r.ran_jobs)},
        )

    enforces_lifetime = False  # no max lifetime in these tools: age alone is no leak

    def pending(self) -> bool:
        return self.arrivals_left > 0 or any(self.queue.values()) or any(r.state != "gone" for r in self.runners)


class CmlPolicy(RunnerPolicy):
    name = "cml"

    def candidates(self, pool: PoolConfig) -> list[Candidate]:
        on_demand = [c for c in pool.candidates if not c.spot]
        if on_demand:
            return on_demand
        seen: dict[str, Candidate] = {}
        for c in pool.candidates:  # a spot-only pool: its instance types, on demand, at their on-demand price
            seen.setdefault(c.key(), c.model_copy(update={"spot": False, "price_per_hour": on_demand_of(self.config, c)}))
        return list(seen.values())

    def on_queued(self, job: BJob) -> None:
        self.github_calls += 1  # list runners: is there one to reuse?
        self._supply(job.pool, job)

    def _supply(self, pool: PoolConfig, cause: BJob | None) -> None:
        booting = sum(1 for r in self.live(pool) if r.state == "booting")
        if len(self.queue[pool.name]) > booting:
            if self.launch(pool, cause) is not None:
                self.github_calls += 1  # registration token
            elif cause is not None and len(self.live(pool)) < pool.max_runners:
                self.eng.at(self.eng.now + CAPACITY_RETRY_S, lambda: self._retry(pool))

    def _retry(self, pool: PoolConfig) -> None:
        if self.queue[pool.name]:
            self._supply(pool, self.queue[pool.name][0])

    def on_idle(self, r: Runner) -> None:
        since = r.idle_since
        self.eng.at(self.eng.now + CML_IDLE_TIMEOUT_S, lambda: self._idle_check(r, since))

    def _idle_check(self, r: Runner, since: float) -> None:
        if r.state == "idle" and r.idle_since == since:
            self.terminate(r)

    def on_gone(self, r: Runner) -> None:
        if self.queue[r.pool.name]:
            self._supply(r.pool, self.queue[r.pool.name][0])


class CmlSpotPolicy(CmlPolicy):
    name = "cml-spot"

    def candidates(self, pool: PoolConfig) -> list[Candidate]:
        return list(pool.candidates)


class TfAwsPolicy(RunnerPolicy):
    name = "tf-aws"

    def on_queued(self, job: BJob) -> None:
        # The webhook (lost or duplicated like ours) reaches scale-up through a delayed queue.
        if self.hooks_rng.random() < self.options.webhook_loss_rate:
            return
        copies = 2 if self.hooks_rng.random() < self.options.webhook_dup_rate else 1
        for _ in range(copies):
            self.eng.at(self.eng.now + TF_WEBHOOK_DELAY_S, lambda: self._scale_up(job))

    def _scale_up(self, job: BJob) -> None:
        self.github_calls += 1      # is the job still queued?
        self.cloud_calls += 1       # count the pool's runners
        if job.started_at is not None or job.runner is not None:
            return
        if self.launch(job.pool, job) is not None:
            self.github_calls += 1  # registration token

    def start(self) -> None:
        self.eng.at(self.eng.now + TF_SCALE_DOWN_EVERY_S, self._scale_down)

    def _scale_down(self) -> None:
        self.github_calls += len(self.config.pools)   # list runners
        self.cloud_calls += 1                         # describe instances
        for r in list(self.runners):
            if r.state == "idle" and self.eng.now - r.launched_at >= TF_MIN_RUNNING_S:
                self.terminate(r)
        if self.pending():
            self.eng.at(self.eng.now + TF_SCALE_DOWN_EVERY_S, self._scale_down)


class IdealPolicy:
    name = "ideal"

    def __init__(self, config: Config, trace: list[TraceJob], options: SimOptions):
        self.config = config
        self.trace = trace
        self.world = WorldModel(config, options, random.Random(config.clouds.sandbox.seed * 31 + 7))

    def run(self) -> dict:
        cfg = self.config
        jobs, vms = [], []
        end = 0.0
        for tj in self.trace:
            r = route(cfg, list(tj.labels))
            if r is None:
                continue
            cand = min(r.pool.candidates, key=sandbox_price)
            boot = self.world.boot_s(cand)
            start = tj.t + boot
            jobs.append(JobRecord(queued_at=tj.t, decided_at=tj.t, started_at=start, completed=True))
            vms.append(VmRecord(
                launched_at=tj.t, booted_at=start, ended_at=start + tj.duration_s, price_per_hour=sandbox_price(cand),
                on_demand_price_per_hour=on_demand_of(cfg, cand), busy_s=tj.duration_s, pool=r.pool.name, repository=tj.repo,
            ))
            end = max(end, start + tj.duration_s)
        return figures(
            policy=self.name, config=cfg, jobs=jobs, vms=vms, end=end, min_billing=cfg.clouds.sandbox.min_billing,
            github_calls=len(jobs), cloud_api_calls=2 * len(jobs), duplicate_vms=0, leaked_vms=0,
            extra={"spare_vms": 0},
        )


POLICIES = {"cml": CmlPolicy, "cml-spot": CmlSpotPolicy, "tf-aws": TfAwsPolicy, "ideal": IdealPolicy}


def run_baseline(name: str, config: Config, trace: list[TraceJob], options: SimOptions) -> dict:
    """Figures of one baseline; trace times are seconds from 0 in the same calendar as our run."""
    from orchestrator.sim.simulate import START

    try:
        policy = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(POLICIES)}") from None
    shifted = [TraceJob(START.timestamp() + j.t, j.repo, j.labels, j.duration_s) for j in trace]
    return policy(config, shifted, options).run()
