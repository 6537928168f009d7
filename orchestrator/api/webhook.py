"""POST /webhook: verify, dedupe, parse, record. Nothing here waits on GitHub or a cloud.

This is the one hot path of the service (GitHub may send bursts of thousands of deliveries), so it
is kept cheap per delivery: the route skips FastAPI's per-request machinery (it has no parameters
to solve), answers with prebuilt JSON bytes, and records deliveries in group commits.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from orchestrator.core.intake import JobEvent, NotAJobPayload
from orchestrator.metrics import WEBHOOK_DELIVERIES

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024


class _WebhookRoute(APIRoute):
    """An APIRoute, so /webhook stays in the OpenAPI schema, but a POST goes straight to the
    handler: it has no parameters, so FastAPI's per-request work (dependency solving, exit
    stacks, response handling) is pure overhead here. Other methods still get FastAPI's own
    answer (405)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await super().handle(scope, receive, send)
            return
        response = await _handle(scope, receive)
        await response(scope, receive, send)


router = APIRouter(route_class=_WebhookRoute)


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def signature_ok(secret: bytes, body: bytes, header: str | None) -> bool:
    if not header or not header.startswith("sha256="):
        return False  # X-Hub-Signature (sha1) alone counts as missing
    return hmac.compare_digest(signature(secret, body).encode(), header.strip().encode("utf-8", "replace"))


# --- answers -------------------------------------------------------------------------

# Result prefix -> its counter child, as `.labels()` takes a lock and a lookup per call.
# (WEBHOOK_DELIVERIES is never cleared, so a child once made stays the one that is exported.)
_counters: dict[str, Any] = {}


def _count(result: str) -> None:
    kind = result.split(":", 1)[0]
    child = _counters.get(kind)
    if child is None:
        child = _counters[kind] = WEBHOOK_DELIVERIES.labels(kind)
    child.inc()


def _render(content: dict) -> bytes:
    """The bytes JSONResponse would send."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


_result_prefix: dict[str, bytes] = {}  # intake result -> b'{"result":"<result>","job":'; a small fixed set


def _json(body: bytes, status: int) -> Response:
    return Response(body, status_code=status, media_type="application/json")


def _answer(status: int, result: str, **extra) -> Response:
    _count(result)
    return _json(_render({"result": result, **extra}), status)


def _accepted(result: str, job_id: int) -> Response:
    """The common answer, 202 with the intake's result and the job id, without json.dumps."""
    _count(result)
    prefix = _result_prefix.get(result)
    if prefix is None:
        prefix = _result_prefix[result] = _render({"result": result})[:-1] + b',"job":'
    return _json(b"%s%d}" % (prefix, job_id), 202)


# --- the request -----------------------------------------------------------------------

_WANTED = {
    b"content-length": "length",
    b"x-hub-signature-256": "signature",
    b"x-github-event": "event",
    b"x-github-delivery": "delivery",
}


def _headers(scope: Scope) -> dict[str, str]:
    """The few headers this route reads, in one pass (the first of repeated ones, as Starlette's)."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = _WANTED.get(name)
        if key is not None and key not in found:
            found[key] = value.decode("latin-1")
    return found


async def _read_capped(receive: Receive, declared: str | None) -> bytes | None:
    """The body, or None once it passes MAX_BODY (never buffered whole).

    A declared length over the cap is refused before reading; the size is still counted as the
    body arrives, for a chunked body or a length that lies.
    """
    if declared is not None:
        try:
            if int(declared) > MAX_BODY:
                return None
        except ValueError:
            return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        if not message.get("more_body", False):
            # Usually the whole body comes in one message: no copy then.
            return b"".join((*chunks, chunk)) if chunks else chunk
        chunks.append(chunk)


_GUID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


def _delivery_id(header: str | None, body: bytes) -> str:
    """GitHub's delivery GUID; anything odd (or none) is replaced by a digest, which dedupes the same."""
    if header and _GUID_RE.match(header):
        return header
    return "sha256:" + hashlib.sha256((header or "").encode("utf-8", "replace") + b"\0" + body).hexdigest()


@router.post("/webhook", status_code=202)
async def webhook(request: Request) -> Response:
    """GitHub webhook deliveries (workflow_job; others are acknowledged and ignored)."""
    return await _handle(request.scope, request.receive)


async def _handle(scope: Scope, receive: Receive) -> Response:
    orch = scope["app"].state.orch
    headers = _headers(scope)
    body = await _read_capped(receive, headers.get("length"))
    if body is None:
        return _answer(413, "too-large")
    if not signature_ok(orch.webhook_secret, body, headers.get("signature")):
        log.warning("webhook signature missing or wrong", extra={"delivery": headers.get("delivery", "")[:100]})
        return _answer(401, "bad-signature")
    event = headers.get("event", "")
    guid = _delivery_id(headers.get("delivery"), body)
    if event != "workflow_job":
        return _answer(202, f"ignored:event:{event[:40]}" if event != "ping" else "ping")
    try:
        payload = json.loads(body)
        ev = JobEvent.from_payload(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return _answer(400, "bad-payload", error=str(e)[:200] if isinstance(e, NotAJobPayload) else "body is not JSON")
    result = await _batcher(scope["app"], orch.intake).submit((ev, (guid, event), "webhook"))
    if isinstance(result, BaseException):
        log.error("could not record webhook", exc_info=result, extra={"delivery": guid, "job": ev.job_id})
        return _answer(503, "store-unavailable")
    return _accepted(result, ev.job_id)


# --- group commit -------------------------------------------------------------------------


class _Batcher:
    """Group commit: deliveries that arrive while one batch is being written go in the next.

    Runs on the event loop, so its state needs no lock; one batch is in flight per app, in a
    worker thread, and each delivery is answered only once its batch has committed.

    A batch costs a transaction, a few statements and two thread hops whatever its size, several
    times what one more delivery adds. Busy senders come as waves (one delivery per connection),
    so a batch smaller than the last one first waits, GATHER_S at most, for the rest of its wave;
    without that a batch of one and a batch of fifteen take turns. After a lone delivery the next
    one does not wait.
    """

    MAX_BATCH = 64
    GATHER_S = 0.001

    def __init__(self, intake, loop: asyncio.AbstractEventLoop):
        self.intake = intake
        self.loop = loop
        self.pending: list[tuple[tuple, asyncio.Future]] = []
        self.running = False
        self.expected = 1  # the last batch's size: how many deliveries a wave brings
        self.gathered: asyncio.Future | None = None  # done once `expected` are pending, or on time

    async def submit(self, item: tuple) -> str | BaseException:
        fut = self.loop.create_future()
        self.pending.append((item, fut))
        if not self.running:
            self.running = True
            self.loop.create_task(self._drain())
        elif self.gathered is not None and len(self.pending) >= self.expected:
            self._gathered()
        # No shield needed: the write runs in _drain, which a cancelled caller does not touch,
        # and _drain skips futures that are already done.
        return await fut

    def _gathered(self) -> None:
        if self.gathered is not None and not self.gathered.done():
            self.gathered.set_result(None)

    async def _gather(self) -> None:
        if len(self.pending) >= self.expected:
            return
        self.gathered = self.loop.create_future()
        timer = self.loop.call_later(self.GATHER_S, self._gathered)
        try:
            await self.gathered
        finally:
            timer.cancel()
            self.gathered = None

    async def _drain(self) -> None:
        try:
            while self.pending:
                await self._gather()
                batch, self.pending = self.pending[: self.MAX_BATCH], self.pending[self.MAX_BATCH :]
                self.expected = len(batch)
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
