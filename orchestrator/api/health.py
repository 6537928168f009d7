"""Probes and Prometheus."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator.metrics import refresh_state_gauges

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    ok = await run_in_threadpool(request.app.state.orch.store.ping)
    return JSONResponse({"status": "ready" if ok else "database unreachable"}, status_code=200 if ok else 503)


@router.get("/metrics")
def metrics(request: Request):
    try:
        refresh_state_gauges(request.app.state.orch.store)
    except Exception:  # the rest of the metrics still help when the database does not answer
        log.warning("could not read job and runner counts for /metrics", exc_info=True)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
