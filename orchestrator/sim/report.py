"""The simulator's figures, computed the same way for our run and for every baseline,
from what the simulated world saw (VMs billed, jobs started), never from our own
bookkeeping."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone

from orchestrator.config import Config
from orchestrator.core.budget import period_bounds, scope_covers


@dataclass
class JobRecord:
    queued_at: float                  # queued at GitHub
    decided_at: float | None = None   # first launch request for it, or its start on an existing runner
    known_at: float | None = None     # when the orchestrator first heard of it (webhook or backstop); None: at once
    started_at: float | None = None   # first start of any attempt
    completed: bool = False           # some attempt succeeded


@dataclass
class VmRecord:
    launched_at: float
    booted_at: float | None
    ended_at: float | None            # None: still alive when the run ended
    price_per_hour: float
    on_demand_price_per_hour: float
    busy_s: float
    pool: str
    repository: str | None = None
    interrupted: bool = False


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def dist(values: list[float], scale: float = 1.0, qs=(0.5, 0.95, 0.99), digits: int = 3) -> dict:
    out = {}
    for q in qs:
        v = percentile(values, q)
        out["max" if q == 1.0 else f"p{int(q * 100)}"] = None if v is None else round(v * scale, digits)
    return out


def billed_s(vm: VmRecord, end: float, min_billing: float) -> float:
    stop = vm.ended_at if vm.ended_at is not None else end
    return max(stop - vm.launched_at, float(min_billing))


def budget_overshoot(config: Config, vms: list[VmRecord], end: float, min_billing: float) -> tuple[float, dict]:
    """Max over block budgets and their periods of billed cost minus limit (>= 0).

    A VM's cost counts in the period it ended in, as the orchestrator's ledger settles it.
    """
    worst = 0.0
    per: dict[str, float] = {}
    for b in config.budgets:
        if b.on_exceed != "block":
            continue
        spent: dict[datetime, float] = {}
        for vm in vms:
            if not scope_covers(b.scope, pool=vm.pool, repository=vm.repository or "-/-"):
                continue
            stop = vm.ended_at if vm.ended_at is not None else end
            start, _ = period_bounds(b.period, datetime.fromtimestamp(stop, tz=timezone.utc))
            spent[start] = spent.get(start, 0.0) + vm.price_per_hour * billed_s(vm, end, min_billing) / 3600.0
        over = max((v - b.limit_usd for v in spent.values()), default=0.0)
        per[b.name] = round(max(spent.values(), default=0.0), 6)
        worst = max(worst, over)
    return round(max(worst, 0.0), 6), per


def figures(
    *,
    policy: str,
    config: Config,
    jobs: list[JobRecord],
    vms: list[VmRecord],
    end: float,
    min_billing: float,
    github_calls: int,
    cloud_api_calls: int,
    duplicate_vms: int,
    leaked_vms: int,
    extra: dict | None = None,
) -> dict:
    waits = [j.started_at - j.queued_at for j in jobs if j.started_at is not None]
    # Ours is what the orchestrator controls: from hearing of a job to requesting its VM. A lost
    # webhook's wait until the backstop finds the job is detection, reported beside it.
    decisions = [j.decided_at - _known(j) for j in jobs if j.decided_at is not None]
    from_queued = [j.decided_at - j.queued_at for j in jobs if j.decided_at is not None]
    detections = [_known(j) - j.queued_at for j in jobs]
    boots = [vm.booted_at - vm.launched_at for vm in vms if vm.booted_at is not None]
    billed = sum(billed_s(vm, end, min_billing) for vm in vms)
    busy = sum(vm.busy_s for vm in vms)
    boot_total = 0.0
    for vm in vms:
        stop = vm.ended_at if vm.ended_at is not None else end
        boot_total += (min(vm.booted_at, stop) if vm.booted_at is not None else stop) - vm.launched_at
    cost = sum(vm.price_per_hour * billed_s(vm, end, min_billing) / 3600.0 for vm in vms)
    od_cost = sum(vm.on_demand_price_per_hour * billed_s(vm, end, min_billing) / 3600.0 for vm in vms)
    overshoot, spent_by_budget = budget_overshoot(config, vms, end, min_billing)
    n = len(jobs)
    out = {
        "policy": policy,
        "jobs": n,
        "completed_jobs": sum(j.completed for j in jobs),
        "lost_jobs": sum(not j.completed for j in jobs),
        "duplicate_vms": duplicate_vms,
        "leaked_vms": leaked_vms,
        "budget_overshoot_usd": overshoot,
        "budget_spent_usd": spent_by_budget,
        "wait_s": dist(waits),
        "decision_delay_ms": dist(decisions, 1000.0, (0.5, 0.95, 0.99), 1),
        "detection_delay_s": dist(detections, 1.0, (0.5, 0.95, 0.99, 1.0)),
        "queued_to_launch_request_ms": dist(from_queued, 1000.0, (0.5, 0.95, 0.99), 1),
        "boot_s": dist(boots),
        "vms": len(vms),
        "interrupted_vms": sum(vm.interrupted for vm in vms),
        "billed_vm_s": round(billed, 1),
        "job_vm_s": round(busy, 1),
        "boot_vm_s": round(boot_total, 1),
        # Idle as GitHub means it: a booted runner with no job (and minimum billing past the VM's end).
        "idle_vm_s": round(max(billed - busy - boot_total, 0.0), 1),
        # Everything billed outside a job, boot included.
        "not_in_job_vm_s": round(max(billed - busy, 0.0), 1),
        "billed_over_job_plus_boot": round(billed / (busy + boot_total), 4) if busy + boot_total > 0 else None,
        "cost_usd": round(cost, 4),
        "on_demand_cost_usd": round(od_cost, 4),
        "github_calls": github_calls,
        "github_calls_per_job": round(github_calls / n, 3) if n else 0.0,
        "cloud_api_calls": cloud_api_calls,
    }
    out.update(extra or {})
    return out


def _known(j: JobRecord) -> float:
    return j.queued_at if j.known_at is None else max(j.known_at, j.queued_at)


def _ratio(a, b) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return None if a else 1.0
    return round(a / b, 4)


def ratios(ours: dict, other: dict) -> dict:
    """Ours divided by the baseline's: below 1 is better for us."""
    return {
        "cost_usd": _ratio(ours["cost_usd"], other["cost_usd"]),
        "billed_vm_s": _ratio(ours["billed_vm_s"], other["billed_vm_s"]),
        "idle_vm_s": _ratio(ours["idle_vm_s"], other["idle_vm_s"]),
        "wait_p50_s": _ratio(ours["wait_s"]["p50"], other["wait_s"]["p50"]),
        "wait_p95_s": _ratio(ours["wait_s"]["p95"], other["wait_s"]["p95"]),
    }


def targets(report: dict) -> dict:
    """The project's targets, read from one report; `met` is a plain comparison."""

    def t(value, limit, ok):
        return {"value": value, "target": limit, "met": bool(ok) if value is not None else False}

    billed = report["billed_vm_s"] or 0.0
    idle_share = report["idle_vm_s"] / billed if billed else 0.0
    out = {
        "lost_jobs": t(report["lost_jobs"], "== 0", report["lost_jobs"] == 0),
        "leaked_vms": t(report["leaked_vms"], "== 0", report["leaked_vms"] == 0),
        "budget_overshoot_usd": t(report["budget_overshoot_usd"], "== 0", report["budget_overshoot_usd"] == 0),
        "billed_over_job_plus_boot": t(report["billed_over_job_plus_boot"], "<= 1.05",
                                       report["billed_over_job_plus_boot"] is not None and report["billed_over_job_plus_boot"] <= 1.05),
        "idle_share": t(round(idle_share, 5), "<= 0.01", idle_share <= 0.01),
        "decision_delay_p99_ms": t(report["decision_delay_ms"]["p99"], "<= 250",
                                   report["decision_delay_ms"]["p99"] is not None and report["decision_delay_ms"]["p99"] <= 250),
    }
    base = report.get("baselines", {})
    if "ideal" in base and base["ideal"]["wait_s"]["p95"] is not None and report["wait_s"]["p95"] is not None:
        ideal = base["ideal"]["wait_s"]["p95"]
        out["wait_p95_vs_ideal"] = t(_ratio(report["wait_s"]["p95"], ideal), "<= 1.10", report["wait_s"]["p95"] <= ideal * 1.10)
    if "cml" in base:
        r = _ratio(report["cost_usd"], base["cml"]["cost_usd"])
        out["cost_vs_cml"] = t(r, "<= 0.5 (bursty)", r is not None and r <= 0.5)
    return out


# --- people ------------------------------------------------------------------


def render_table(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    policies = [("ours", report)] + [(name, fig) for name, fig in report.get("baselines", {}).items()]
    table = Table(title=f"simulate: {report.get('trace', '')}  ({report['jobs']} jobs, seed {report.get('seed')})")
    table.add_column("figure")
    for name, _ in policies:
        table.add_column(name, justify="right")

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    rows = [
        ("lost jobs", lambda f: f["lost_jobs"]),
        ("duplicate VMs", lambda f: f["duplicate_vms"]),
        ("leaked VMs", lambda f: f["leaked_vms"]),
        ("budget overshoot $", lambda f: f["budget_overshoot_usd"]),
        ("wait p50 s", lambda f: f["wait_s"]["p50"]),
        ("wait p95 s", lambda f: f["wait_s"]["p95"]),
        ("wait p99 s", lambda f: f["wait_s"]["p99"]),
        ("decision p50 ms", lambda f: f["decision_delay_ms"]["p50"]),
        ("decision p99 ms", lambda f: f["decision_delay_ms"]["p99"]),
        ("boot p95 s", lambda f: f["boot_s"]["p95"]),
        ("VMs", lambda f: f["vms"]),
        ("billed VM-s", lambda f: f["billed_vm_s"]),
        ("boot VM-s", lambda f: f["boot_vm_s"]),
        ("idle VM-s (booted, no job)", lambda f: f["idle_vm_s"]),
        ("billed / (job+boot)", lambda f: f["billed_over_job_plus_boot"]),
        ("cost $", lambda f: f["cost_usd"]),
        ("on-demand cost $", lambda f: f["on_demand_cost_usd"]),
        ("GitHub calls / job", lambda f: f["github_calls_per_job"]),
        ("cloud API calls", lambda f: f["cloud_api_calls"]),
        ("ours / this: cost", lambda f: f.get("ratio", {}).get("cost_usd") if f is not report else None),
        ("ours / this: wait p95", lambda f: f.get("ratio", {}).get("wait_p95_s") if f is not report else None),
    ]
    for label, get in rows:
        table.add_row(label, *[fmt(get(f)) for _, f in policies])
    console.print(table)
    tt = Table(title="targets")
    for col in ("target", "value", "goal", "met"):
        tt.add_column(col)
    for name, t in report.get("targets", {}).items():
        tt.add_row(name, fmt(t["value"]), t["target"], "yes" if t["met"] else "no")
    console.print(tt)
