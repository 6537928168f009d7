"""Hard budget caps: spent + reserved never passes a `block` limit, whatever happens, and neither does
what the cloud bills. Also UTC periods and their rollover, and alerts."""

from __future__ import annotations

import http.server
import json
import logging
import tempfile
import threading
import uuid
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from prometheus_client import REGISTRY

from orch_support import ADMIN_TOKEN, WEBHOOK_SECRET, job_payload
from orchestrator.app import Orchestrator
from orchestrator.config import load_config_text
from orchestrator.core.budget import EPSILON, period_bounds
from orchestrator.core.clock import FakeClock
from orchestrator.core.states import INSTANCE_LIVE, InstanceState
from orchestrator.github.simulated import SimulatedGitHub
from orchestrator.providers.sandbox import SandboxProvider, SandboxWorld
from orchestrator.sim.timeline import Timeline
from orchestrator.store.models import Reservation
from orchestrator.store.store import Store

UTC = timezone.utc
LABELS = ["self-hosted", "gpu"]

CONFIG = """
github:
  simulated: true
  webhook_secret: {secret}
  allowed_repositories: ["octo-org/*"]
server:
  orchestrator_id: orch-budget
  admin_tokens: [{admin}]
  reaper_interval: {interval}
database:
  url: {db}
pools:
  - name: gpu
    labels: [gpu]
    max_runners: {max_runners}
    idle_timeout: 10m
    boot_timeout: 10m
    max_lifetime: {lifetime}
    candidates: {candidates}
budgets: {budgets}
"""


def make_cfg(db: str, *, budgets: str, candidates: str | None = None, lifetime: str = "1h", interval: str = "30s",
             max_runners: int = 50):
    candidates = candidates or "[{cloud: sandbox, instance_type: gpu-a, spot: false, price_per_hour: 1.0}]"
    text = CONFIG.format(secret=WEBHOOK_SECRET, admin=ADMIN_TOKEN, db=db, budgets=budgets, candidates=candidates,
                         lifetime=lifetime, interval=interval, max_runners=max_runners)
    return load_config_text(text, "<test>")


def queue(orch, job_id: int, repo: str = "octo-org/models") -> None:
    orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("queued", job_id=job_id, labels=LABELS, repo=repo))


def used(view) -> float:
    return view.spent_usd + view.reserved_usd


def drive(orch, clock, seconds: float, *, check=None) -> None:
    """Simulated time: timeline callbacks in order; a scaler and a reaper pass every reaper_interval."""
    interval = orch.config.server.reaper_interval
    end = clock.time() + seconds
    nxt = getattr(orch, "_next_reap", clock.time() + interval)
    while True:
        due = [t for t in (orch.timeline.next_time(), nxt, end) if t is not None]
        clock.set(max(min(due), clock.time()))
        orch.timeline.run_due()
        if clock.time() >= nxt:
            orch.scaler.run_once()
            orch.reaper.run_once()
            nxt += interval
        if check is not None:
            check()
        if clock.time() >= end:
            break
    orch._next_reap = nxt


# --- periods ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "period, now, start, end",
    [
        ("daily", datetime(2026, 3, 9, 23, 59, 59, tzinfo=UTC), datetime(2026, 3, 9, tzinfo=UTC), datetime(2026, 3, 10, tzinfo=UTC)),
        ("daily", datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 11, tzinfo=UTC)),
        # ISO weeks: Monday 00:00 UTC to the next Monday.
        ("weekly", datetime(2026, 1, 4, 23, 0, tzinfo=UTC), datetime(2025, 12, 29, tzinfo=UTC), datetime(2026, 1, 5, tzinfo=UTC)),
        ("weekly", datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 1, 12, tzinfo=UTC)),
        ("monthly", datetime(2026, 12, 31, 23, 59, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        ("monthly", datetime(2028, 2, 29, 12, tzinfo=UTC), datetime(2028, 2, 1, tzinfo=UTC), datetime(2028, 3, 1, tzinfo=UTC)),
    ],
)
def test_period_bounds_are_utc_calendar_periods(period, now, start, end):
    assert period_bounds(period, now) == (start, end)


def test_period_bounds_use_utc_not_local_time():
    from datetime import timedelta

    tokyo = timezone(timedelta(hours=9))
    # 08:00 in Tokyo on the 1st is still the last day of the previous month in UTC.
    assert period_bounds("monthly", datetime(2026, 2, 1, 8, 0, tzinfo=tokyo))[0] == datetime(2026, 1, 1, tzinfo=UTC)


ROLLOVER_STARTS = {
    "daily": datetime(2026, 1, 1, 22, 0, tzinfo=UTC),
    "weekly": datetime(2026, 1, 4, 22, 0, tzinfo=UTC),     # a Sunday
    "monthly": datetime(2026, 12, 31, 22, 0, tzinfo=UTC),  # and the year with it
}


def _held_by_spend(make_orch, db_url, period: str):
    clock = FakeClock(ROLLOVER_STARTS[period])
    budgets = f"[{{name: cap, scope: global, period: {period}, limit_usd: 1.2, on_exceed: block}}]"
    orch = make_orch(make_cfg(db_url, budgets=budgets), clock=clock)
    orch.github.enqueue_job("octo-org/models", LABELS, duration_s=1800)
    drive(orch, clock, 30)
    assert len(orch.store.live_instances()) == 1  # $1 of $1.20 reserved
    second = orch.github.enqueue_job("octo-org/models", LABELS, duration_s=600)
    drive(orch, clock, 3600)  # the first ran 30 minutes and is settled: about $0.52 spent
    view = orch.budgets.view("cap")
    assert view.reserved_usd == 0 and 0.5 < view.spent_usd < 0.6
    job = orch.store.get_job(second.id)
    assert job.state == "queued" and job.reason == "budget:cap"
    return orch, clock, second


@pytest.mark.parametrize("period", ["daily", "weekly", "monthly"])
def test_job_held_by_budget_launches_by_itself_after_the_period_rolls_over(make_orch, any_db_url, period):
    orch, clock, second = _held_by_spend(make_orch, any_db_url, period)
    _, end = period_bounds(period, clock.now())
    drive(orch, clock, end.timestamp() - clock.time() - 1)
    assert orch.store.get_job(second.id).state == "queued"
    drive(orch, clock, 60)
    job = orch.store.get_job(second.id)
    assert job.state in ("assigned", "in_progress", "completed"), job.reason
    view = orch.budgets.view("cap")
    assert view.period_start == end and view.spent_usd == 0 and view.reserved_usd == pytest.approx(1.0)


def test_job_held_by_budget_launches_after_the_limit_is_raised(make_orch, sqlite_url):
    orch, clock, second = _held_by_spend(make_orch, sqlite_url, "monthly")
    orch.budgets.update("cap", limit_usd=2.0)
    drive(orch, clock, 30)
    assert orch.store.get_job(second.id).state != "queued"


def test_spend_of_the_previous_period_is_not_counted(make_orch, sqlite_url):
    orch, clock, _ = _held_by_spend(make_orch, sqlite_url, "daily")
    before = orch.budgets.view("cap")
    clock.set(before.period_end)
    after = orch.budgets.view("cap")
    assert after.spent_usd == 0 and after.period_start == before.period_end


# --- the cap, by property ------------------------------------------------------------------------


PRICES = [0.1, 0.35, 0.8, 1.5, 3.0]
CANDIDATES = (
    "[{cloud: sandbox, instance_type: type-a, spot: true},"
    " {cloud: sandbox, instance_type: type-b, spot: true},"
    " {cloud: sandbox, instance_type: type-c, spot: false, price_per_hour: 0.9}]"
)
PROPERTY_BUDGETS = (
    "[{name: global-cap, scope: global, period: monthly, limit_usd: 6, on_exceed: block},"
    " {name: repo-cap, scope: 'repo:octo-org/a', period: daily, limit_usd: 2.5, on_exceed: block},"
    " {name: watch, scope: global, period: monthly, limit_usd: 1, on_exceed: alert}]"
)
REPOS = ["octo-org/a", "octo-org/b"]


class PricedSandbox(SandboxProvider):
    """A sandbox whose list prices move, like a spot market between launches."""

    def __init__(self, world, orchestrator_id):
        super().__init__(world, orchestrator_id)
        self.prices = {"type-a": 0.35, "type-b": 0.8}

    def price_per_hour(self, candidate):
        if candidate.price_per_hour is not None:
            return candidate.price_per_hour
        return self.prices[candidate.instance_type]


class BudgetMachine(RuleBasedStateMachine):
    """Launches, terminations, price and limit changes and time, in any order."""

    @initialize()
    def start(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.clock = FakeClock(datetime(2026, 3, 2, tzinfo=UTC))
        cfg = make_cfg(f"sqlite:///{self.tmp.name}/o.db", budgets=PROPERTY_BUDGETS, candidates=CANDIDATES,
                       lifetime="30m", interval="5m")
        self.timeline = Timeline(self.clock)
        self.world = SandboxWorld(self.clock, cfg.clouds.sandbox, timeline=self.timeline)
        self.provider = PricedSandbox(self.world, "orch-budget")
        self.orch = Orchestrator(cfg, clock=self.clock, providers={"sandbox": self.provider},
                                 sandbox_world=self.world, timeline=self.timeline)
        self.lowered: set[str] = set()
        self.max_limit = {v.name: v.limit_usd for v in self.orch.budgets.views()}
        self.prev = {v.name: used(v) for v in self.orch.budgets.views()}

    def teardown(self):
        if hasattr(self, "orch"):
            self.orch.store.close()
            self.tmp.cleanup()

    @rule(n=st.integers(1, 6), repo=st.sampled_from(REPOS), duration=st.sampled_from([120, 900, 2400, 7200]))
    def queue_jobs(self, n, repo, duration):
        for _ in range(n):
            self.orch.github.enqueue_job(repo, LABELS, duration_s=duration)

    @rule()
    def scale(self):
        self.orch.scaler.run_once()

    @rule(seconds=st.integers(1, 3600))
    def advance(self, seconds):
        drive(self.orch, self.clock, seconds, check=self.check_cap)

    @precondition(lambda self: bool(self.world.live()))
    @rule(pick=st.integers(0, 100), interrupt=st.booleans())
    def lose_vm(self, pick, interrupt):
        live = self.world.live()
        vm = live[pick % len(live)]
        if interrupt and self.orch.guest is not None and vm.state == "running":
            self.orch.guest.interrupt(vm)
        else:
            self.world.terminate(vm.instance_id)

    @rule(kind=st.sampled_from(["type-a", "type-b"]), price=st.sampled_from(PRICES))
    def change_price(self, kind, price):
        self.provider.prices[kind] = price

    @rule(name=st.sampled_from(["global-cap", "repo-cap"]), limit=st.sampled_from([0.0, 0.5, 1.0, 2.5, 4.0, 6.0, 9.0]))
    def change_limit(self, name, limit):
        view = self.orch.budgets.view(name)
        if limit < used(view):
            self.lowered.add(name)
        self.orch.budgets.update(name, limit_usd=limit)
        self.max_limit[name] = max(self.max_limit[name], limit)
        self.prev[name] = used(self.orch.budgets.view(name))

    @rule()
    def reap(self):
        self.orch.reaper.run_once()

    def check_cap(self):
        for view in self.orch.budgets.views():
            if view.on_exceed != "block":
                continue
            now_used = used(view)
            # Launches never take a block budget over its limit; one already over (a lowered limit) only shrinks.
            assert now_used <= max(view.limit_usd, self.prev[view.name]) + 1e-6, (view.name, now_used, view.limit_usd)
            self.prev[view.name] = now_used
        # What the cloud bills never exceeds what the ledger holds, nor the cap.
        billed = sum(self.world.cost_usd(vm) for vm in self.world.vms.values())
        cap = self.orch.budgets.view("global-cap")
        assert billed <= used(cap) + 1e-6, (billed, used(cap))
        assert billed <= self.max_limit["global-cap"] + 1e-6
        if "global-cap" not in self.lowered:
            assert billed <= cap.limit_usd + 1e-6
        # And the ledger is what the live VMs reserved.
        with self.orch.store.session() as s:
            live = {i for (i,) in s.query(Reservation.instance_id).filter(Reservation.settled_at.is_(None))}
        assert all(InstanceState(self.orch.store.get_instance(i).state) in INSTANCE_LIVE for i in live)

    @invariant()
    def cap_holds(self):
        if hasattr(self, "orch"):
            self.check_cap()


BudgetMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_budget_cap_holds_under_any_interleaving = BudgetMachine.TestCase


# --- the cap, under real concurrency ------------------------------------------------------------


def _replicas(url: str, clock, n: int, *, budgets: str, max_runners: int = 50):
    cfg = make_cfg(url, budgets=budgets, max_runners=max_runners)
    timeline = Timeline(clock)
    world = SandboxWorld(clock, cfg.clouds.sandbox, timeline=timeline)
    gh = SimulatedGitHub(clock, timeline)
    made = []
    for i in range(n):
        store = Store(url, clock)
        made.append(Orchestrator(cfg, clock=clock, store=store, github=gh, sandbox_world=world, timeline=timeline,
                                 worker_id=f"replica-{i}"))
    return made, world


def _race(replicas, jobs: int):
    for job_id in range(1, jobs + 1):
        queue(replicas[0], job_id)
    barrier = threading.Barrier(len(replicas))
    errors: list[BaseException] = []

    def run(orch):
        try:
            barrier.wait(timeout=30)
            for _ in range(3):
                orch.scaler.run_once()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(o,)) for o in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


@pytest.mark.postgres
def test_concurrent_launches_on_postgres_never_overshoot_the_budget(postgres_url, clock):
    replicas, world = _replicas(postgres_url, clock, 4, budgets="[{name: cap, scope: global, limit_usd: 7.5}]")
    try:
        _race(replicas, 40)
        view = replicas[0].budgets.view("cap")
        assert used(view) <= view.limit_usd + EPSILON
        assert view.reserved_usd == pytest.approx(7.0)
        live = replicas[0].store.live_instances()
        assert len(live) == 7 and len(world.live()) == 7
        assert len({i.job_id for i in live}) == 7  # one VM per job
        held = [j for j in replicas[0].store.jobs() if j.state == "queued"]
        assert len(held) == 33 and all(j.reason == "budget:cap" for j in held)
    finally:
        for o in replicas:
            o.store.close()


@pytest.mark.postgres
def test_concurrent_launches_on_postgres_respect_max_runners(postgres_url, clock):
    replicas, world = _replicas(postgres_url, clock, 4, budgets="[]", max_runners=5)
    try:
        _race(replicas, 30)
        assert len(replicas[0].store.live_instances()) == 5 and len(world.live()) == 5
    finally:
        for o in replicas:
            o.store.close()


def test_concurrent_launches_on_sqlite_never_overshoot_the_budget(sqlite_url, clock):
    replicas, world = _replicas(sqlite_url, clock, 3, budgets="[{name: cap, scope: global, limit_usd: 4.5}]")
    try:
        _race(replicas, 20)
        view = replicas[0].budgets.view("cap")
        assert used(view) <= view.limit_usd + EPSILON and len(world.live()) == 4
    finally:
        for o in replicas:
            o.store.close()


# --- alerts -------------------------------------------------------------------------------------


@pytest.fixture
def alert_receiver():
    received: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append({"path": self.path, "body": json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


def _alert_count(budget: str, threshold: float) -> float:
    return REGISTRY.get_sample_value("orchestrator_budget_alerts_total", {"budget": budget, "threshold": str(threshold)}) or 0.0


def test_each_threshold_alerts_once_per_period(make_orch, any_db_url, alert_receiver, caplog):
    url, received = alert_receiver
    clock = FakeClock(datetime(2026, 1, 30, tzinfo=UTC))
    budgets = f"[{{name: team, scope: global, period: monthly, limit_usd: 10, alert_at: [0.5, 0.8, 1.0], on_exceed: alert, alert_webhook_url: '{url}'}}]"
    orch = make_orch(make_cfg(any_db_url, budgets=budgets), clock=clock)
    orch.sandbox_world.guest = None  # VMs just sit there, reserved
    before = {t: _alert_count("team", t) for t in (0.5, 0.8, 1.0)}
    caplog.set_level(logging.WARNING, logger="orchestrator.core.budget")
    job_ids = iter(range(1, 100))

    def launch(n):
        for _ in range(n):
            queue(orch, next(job_ids))
        assert all(o.result == "launched" for o in orch.scaler.run_once())

    def fired():
        return [(r["body"]["budget"], r["body"]["threshold"]) for r in received]

    launch(4)
    orch.reaper.run_once()
    assert fired() == []
    launch(1)  # $5 of $10
    orch.reaper.run_once()
    orch.reaper.run_once()
    assert fired() == [("team", 0.5)]
    launch(3)  # $8
    orch.reaper.run_once()
    launch(4)  # $12: over, and an alert budget lets it through
    orch.reaper.run_once()
    orch.reaper.run_once()
    assert fired() == [("team", 0.5), ("team", 0.8), ("team", 1.0)]
    assert {t: _alert_count("team", t) - before[t] for t in before} == {0.5: 1, 0.8: 1, 1.0: 1}
    lines = [r for r in caplog.records if r.getMessage() == "budget threshold crossed" and getattr(r, "budget", None) == "team"]
    assert sorted(r.threshold for r in lines) == [0.5, 0.8, 1.0]
    body = received[0]["body"]
    assert body["limit_usd"] == 10 and body["period"] == "monthly" and received[0]["path"] == "/hook"

    # The jobs are cancelled, and their VMs reach max_lifetime in January and are settled there.
    for job_id in range(1, 13):
        orch.deliver_direct("workflow_job", str(uuid.uuid4()), job_payload("completed", job_id=job_id, labels=LABELS, conclusion="cancelled"))
    clock.advance(3600 - 30)
    orch.reaper.run_once()
    assert orch.budgets.view("team").reserved_usd == 0
    assert len(received) == 3
    # A new month: thresholds fire again, once each, as spend builds up anew.
    clock.set(datetime(2026, 2, 1, 1, tzinfo=UTC))
    orch.reaper.run_once()
    assert used(orch.budgets.view("team")) == 0
    launch(5)
    orch.reaper.run_once()
    orch.reaper.run_once()
    assert fired()[3:] == [("team", 0.5)]
    assert _alert_count("team", 0.5) - before[0.5] == 2


def test_alert_receiver_down_does_not_stop_the_reaper(make_orch, sqlite_url):
    budgets = "[{name: team, scope: global, limit_usd: 1, alert_at: [0.5], alert_webhook_url: 'http://127.0.0.1:9/nothing-here'}]"
    orch = make_orch(make_cfg(sqlite_url, budgets=budgets))
    orch.sandbox_world.guest = None
    queue(orch, 1)
    orch.scaler.run_once()
    result = orch.reaper.run_once()
    assert result.errors == []
    assert orch.budgets.check_alerts() == []  # recorded as sent: not retried every pass
