"""The HTTP plumbing shared by the fake cloud servers: JSON in, JSON out, state elsewhere."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class JsonHandler(BaseHTTPRequestHandler):
    """Hands each request to `state.handle(method, path, query, body, headers)`.

    `handle` answers (status, payload) or (status, payload, headers); a None payload sends no body.
    """

    state: Any
    protocol_version = "HTTP/1.1"
    content_type = "application/json; charset=utf-8"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as two writes; without this, Nagle holds the second.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args: Any) -> None:  # quiet test output
        pass

    def extra_headers(self) -> dict[str, str]:
        return {}

    def _serve(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        answer = self.state.handle(self.command, url.path, parse_qs(url.query), body,
                                   {k.lower(): v for k, v in self.headers.items()})
        status, payload, headers = answer if len(answer) == 3 else (*answer, {})
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in {**self.extra_headers(), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if data:
            self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve


class FakeServer:
    """Start/stop on 127.0.0.1 at a free port; subclasses set `handler` and implement `handle`."""

    handler: type[JsonHandler] = JsonHandler
    _server: ThreadingHTTPServer | None = None

    def start(self):
        fake = self

        class Handler(self.handler):  # type: ignore[misc,valid-type]
            state = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"
