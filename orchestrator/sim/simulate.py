"""`orchestrator simulate`: replay a job trace through the real orchestrator in simulated time.

Our run is the real code: routing, intake, scaler, reaper, budgets and the store
(SQLite in memory), against the sandbox cloud and the simulated GitHub, on a
FakeClock that jumps from one due event to the next. The webhook -> scaler
worker hand-off is modelled by running the scaler right after whatever woke it
(same simulated instant) and every `scaler_tick_s` while jobs wait; the reaper runs
every `server.reaper_interval` and the backstop every `github.poll_interval`. Each
call we make to GitHub or the cloud takes simulated time (`github_api_latency_s`,
`cloud_api_latency_s`) during which the world goes on; the scaler is its own worker
in the service, so a job that arrives while the reaper or the backstop waits on a
call is taken up at that instant. The scaler's launch workers
(`server.launch_concurrency`) and the GitHub client's request slots are modelled by
`_Workers`: the pass waits only when every worker is busy. Calls run one after
another here, for determinism. Database work takes no simulated time.

Baseline policies (baselines.py) replay the same trace in the same world model.
Every figure is read from the simulated world (VMs billed, jobs started), not
from our own records.
"""

from __future__ import annotations

import heapq
import json
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from orchestrator.config import Candidate, Config, ConfigError, DatabaseConfig, SandboxCloud, load_config, parse_duration
from orchestrator.core.clock import FakeClock
from orchestrator.core.routing import route
from orchestrator.github.base import MAX_CONCURRENT_REQUESTS as GITHUB_MAX_CONCURRENT
from orchestrator.providers.base import TAG_POOL
from orchestrator.sim.report import JobRecord, VmRecord, figures, ratios, render_table, targets
from orchestrator.sim.trace import SimOptions, TraceError, TraceJob, load_options, load_trace

log = logging.getLogger(__name__)

START = datetime(2026, 1, 5, tzinfo=timezone.utc)  # a Monday, 00:00 UTC: a one-day trace is one daily budget period
REQUIRED_KEYS = (
    "jobs", "lost_jobs", "duplicate_vms", "leaked_vms", "budget_overshoot_usd", "wait_s", "decision_delay_ms",
    "billed_vm_s", "idle_vm_s", "cost_usd", "on_demand_cost_usd", "github_calls_per_job", "baselines",
)


class SimulationError(Exception):
    pass


# --- the world model shared with the baselines ------------------------------------


def sim_config(config: Config, options: SimOptions, seed: int) -> Config:
    """The config as simulated: sandbox-only, simulated GitHub, an in-memory store, a fixed id."""
    bad = sorted({c.cloud for p in config.pools for c in p.candidates if c.cloud != "sandbox"})
    if bad:
        raise SimulationError(f"simulate runs the sandbox cloud only; the config uses {', '.join(bad)}")
    data = {**config.clouds.sandbox.model_dump(), **options.sandbox}
    if seed:
        data["seed"] = seed
    try:
        sandbox = SandboxCloud.model_validate(data)
    except Exception as e:
        raise SimulationError(f"bad sandbox overrides: {e}") from None
    return config.model_copy(update={
        "clouds": config.clouds.model_copy(update={"sandbox": sandbox}),
        "github": config.github.model_copy(update={"simulated": True}),
        "server": config.server.model_copy(update={"orchestrator_id": config.server.orchestrator_id or "sim"}),
        # synchronous=OFF-like speed: nothing outlives the run
        "database": DatabaseConfig(url="sqlite://"),
    })


def boot_overrides(options: SimOptions, sandbox: SandboxCloud) -> dict[str, tuple[float, float]]:
    out = {}
    for itype, spec in options.boot_time_by_instance_type.items():
        spec = spec or {}
        out[itype] = (
            float(parse_duration(spec.get("boot_time", sandbox.boot_time))),
            float(parse_duration(spec.get("boot_jitter", sandbox.boot_jitter))),
        )
    return out


def on_demand_price(config: Config, provider, cand_type: str, fallback: float) -> float:
    """What the same instance type costs on demand: a non-spot candidate's price, else the provider's."""
    for pool in config.pools:
        for c in pool.candidates:
            if c.instance_type == cand_type and not c.spot:
                return provider.price_per_hour(c) if provider is not None else (c.price_per_hour or fallback)
    if provider is not None:
        return provider.price_per_hour(Candidate(cloud="sandbox", instance_type=cand_type, spot=False))
    return fallback


# --- our run -----------------------------------------------------------------------


@dataclass
class OurRun:
    config: Config
    trace: list[TraceJob]
    options: SimOptions
    counters: Counter = field(default_factory=Counter)
    timings: Counter = field(default_factory=Counter)   # wall seconds per loop; not in the report (not deterministic)

    def run(self) -> dict:
        from orchestrator.app import Orchestrator
        from orchestrator.github.simulated import SimulatedGitHub
        from orchestrator.providers.sandbox import SandboxProvider, SandboxWorld
        from orchestrator.sim.timeline import Timeline

        cfg = self.config
        sandbox = cfg.clouds.sandbox
        seed = sandbox.seed
        clock = FakeClock(START)
        timeline = Timeline(clock)
        world = SandboxWorld(clock, sandbox, timeline=timeline, rng=random.Random(seed))
        world.boot_times = boot_overrides(self.options, sandbox)
        gh = SimulatedGitHub(
            clock, timeline, rng=random.Random(seed * 7919 + 2),
            webhook_loss_rate=self.options.webhook_loss_rate, webhook_dup_rate=self.options.webhook_dup_rate,
            webhook_delay_s=self.options.webhook_delay_s,
        )
        spend = _Spender(clock, timeline)
        workers = cfg.server.launch_concurrency
        lanes = _Workers(
            clock, spend, workers, GITHUB_MAX_CONCURRENT, self.options.cloud_api_latency_s, self.options.github_api_latency_s,
        )
        api = _Latency(gh, spend, self.options.github_api_latency_s, GITHUB_API, lanes.github_call)
        provider = _Latency(
            SandboxProvider(world, cfg.server.orchestrator_id), spend, self.options.cloud_api_latency_s, CLOUD_API, lanes.cloud_call,
        )
        orch = Orchestrator(
            cfg, clock=clock, github=api, providers={"sandbox": provider}, sandbox_world=world, timeline=timeline,
            worker_id="sim-scaler",
        )
        gh.deliver = orch.deliver_direct
        orch.scaler.concurrency = 1  # deterministic; the lanes above stand for the parallel workers
        driver = _ScalerDriver(orch.scaler, orch.store, clock, float(self.options.scaler_tick_s), self.counters, self.timings)

        # The background worker's wake-ups, observed instead of a thread.
        orch.intake.on_queued = driver.wake
        orch.lifecycle.on_change = driver.wake
        orch.reaper.on_requeue = driver.wake
        # While another loop waits on a call, the scaler's own thread would take up what woke it.
        spend.after_events = driver.run_if_woken

        self.clock, self.world, self.gh, self.orch = clock, world, gh, orch
        try:
            self._loop(clock, timeline, orch, gh, world, driver)
            return self._report(clock.time())
        finally:
            orch.store.close()

    def _loop(self, clock, timeline, orch, gh, world, driver: "_ScalerDriver") -> None:
        t0 = clock.time()
        cfg = self.config
        reaper_every = float(cfg.server.reaper_interval)
        poll_every = float(cfg.github.poll_interval)
        trace = self.trace
        n = len(trace)
        routable = [route(cfg, list(j.labels)) is not None for j in trace]
        last = t0 + (trace[-1].t if trace else 0.0)
        deadline = last + self.options.drain_s
        next_reaper = t0 + reaper_every
        next_backstop = t0 + poll_every
        self.sim_jobs = [None] * n
        arrived = [0]

        def arrive(i: int, j: TraceJob) -> None:
            self.sim_jobs[i] = gh.enqueue_job(j.repo, list(j.labels), j.duration_s)
            arrived[0] += 1

        # Arrivals are world events: they go on while our code waits on an API call.
        for i, j in enumerate(trace):
            timeline.at(t0 + j.t, lambda i=i, j=j: arrive(i, j))
        c = self.counters
        while True:
            now = clock.time()
            due = [next_reaper, next_backstop]
            tl = timeline.next_time()
            if tl is not None:
                due.append(tl)
            if driver.next_tick is not None:
                due.append(driver.next_tick)
            t = now if driver.woken else max(min(due), now)
            if t > deadline:
                break
            if t > now:
                clock.set(t)
                now = t
            # One instant, in the order things happen: the world (arrivals, VMs, GitHub), our loops, then the worker.
            w = time.perf_counter()
            self._scaler_seen = self.timings["scaler"]
            c["timeline_events"] += timeline.run_due()
            w = self._lap("timeline", w)
            if next_backstop <= now:
                c["backstop_polls"] += 1
                c["backstop_found"] += orch.backstop_once()
                next_backstop = _next_slot(next_backstop, poll_every, clock.time())
                w = self._lap("backstop", w)
            if next_reaper <= now:
                c["reaper_passes"] += 1
                result = orch.reaper.run_once()
                for a in result.actions:
                    c["reaper:" + a.kind] += 1
                c["reaper_errors"] += len(result.errors)
                next_reaper = _next_slot(next_reaper, reaper_every, clock.time())
                w = self._lap("reaper", w)
                if arrived[0] >= n and self._settled(routable, world, orch):
                    break
            if driver.woken or (driver.next_tick is not None and driver.next_tick <= now):
                driver.run()

    def _lap(self, name: str, since: float) -> float:
        """Wall time of one loop, less the scaler passes that ran inside it (counted as the scaler's)."""
        now = time.perf_counter()
        nested = self.timings["scaler"] - self._scaler_seen
        self.timings[name] += now - since - nested
        self._scaler_seen = self.timings["scaler"]
        return now

    def _settled(self, routable: list[bool], world, orch) -> bool:
        if world.live():
            return False
        if orch.store.live_instances():
            return False
        open_ids = {j.id for j in self.gh.jobs.values() if j.status in ("queued", "in_progress", "waiting")}
        if not open_ids:
            return True
        # Only jobs no pool can take may stay open (they are GitHub-hosted traffic, not ours).
        unroutable = {sj.id for sj, ok in zip(self.sim_jobs, routable) if not ok}
        return open_ids <= unroutable

    # --- figures ---------------------------------------------------------------

    def _report(self, end: float) -> dict:
        cfg, gh, world, orch = self.config, self.gh, self.world, self.orch
        sandbox = cfg.clouds.sandbox
        provider = orch.providers.get("sandbox")
        chains: dict[int, list] = {}
        for sj in gh.jobs.values():
            chains.setdefault(sj.rerun_of or sj.id, []).append(sj)
        first_request: dict[str, float] = {}
        for at, key in world.launch_requests:
            job_key = key.rsplit("-", 1)[0]          # "{job}-{run_attempt}"
            first_request.setdefault(job_key, at)
        known = _first_heard(orch.store)
        jobs: list[JobRecord] = []
        routable = 0
        for tj, sj in zip(self.trace, self.sim_jobs):
            if route(cfg, list(tj.labels)) is None:
                continue  # never ours to run
            routable += 1
            chain = chains.get(sj.id, [sj])
            starts = [x.started_at for x in chain if x.started_at is not None]
            started = min(starts) if starts else None
            decided = [v for v in (first_request.get(f"{sj.id}-1"), sj.started_at) if v is not None]
            jobs.append(JobRecord(
                queued_at=sj.queued_at, known_at=known.get(sj.id), decided_at=min(decided) if decided else None, started_at=started,
                completed=any(x.conclusion == "success" for x in chain),
            ))
        ran_on: dict[str, list] = {}
        for sj in gh.jobs.values():
            if sj.runner_name and sj.started_at is not None:
                ran_on.setdefault(sj.runner_name, []).append(sj)
        vms: list[VmRecord] = []
        leaked = 0
        groups: dict[str, list] = {}
        od_cache: dict[str, float] = {}
        for vm in world.vms.values():
            if vm.launch_key.startswith("ext-"):
                continue
            pool_name = vm.tags.get(TAG_POOL, "")
            pool = cfg.pool(pool_name)
            stop = vm.terminated_at if vm.terminated_at is not None else end
            if vm.terminated_at is None:
                leaked += 1
            elif pool is not None and stop - vm.launched_at > pool.max_lifetime + cfg.server.reaper_interval:
                leaked += 1
            busy = sum((x.completed_at if x.completed_at is not None else stop) - x.started_at for x in ran_on.get(vm.name, []))
            job_id = _job_of(vm.launch_key)
            repo = gh.jobs[job_id].repository if job_id in gh.jobs else None
            if vm.instance_type not in od_cache:
                od_cache[vm.instance_type] = on_demand_price(cfg, provider, vm.instance_type, vm.price_per_hour)
            vms.append(VmRecord(
                launched_at=vm.launched_at, booted_at=vm.boot_at if vm.boot_at <= stop else None, ended_at=vm.terminated_at,
                price_per_hour=vm.price_per_hour, on_demand_price_per_hour=od_cache[vm.instance_type], busy_s=busy,
                pool=pool_name, repository=repo, interrupted=vm.interrupted,
            ))
            if job_id is not None:
                groups.setdefault(vm.launch_key.rsplit("-", 1)[0], []).append(vm)
        duplicates = _duplicates(groups, ran_on, end)
        c = self.counters
        extra = {
            "spare_vms": sum(1 for vm in world.vms.values() if not vm.launch_key.startswith("ext-") and vm.name not in ran_on),
            "reruns": sum(1 for sj in gh.jobs.values() if sj.rerun_of),
            "unroutable_jobs": len(self.trace) - routable,
            "webhooks_lost": gh.webhooks_lost,
            "webhooks_duplicated": gh.webhooks_duplicated,
            "backstop_found": c["backstop_found"],
            "store_live_instances_at_end": len(orch.store.live_instances()),
            "simulated_s": round(end - START.timestamp(), 1),
            "loops": {k: v for k, v in sorted(c.items()) if not k.startswith("reaper:") and k != "backstop_found"},
            "reaper_actions": {k[7:]: v for k, v in sorted(c.items()) if k.startswith("reaper:")},
        }
        return figures(
            policy="orchestrator", config=cfg, jobs=jobs, vms=vms, end=end, min_billing=sandbox.min_billing,
            github_calls=sum(gh.calls.values()), cloud_api_calls=sum(world.calls.values()),
            duplicate_vms=duplicates, leaked_vms=leaked, extra=extra,
        )


def _first_heard(store) -> dict[int, float]:
    """Job id -> when our intake first recorded it (from a webhook or the backstop)."""
    from sqlalchemy import select

    from orchestrator.core.clock import as_utc
    from orchestrator.store.models import Job

    with store.session() as s:
        return {job_id: as_utc(created).timestamp() for job_id, created in s.execute(select(Job.id, Job.created_at))}


def _any_queued(store) -> bool:
    from sqlalchemy import select

    from orchestrator.store.models import Job

    with store.reading() as s:
        return s.scalar(select(Job.id).where(Job.state == "queued").limit(1)) is not None


def _next_slot(current: float, every: float, now: float) -> float:
    """The next run on the loop's grid; runs missed while busy coalesce into one (as the scheduler does)."""
    nxt = current + every
    while nxt <= now:
        nxt += every
    return nxt


GITHUB_API = frozenset({"create_jit_config", "list_runners", "delete_runner", "rerun_job", "rerun_failed_jobs", "list_queued_jobs"})
CLOUD_API = frozenset({"launch", "terminate", "list_managed"})
LAUNCH_PATH = frozenset({"launch", "create_jit_config"})  # the calls the scaler's workers make side by side


class _Spender:
    """Lets simulated time pass while our code waits on a call; the world's events run meanwhile."""

    def __init__(self, clock: FakeClock, timeline):
        self.clock = clock
        self.timeline = timeline
        self.after_events: Callable[[], None] = lambda: None
        self._busy = False

    def spend(self, seconds: float) -> None:
        target = self.clock.time() + seconds
        if not self._busy:  # world events never call our APIs, but never recurse if one does
            self._busy = True
            try:
                self.after_events()  # what woke the scaler before this call is taken up now
                while (nt := self.timeline.next_time()) is not None and nt <= target:
                    if nt > self.clock.time():
                        self.clock.set(nt)
                    self.timeline.run_due()
                    self.after_events()
            finally:
                self._busy = False
        self.clock.set(max(target, self.clock.time()))


class _Workers:
    """The scaler's launch workers and the GitHub client's request slots, in simulated time.

    A launch-path call is made by the worker handling that instance; the worker is busy for the
    call's latency, and a GitHub call also needs one of the client's slots. Only when every worker
    is busy does the pass wait; otherwise it goes on at once, as the other workers do. A call acts
    at the instant it is made (its answer is used at once)."""

    def __init__(self, clock: FakeClock, spender: _Spender, workers: int, github_slots: int, cloud_s: float, github_s: float):
        t0 = clock.time()
        self._clock = clock
        self._spender = spender
        self._cloud_s = cloud_s
        self._github_s = github_s
        self._free_at = [t0] * max(workers, 1)        # heaps: when each worker / slot is free
        self._slots_free_at = [t0] * max(github_slots, 1)
        self._held: tuple[str, float] | None = None   # the worker on the current instance, free at

    def _worker(self, name: str) -> float:
        if self._held is not None and self._held[0] == name:
            return self._held[1]
        if self._held is not None:
            heapq.heappush(self._free_at, self._held[1])
            self._held = None
        now = self._clock.time()
        start = max(now, heapq.heappop(self._free_at))
        if start > now:
            self._spender.spend(start - now)   # every worker busy: the pass waits for one
        return start

    def cloud_call(self, name: str) -> None:
        self._held = (name, self._worker(name) + self._cloud_s)

    def github_call(self, name: str) -> None:
        at = max(self._worker(name), heapq.heappop(self._slots_free_at))
        heapq.heappush(self._slots_free_at, at + self._github_s)
        self._held = (name, at + self._github_s)


class _ScalerDriver:
    """The scaler's background worker, driven by the simulation instead of a thread."""

    def __init__(self, scaler, store, clock: FakeClock, tick_s: float, counters: Counter, timings: Counter):
        self.scaler = scaler
        self.store = store
        self.clock = clock
        self.tick_s = tick_s
        self.counters = counters
        self.timings = timings
        self.woken = False
        self.next_tick: float | None = None   # a retry pass while jobs wait (backoff, max_runners, budget)
        self._running = False

    def wake(self) -> None:
        self.woken = True

    def run_if_woken(self) -> None:
        if self.woken:
            self.run()

    def run(self) -> None:
        if self._running:   # a pass that waits on a busy lane: it picks up the rest itself
            return
        self._running = True
        started = time.perf_counter()
        try:
            self.woken = False
            self.counters["scaler_passes"] += 1
            self.scaler.run_once()
            self.next_tick = self.clock.time() + self.tick_s if _any_queued(self.store) else None
        finally:
            self._running = False
            self.timings["scaler"] += time.perf_counter() - started


class _Latency:
    """A GitHub or cloud client whose calls take simulated time: the call acts at once, the caller
    gets the answer `latency` later (so a launch is requested at the instant it is called).
    Launch-path calls are made by a launch worker instead (`on_worker`, see `_Workers`)."""

    def __init__(self, inner, spender: _Spender, latency: float, methods: frozenset[str], on_worker: Callable[[str], None]):
        self._inner = inner
        self._spender = spender
        self._latency = latency
        self._methods = methods
        self._on_worker = on_worker

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if name not in self._methods or not self._latency or not callable(attr):
            return attr
        if name in LAUNCH_PATH:
            def worker_call(*args, **kwargs):
                # launch(spec) and create_jit_config(scope, name=...): both name the instance
                self._on_worker(kwargs["name"] if "name" in kwargs else args[0].name)
                return attr(*args, **kwargs)

            return worker_call

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            finally:
                self._spender.spend(self._latency)

        return call


def _job_of(launch_key: str) -> int | None:
    head = launch_key.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _duplicates(groups: dict[str, list], ran_on: dict[str, list], end: float) -> int:
    """VMs launched for a job attempt while an earlier VM for it was alive and still meant for it."""
    dup = 0
    for key, vms in groups.items():
        job_id = int(key.split("-", 1)[0])
        vms = sorted(vms, key=lambda v: (v.launched_at, v.instance_id))
        for k, vm in enumerate(vms[1:], 1):
            for prev in vms[:k]:
                alive = prev.terminated_at is None or prev.terminated_at > vm.launched_at
                other = [x for x in ran_on.get(prev.name, []) if x.id != job_id]
                if alive and not other:
                    dup += 1
                    break
    return dup


# --- entry points ------------------------------------------------------------------


def simulate(config: Config, trace: list[TraceJob], options: SimOptions | None = None, seed: int = 0, *, trace_name: str = "") -> dict:
    """One trace through our orchestrator and every baseline; returns the report."""
    from orchestrator.sim.baselines import run_baseline

    options = options or SimOptions()
    cfg = sim_config(config, options, seed)
    run = OurRun(cfg, trace, options)
    ours = run.run()
    simulate.last_timings = dict(run.timings)
    report = dict(ours)
    report["trace"] = trace_name
    report["seed"] = cfg.clouds.sandbox.seed
    report["world"] = {
        "sandbox": cfg.clouds.sandbox.model_dump(),
        "simulator": options.as_dict(),
        "reaper_interval_s": cfg.server.reaper_interval,
        "poll_interval_s": cfg.github.poll_interval,
    }
    report["baselines"] = {}
    for name in options.baselines:
        fig = run_baseline(name, cfg, trace, options)
        fig["ratio"] = ratios(ours, fig)
        report["baselines"][name] = fig
    report["targets"] = targets(report)
    return report


def main(args) -> int:
    from orchestrator.cli import _config_path

    logging.getLogger("orchestrator").setLevel(logging.ERROR)  # the report is the output
    try:
        config = load_config(_config_path(args))
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    try:
        trace = load_trace(args.trace)
        options = load_options(args.trace, getattr(args, "overlay", None))
    except (OSError, TraceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started, cpu = time.monotonic(), time.process_time()
    try:
        report = simulate(config, trace, options, int(getattr(args, "seed", 0) or 0), trace_name=Path(args.trace).name)
    except SimulationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.report).write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    if getattr(args, "format", "json") == "table":
        render_table(report)
    laps = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(getattr(simulate, "last_timings", {}).items(), key=lambda kv: -kv[1]))
    print(
        f"{len(trace)} jobs simulated in {time.monotonic() - started:.1f}s wall, {time.process_time() - cpu:.1f}s cpu "
        f"({laps}); report: {args.report}", file=sys.stderr,
    )
    return 0


if __name__ == "__main__":  # python -m orchestrator.sim.simulate CONFIG TRACE REPORT [overlay]
    import argparse

    p = argparse.ArgumentParser(prog="python -m orchestrator.sim.simulate")
    p.add_argument("--config", required=True)
    p.add_argument("--trace", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overlay", help="simulator options (default: the trace's .yaml beside it)")
    p.add_argument("--format", choices=["json", "table"], default="json")
    sys.exit(main(p.parse_args()))
