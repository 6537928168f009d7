"""The VM-facing API: the one-time bootstrap and lifecycle events."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from orchestrator.core.lifecycle import NotReady, Unauthorized, UnknownEvent

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["vm"])


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class BootstrapResponse(BaseModel):
    instance_id: str
    runner_name: str
    jit_config: str
    instance_token: str


class VmEvent(BaseModel):
    event: str = Field(description="job-started | job-completed | spot-interruption | preflight-failed")
    detail: dict = Field(default_factory=dict)


@router.post("/bootstrap", response_model=BootstrapResponse, responses={401: {"description": "token unknown, replayed or expired"}, 503: {"description": "runner config not ready yet; retry"}})
async def bootstrap(request: Request):
    orch = request.app.state.orch
    try:
        result = await run_in_threadpool(orch.lifecycle.bootstrap, _bearer(request))
    except Unauthorized as e:
        log.warning("bootstrap refused", extra={"why": str(e)})
        return JSONResponse({"detail": str(e)}, status_code=401)
    except NotReady as e:
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": "5"})
    return BootstrapResponse(**result.__dict__)


@router.post("/instances/{instance_id}/events", responses={401: {"description": "bad instance token"}, 400: {"description": "unknown event"}})
async def instance_event(instance_id: str, body: VmEvent, request: Request):
    orch = request.app.state.orch
    try:
        result = await run_in_threadpool(orch.lifecycle.event, instance_id, _bearer(request), body.event, body.detail)
    except Unauthorized as e:
        log.warning("instance event refused", extra={"instance": instance_id[:64], "why": str(e)})
        return JSONResponse({"detail": str(e)}, status_code=401)
    except UnknownEvent as e:
        return JSONResponse({"detail": str(e)}, status_code=400)
    return {"result": result}
