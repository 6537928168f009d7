"""Prices x time, reservations, UTC periods, and alerts.

The guarantee: a launch reserves price x max_lifetime against every budget that
covers it, inside one locked transaction, and only if every `block` budget keeps
spent + reserved <= limit. A VM cannot outlive max_lifetime (the reaper kills it
one tick early, the in-VM watchdog and GCP's max_run_duration back it up), so
its settled cost never exceeds its reservation and spend never crosses the cap.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from sqlalchemy import Row, bindparam, func, select
from sqlalchemy.orm import Session

from orchestrator.config import BudgetConfig, Config
from orchestrator.core.clock import Clock, as_utc
from orchestrator.metrics import BUDGET_ALERTS, BUDGET_LIMIT, BUDGET_RESERVED, BUDGET_SPENT
from orchestrator.store.models import AlertSent, BudgetSetting, Reservation
from orchestrator.store.store import Store

log = logging.getLogger(__name__)
EPSILON = 1e-9

# Read on every launch and every reaper pass: built once (see the reaper's statements).
_SPENT = select(func.coalesce(func.sum(Reservation.cost_usd), 0.0)).where(
    Reservation.budget == bindparam("budget"), Reservation.settled_at >= bindparam("start"), Reservation.settled_at < bindparam("end")
)
_RESERVED = select(func.coalesce(func.sum(Reservation.amount_usd), 0.0)).where(
    Reservation.budget == bindparam("budget"), Reservation.settled_at.is_(None)
)
_SETTINGS = select(BudgetSetting.__table__)  # plain rows: read on every launch and pass, never changed here
_RESERVE = Reservation.__table__.insert()
_RESERVATIONS_OF = select(Reservation).where(Reservation.instance_id == bindparam("instance_id"))
_LEDGER = select(_SPENT.scalar_subquery(), _RESERVED.scalar_subquery())  # both sums in one round trip


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    now = now.astimezone(timezone.utc)
    day = datetime(now.year, now.month, now.day, tzinfo=timezone.utc)
    if period == "daily":
        return day, day + timedelta(days=1)
    if period == "weekly":
        start = day - timedelta(days=now.weekday())  # ISO weeks start on Monday
        return start, start + timedelta(days=7)
    start = datetime(now.year, now.month, 1, tzinfo=timezone.utc)
    end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=timezone.utc)
    return start, end


def billed_cost(price_per_hour: float, start: datetime | None, end: datetime, min_billing_s: int) -> float:
    """Per-second billing with the cloud's minimum."""
    if start is None:
        return 0.0
    seconds = max((as_utc(end) - as_utc(start)).total_seconds(), 0.0)
    return price_per_hour * max(seconds, float(min_billing_s)) / 3600.0


def reservation_amount(price_per_hour: float, max_lifetime_s: int, min_billing_s: int) -> float:
    return price_per_hour * max(max_lifetime_s, min_billing_s) / 3600.0


def scope_covers(scope: str, *, pool: str, repository: str) -> bool:
    kind, _, value = scope.partition(":")
    if kind == "global":
        return True
    if kind == "pool":
        return value == pool
    if kind == "repo":
        return value.lower() == repository.lower()
    if kind == "org":
        return value.lower() == repository.split("/", 1)[0].lower()
    return False


@dataclass(frozen=True)
class BudgetView:
    name: str
    scope: str
    period: str
    limit_usd: float
    alert_at: list[float]
    on_exceed: str
    alert_webhook_url: str | None
    spent_usd: float
    reserved_usd: float
    period_start: datetime
    period_end: datetime

    @property
    def remaining_usd(self) -> float:
        return max(self.limit_usd - self.spent_usd - self.reserved_usd, 0.0)

    @property
    def status(self) -> str:
        used = self.spent_usd + self.reserved_usd
        if self.limit_usd <= 0 or used >= self.limit_usd - EPSILON:
            return "exhausted"
        if any(used >= self.limit_usd * f for f in self.alert_at if f < 1):
            return "warning"
        return "ok"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "scope": self.scope,
            "period": self.period,
            "limit_usd": round(self.limit_usd, 6),
            "alert_at": self.alert_at,
            "on_exceed": self.on_exceed,
            "spent_usd": round(self.spent_usd, 6),
            "reserved_usd": round(self.reserved_usd, 6),
            "remaining_usd": round(self.remaining_usd, 6),
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "status": self.status,
        }


AlertSink = Callable[[str, dict], None]


def post_json(url: str, body: dict) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5):  # noqa: S310 - operator-configured URL
        pass


class Budgets:
    def __init__(self, config: Config, store: Store, clock: Clock, *, webhook_sender: AlertSink | None = None):
        self.config = config
        self.store = store
        self.clock = clock
        self.webhook_sender = webhook_sender or post_json
        self._lock = threading.Lock()

    # --- settings ----------------------------------------------------------

    def _merge(self, cfg: BudgetConfig, override: Row | None) -> BudgetConfig:
        """The YAML budget with the admin API's changes (a budget_settings row) on top."""
        if override is None:
            return cfg
        data = cfg.model_dump()
        if override.limit_usd is not None:
            data["limit_usd"] = override.limit_usd
        if override.alert_at is not None:
            data["alert_at"] = override.alert_at
        if override.on_exceed is not None:
            data["on_exceed"] = override.on_exceed
        return BudgetConfig.model_validate(data)

    def effective(self, s: Session) -> list[BudgetConfig]:
        overrides = {o.name: o for o in s.connection().execute(_SETTINGS)}
        return [self._merge(b, overrides.get(b.name)) for b in self.config.budgets]

    def update(self, name: str, *, limit_usd: float | None = None, alert_at: list[float] | None = None, on_exceed: str | None = None) -> BudgetView:
        """Admin change: kept in the store, so it outlives restarts and config reloads."""
        if self.config.budget(name) is None:
            raise KeyError(name)
        with self.store.session() as s:
            row = s.get(BudgetSetting, name)
            if row is None:
                row = BudgetSetting(name=name, updated_at=self.clock.now())
                s.add(row)
            if limit_usd is not None:
                row.limit_usd = float(limit_usd)
            if alert_at is not None:
                row.alert_at = sorted(set(float(x) for x in alert_at))
            if on_exceed is not None:
                row.on_exceed = on_exceed
            row.updated_at = self.clock.now()
        return self.view(name)

    # --- ledger ------------------------------------------------------------

    def _ledger(self, s: Session, name: str, start: datetime, end: datetime) -> tuple[float, float]:
        """(spent in the period, reserved and not settled yet)."""
        spent, reserved = s.execute(_LEDGER, {"budget": name, "start": start, "end": end}).one()
        return float(spent), float(reserved)

    def _view(self, s: Session, b: BudgetConfig) -> BudgetView:
        start, end = period_bounds(b.period, self.clock.now())
        spent, reserved = self._ledger(s, b.name, start, end)
        return BudgetView(
            name=b.name, scope=b.scope, period=b.period, limit_usd=b.limit_usd, alert_at=list(b.alert_at),
            on_exceed=b.on_exceed, alert_webhook_url=b.alert_webhook_url,
            spent_usd=spent, reserved_usd=reserved, period_start=start, period_end=end,
        )

    def views(self) -> list[BudgetView]:
        with self.store.reading() as s:
            out = [self._view(s, b) for b in self.effective(s)]
        for v in out:
            BUDGET_SPENT.labels(v.name).set(v.spent_usd)
            BUDGET_RESERVED.labels(v.name).set(v.reserved_usd)
            BUDGET_LIMIT.labels(v.name).set(v.limit_usd)
        return out

    def view(self, name: str) -> BudgetView:
        for v in self.views():
            if v.name == name:
                return v
        raise KeyError(name)

    def reserve(self, s: Session, *, instance_id: str, pool: str, repository: str, amount_usd: float) -> str | None:
        """Reserve against every covering budget, or return the name of the `block` budget that says no.

        Runs inside the caller's transaction, serialized by a lock, so concurrent
        launches on any replica cannot both take the last dollar.
        """
        self.store.xact_lock(s, "budget")
        now = self.clock.now()
        covering = [b for b in self.effective(s) if scope_covers(b.scope, pool=pool, repository=repository)]
        for b in covering:
            if b.on_exceed != "block":
                continue
            used = sum(self._ledger(s, b.name, *period_bounds(b.period, now)))
            if used + amount_usd > b.limit_usd + EPSILON:
                return b.name
        if covering:
            rows = [{"instance_id": instance_id, "budget": b.name, "amount_usd": amount_usd, "created_at": now} for b in covering]
            s.connection().execute(_RESERVE, rows)
        return None

    def settle(self, s: Session, instance_id: str, cost_usd: float, at: datetime | None = None) -> None:
        """Turn the VM's reservations into spend; the cost is capped by nothing but the truth."""
        at = at or self.clock.now()
        for r in s.scalars(_RESERVATIONS_OF, {"instance_id": instance_id}):
            if r.settled_at is None:
                r.settled_at = at
                r.cost_usd = cost_usd
            elif (r.cost_usd or 0.0) < cost_usd:
                # Settled too early (at $0 for a launch that looked lost, and the VM turned up): spend follows the bill.
                r.cost_usd = cost_usd

    # --- alerts ------------------------------------------------------------

    def check_alerts(self, views: list[BudgetView] | None = None) -> list[tuple[str, float]]:
        """Fire each threshold once per period: a log line, a metric and the optional webhook.

        `views` saves recomputing the ledger when the caller has just read it.
        """
        fired: list[tuple[str, float, BudgetView]] = []
        views = self.views() if views is None else views
        crossed = [
            (v, threshold) for v in views for threshold in v.alert_at
            if v.limit_usd > 0 and v.spent_usd + v.reserved_usd >= v.limit_usd * threshold - EPSILON
        ]
        if crossed:  # most passes cross nothing, and need no write transaction
            with self.store.session() as s:
                for v, threshold in crossed:
                    if s.get(AlertSent, (v.name, v.period_start, float(threshold))) is not None:
                        continue
                    s.add(AlertSent(budget=v.name, period_start=v.period_start, threshold=float(threshold), sent_at=self.clock.now()))
                    fired.append((v.name, threshold, v))
        out = []
        for name, threshold, v in fired:
            BUDGET_ALERTS.labels(name, str(threshold)).inc()
            log.warning(
                "budget threshold crossed",
                extra={"budget": name, "threshold": threshold, "spent_usd": round(v.spent_usd, 4),
                       "reserved_usd": round(v.reserved_usd, 4), "limit_usd": v.limit_usd},
            )
            if v.alert_webhook_url:
                try:
                    self.webhook_sender(v.alert_webhook_url, {"budget": name, "threshold": threshold, **v.as_dict()})
                except Exception as e:  # an alert receiver being down must not stop the reaper
                    log.error("budget alert webhook failed", extra={"budget": name, "error": str(e)[:200]})
            out.append((name, threshold))
        return out
