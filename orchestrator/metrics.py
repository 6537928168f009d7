"""Prometheus metrics of the orchestrator (the GitHub module keeps its own beside its calls)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

WEBHOOK_DELIVERIES = Counter(
    "orchestrator_webhook_deliveries_total", "Webhook deliveries by result", ["result"]
)
JOBS = Gauge("orchestrator_jobs", "Jobs by state", ["state"])
RUNNERS = Gauge("orchestrator_runners", "Runner VMs by state and pool", ["state", "pool"])
WEBHOOK_TO_LAUNCH = Histogram(
    "orchestrator_webhook_to_launch_seconds",
    "Time from a job being queued to its VM launch request returning",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
LAUNCHES = Counter("orchestrator_launches_total", "Launch attempts by candidate and outcome", ["candidate", "outcome"])
REAPER_ACTIONS = Counter("orchestrator_reaper_actions_total", "Reaper actions by kind", ["kind"])
REAPER_PASSES = Counter("orchestrator_reaper_passes_total", "Reaper passes by outcome", ["outcome"])
LEAKED_VMS = Counter(
    "orchestrator_leaked_vms_total",
    "VMs found running past max_lifetime plus one reaper tick; must stay 0",
)
BUDGET_SPENT = Gauge("orchestrator_budget_spent_usd", "Settled spend in the current period", ["budget"])
BUDGET_RESERVED = Gauge("orchestrator_budget_reserved_usd", "Reservations of live VMs", ["budget"])
BUDGET_LIMIT = Gauge("orchestrator_budget_limit_usd", "Budget limit", ["budget"])
BUDGET_ALERTS = Counter("orchestrator_budget_alerts_total", "Budget threshold alerts", ["budget", "threshold"])
BUDGET_BLOCKED = Counter("orchestrator_budget_blocked_total", "Launches held back by a budget", ["budget"])


def refresh_state_gauges(store) -> None:
    """Jobs and runners by state, read from the database when scraped rather than on every reaper pass."""
    from orchestrator.core.states import JobState

    counts = store.count_instances_by_state_and_pool()
    by_state = store.count_jobs_by_state()
    RUNNERS.clear()
    for state, pool, n in counts:
        RUNNERS.labels(state, pool).set(n)
    for state in JobState:
        JOBS.labels(state.value).set(by_state.get(state.value, 0))
