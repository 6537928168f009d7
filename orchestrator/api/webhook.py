"""POST /webhook: verify, dedupe, parse, record. Nothing here waits on GitHub or a cloud."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re

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


_GUID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


def _delivery_id(header: str | None, body: bytes) -> str:
    """GitHub's delivery GUID; anything odd (or none) is replaced by a digest, which dedupes the same."""
    if header and _GUID_RE.match(header):
        return header
    return "sha256:" + hashlib.sha256((header or "").encode("utf-8", "replace") + b"\0" + body).hexdigest()


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
    guid = _delivery_id(request.headers.get("x-github-delivery"), body)
    if event != "workflow_job":
        return _answer(202, f"ignored:event:{event[:40]}" if event != "ping" else "ping")
    try:
        payload = json.loads(body)
        ev = JobEvent.from_payload(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return _answer(400, "bad-payload", error=str(e)[:200] if isinstance(e, NotAJobPayload) else "body is not JSON")
    result = await _batcher(request.app, orch.intake).submit((ev, (guid, event), "webhook"))
    if isinstance(result, BaseException):
        log.error("could not record webhook", exc_info=result, extra={"delivery": guid, "job": ev.job_id})
        return _answer(503, "store-unavailable")
    return _answer(202, result, job=ev.job_id)


class _Batcher:
    """Group commit: deliveries that arrive while one batch is being written go in the next.

    Runs on the event loop, so its state needs no lock; one batch is in flight per app, in a
    worker thread, and each delivery is answered only once its batch has committed.
    """

    MAX_BATCH = 64

    def __init__(self, intake, loop: asyncio.AbstractEventLoop):
        self.intake = intake
        self.loop = loop
        self.pending: list[tuple[tuple, asyncio.Future]] = []
        self.running = False

    async def submit(self, item: tuple) -> str | BaseException:
        fut = self.loop.create_future()
        self.pending.append((item, fut))
        if not self.running:
            self.running = True
            self.loop.create_task(self._drain())
        return await asyncio.shield(fut)  # a client hanging up must not cancel the others' write

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[: self.MAX_BATCH], self.pending[self.MAX_BATCH :]
                try:
                    results = await run_in_threadpool(self.intake.handle_many, [item for item, _ in batch])
                except BaseException as e:  # handle_many answers per item; this is the unexpected
                    results = [e] * len(batch)
                for (_, fut), result in zip(batch, results):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self.running = False
            for _, fut in self.pending:  # only left here if the loop is shutting down
                if not fut.done():
                    fut.set_result(RuntimeError("webhook intake stopped"))
            self.pending = []


def _batcher(app, intake) -> _Batcher:
    """One per app and event loop (a test client may run each request on a loop of its own)."""
    loop = asyncio.get_running_loop()
    b = getattr(app.state, "webhook_batcher", None)
    if b is None or b.intake is not intake or b.loop is not loop:
        b = app.state.webhook_batcher = _Batcher(intake, loop)
    return b
