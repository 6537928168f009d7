"""Admin API: bearer tokens from server.admin_tokens, compared in constant time."""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from orchestrator.core.budget import billed_cost
from orchestrator.core.clock import as_utc
from orchestrator.core.states import InstanceState

bearer = HTTPBearer(auto_error=False)


def require_admin(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    tokens = request.app.state.orch.admin_tokens
    given = (creds.credentials if creds else "").encode()
    # Check every token (no early exit) so timing says nothing about which one matched.
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given, token)
    if not given or not ok:
        raise HTTPException(status_code=401, detail="admin bearer token required", headers={"WWW-Authenticate": "Bearer"})


router = APIRouter(prefix="/api/v1", tags=["admin"], dependencies=[Depends(require_admin)])


def _iso(dt: datetime | None) -> str | None:
    dt = as_utc(dt)
    return dt.isoformat() if dt else None


class BudgetUpdate(BaseModel):
    limit_usd: float | None = Field(default=None, ge=0, le=1e9)
    alert_at: list[float] | None = Field(default=None, max_length=20)
    on_exceed: Literal["block", "alert"] | None = None


def job_item(job) -> dict:
    return {
        "id": job.id,
        "run_id": job.run_id,
        "run_attempt": job.run_attempt,
        "repository": job.repository,
        "labels": job.labels,
        "pool": job.pool,
        "state": job.state,
        "runner": job.runner_name,
        "reason": job.reason,
        "launch_attempts": job.launch_attempts,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at),
    }


def runner_item(inst, now: datetime) -> dict:
    live = InstanceState(inst.state) not in (InstanceState.TERMINATED, InstanceState.FAILED)
    cost = billed_cost(inst.price_per_hour, as_utc(inst.launched_at), now, inst.min_billing_s) if live and inst.launched_at else inst.cost_usd
    return {
        "id": inst.id,
        "name": inst.id,
        "pool": inst.pool,
        "cloud": inst.cloud,
        "region": inst.location,
        "instance_type": inst.instance_type,
        "spot": inst.spot,
        "instance_id": inst.instance_id,
        "state": inst.state,
        "job_id": inst.job_id,
        "launched_at": _iso(inst.launched_at),
        "cost_usd": round(cost or 0.0, 6),
        "price_per_hour": inst.price_per_hour,
        "reason": inst.reason,
    }


@router.get("/jobs")
async def list_jobs(request: Request, state: str | None = None, limit: int = 500):
    orch = request.app.state.orch
    jobs = await run_in_threadpool(orch.store.jobs)
    items = [job_item(j) for j in jobs if state is None or j.state == state]
    return {"items": items[-max(min(limit, 5000), 1):]}


@router.get("/runners")
async def list_runners(request: Request, state: str | None = None):
    orch = request.app.state.orch
    insts = await run_in_threadpool(orch.store.instances)
    now = orch.clock.now()
    return {"items": [runner_item(i, now) for i in insts if state is None or i.state == state]}


@router.delete("/runners/{runner_id}", responses={404: {"description": "no such runner"}})
async def delete_runner(runner_id: str, request: Request):
    orch = request.app.state.orch
    try:
        result = await run_in_threadpool(orch.teardown_runner, runner_id)
    except KeyError:
        raise HTTPException(status_code=404, detail="no such runner") from None
    return {"result": result}


@router.get("/budgets")
async def list_budgets(request: Request):
    orch = request.app.state.orch
    views = await run_in_threadpool(orch.budgets.views)
    return {"items": [v.as_dict() for v in views]}


@router.put("/budgets/{name}", responses={404: {"description": "no such budget"}})
async def update_budget(name: str, body: BudgetUpdate, request: Request):
    orch = request.app.state.orch
    if body.alert_at is not None and any(x <= 0 for x in body.alert_at):
        raise HTTPException(status_code=422, detail="alert_at fractions must be positive")
    try:
        view = await run_in_threadpool(
            orch.budgets.update, name, limit_usd=body.limit_usd, alert_at=body.alert_at, on_exceed=body.on_exceed
        )
    except KeyError:
        raise HTTPException(status_code=404, detail="no such budget") from None
    orch.scaler.wake()  # a raised limit releases held jobs now
    return view.as_dict()


@router.post("/pools/{name}/pause", responses={404: {"description": "no such pool"}})
async def pause_pool(name: str, request: Request):
    return await _set_paused(request, name, True)


@router.post("/pools/{name}/resume", responses={404: {"description": "no such pool"}})
async def resume_pool(name: str, request: Request):
    return await _set_paused(request, name, False)


async def _set_paused(request: Request, name: str, paused: bool):
    orch = request.app.state.orch
    if orch.config.pool(name) is None:
        raise HTTPException(status_code=404, detail="no such pool")
    await run_in_threadpool(orch.store.set_paused, name, paused)
    if not paused:
        orch.scaler.wake()
    return {"pool": name, "paused": paused}
