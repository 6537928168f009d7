"""POST /webhook: verify, dedupe, parse, record. Nothing here waits on GitHub or a cloud."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from orchestrator.core.intake import JobEvent, NotAJobPayload
from orchestrator.metrics import WEBHOOK_DELIVERIES

log = logging.getLogger(__name__)
router = APIRouter()

MAX_BODY = 1024 * 1024


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def signature_ok(secret: bytes, body: bytes, header: str | None) -> bool:
    if not header or not header.startswith("sha256="):
        return False  # X-Hub-Signature (sha1) alone counts as missing
    return hmac.compare_digest(signature(secret, body).encode(), header.strip().encode("utf-8", "replace"))


def _answer(status: int, result: str, **extra) -> JSONResponse:
    WEBHOOK_DELIVERIES.labels(result.split(":", 1)[0]).inc()
    return JSONResponse({"result": result, **extra}, status_code=status)


async def _read_capped(request: Request) -> bytes | None:
    """The body, or None once it passes MAX_BODY (never buffered whole)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > MAX_BODY:
                return None
        except ValueError:
            return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return None
    return bytes(body)


@router.post("/webhook", status_code=202)
async def webhook(request: Request) -> JSONResponse:
    orch = request.app.state.orch
    body = await _read_capped(request)
    if body is None:
        return _answer(413, "too-large")
    if not signature_ok(orch.webhook_secret, body, request.headers.get("x-hub-signature-256")):
        log.warning("webhook signature missing or wrong", extra={"delivery": request.headers.get("x-github-delivery", "")[:100]})
        return _answer(401, "bad-signature")
    event = request.headers.get("x-github-event", "")
    guid = (request.headers.get("x-github-delivery") or hashlib.sha256(body).hexdigest())[:100]
    if event != "workflow_job":
        return _answer(202, f"ignored:event:{event[:40]}" if event != "ping" else "ping")
    try:
        payload = json.loads(body)
        ev = JobEvent.from_payload(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return _answer(400, "bad-payload", error=str(e)[:200] if isinstance(e, NotAJobPayload) else "body is not JSON")
    try:
        result = await run_in_threadpool(orch.intake.handle, ev, delivery=(guid, event))
    except Exception:
        log.exception("could not record webhook", extra={"delivery": guid, "job": ev.job_id})
        return _answer(503, "store-unavailable")
    return _answer(202, result, job=ev.job_id)
