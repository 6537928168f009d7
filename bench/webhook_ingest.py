"""Webhook ingest benchmark: the real app against a bare FastAPI endpoint.

Both run under uvicorn on 127.0.0.1, each in its own process (so the load
generator does not share their interpreter lock). The real app is the full
Orchestrator on SQLite in a temporary directory, with a sandbox pool and the
simulated GitHub, and background=False: nothing launches, so only intake is
measured. Every delivery is a signed `queued` event for a new job id.

Two loads per server: flat out (a fixed number of connections, each sending as
soon as its answer comes), and a fixed rate (open loop: sends go out on
schedule, latency counts from the scheduled time, so a server that falls behind
shows it). Prints one JSON object. Targets (reported, not asserted):
ratio >= 0.5 and p99 <= 25 ms at 200 events/s.

    python bench/webhook_ingest.py [--n 2000] [--rate 200] [--concurrency 16] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from fastapi import Request  # at module level: the bare endpoint's annotation must resolve

SECRET = "bench-webhook-secret"
CONFIG = """
github:
  simulated: true
  webhook_secret: {secret}
  allowed_repositories: ["bench-org/*"]
server:
  listen: 127.0.0.1:{port}
  admin_tokens: [bench-admin-token]
database:
  url: sqlite:///{db}
pools:
  - name: gpu-t4
    labels: [gpu-t4]
    candidates:
      - {{cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.25}}
"""


# --- the servers (child processes) ----------------------------------------------------


def bare_app():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/webhook")
    async def webhook(request: Request):
        await request.body()
        return JSONResponse({"result": "accepted"}, status_code=202)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


def real_app(port: int, db: str):
    from orchestrator.app import Orchestrator, create_app
    from orchestrator.config import load_config_text
    from orchestrator.logging import setup_logging

    setup_logging("WARNING")
    config = load_config_text(CONFIG.format(secret=SECRET, port=port, db=db), "<bench>")
    return create_app(Orchestrator(config), background=False)


def serve(kind: str, port: int, db: str) -> None:
    import uvicorn

    app = bare_app() if kind == "bare" else real_app(port, db)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the load generator --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_bytes(job_id: int) -> bytes:
    payload = {
        "action": "queued",
        "workflow_job": {
            "id": job_id, "run_id": 7000000 + job_id, "run_attempt": 1, "status": "queued", "conclusion": None,
            "labels": ["self-hosted", "gpu-t4"], "runner_id": None, "runner_name": None, "name": "train",
        },
        "repository": {"full_name": "bench-org/models", "name": "models", "private": True, "owner": {"login": "bench-org"}},
        "installation": {"id": 1},
    }
    body = json.dumps(payload).encode()
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    head = (
        "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-GitHub-Event: workflow_job\r\n"
        f"X-GitHub-Delivery: bench-{job_id}\r\nX-Hub-Signature-256: {sig}\r\n\r\n"
    )
    return head.encode() + body


class Conn:
    """One keep-alive HTTP/1.1 connection; a bare client, so the client is not what gets measured."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Conn":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length"), 0)
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def pct(sorted_ms: list[float], p: float) -> float:
    if not sorted_ms:
        return float("nan")
    return round(sorted_ms[min(len(sorted_ms) - 1, int(p / 100 * len(sorted_ms)))], 2)


async def flat_out(port: int, requests: list[bytes], concurrency: int) -> dict:
    conns = [await Conn.open(port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = 0
    it = iter(requests)

    async def worker(conn: Conn) -> None:
        nonlocal errors
        for raw in it:
            t = time.perf_counter()
            status = await conn.send(raw)
            latencies.append((time.perf_counter() - t) * 1000)
            errors += status != 202

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    latencies.sort()
    return {"events_per_s": round(len(requests) / elapsed, 1), "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "errors": errors}


# uvicorn closes a keep-alive connection after 5 s without a request; at a low rate most of the
# pooled connections sit that long, so one idle for longer than this is closed and replaced.
KEEPALIVE_REUSE_S = 2.0


async def fixed_rate(port: int, requests: list[bytes], rate: float) -> dict:
    now = time.perf_counter()
    idle: list[tuple[Conn, float]] = [(await Conn.open(port), now) for _ in range(8)]  # (connection, last used)
    latencies: list[float] = []
    lags: list[float] = []  # how late the generator itself sent: noise from the host, not the server
    errors = 0

    def reusable() -> Conn | None:
        """The most recently used idle connection that the server cannot have timed out."""
        while idle:
            conn, last = idle.pop()
            if time.perf_counter() - last < KEEPALIVE_REUSE_S and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def one(raw: bytes, due: float) -> None:
        nonlocal errors
        lags.append((time.perf_counter() - due) * 1000)
        conn = reusable() or await Conn.open(port)
        status = await conn.send(raw)
        latencies.append((time.perf_counter() - due) * 1000)
        errors += status != 202
        idle.append((conn, time.perf_counter()))

    start = time.perf_counter()
    tasks = []
    for i, raw in enumerate(requests):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(raw, due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for c, _ in idle:
        c.close()
    latencies.sort()
    lags.sort()
    return {
        "offered_per_s": rate, "achieved_per_s": round(len(requests) / elapsed, 1),
        "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "errors": errors,
        "client_lag_p99_ms": pct(lags, 99),
    }


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far: the cost of a load, whatever else runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def measured(proc: subprocess.Popen, n: int, coro) -> dict:
    before = cpu_seconds(proc.pid)
    out = asyncio.run(coro)
    out["server_cpu_ms_per_event"] = round((cpu_seconds(proc.pid) - before) * 1000 / n, 3)
    return out


def start_server(kind: str, workdir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    db = os.path.join(workdir, f"{kind}.db")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", kind, "--port", str(port), "--db", db])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):  # noqa: S310 - loopback
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{kind} server did not start")


def run(n: int, rate: float, concurrency: int, rounds: int) -> dict:
    """Both servers stay up; each round measures them back to back, so a busy host hurts both alike.
    Every figure is the median over the rounds."""
    ids = iter(range(1, 10**9))

    def batch(count: int) -> list[bytes]:
        return [request_bytes(next(ids)) for _ in range(count)]

    per_round: list[dict] = []
    sent = 0
    with tempfile.TemporaryDirectory(prefix="webhook-bench-") as workdir:
        servers = {kind: start_server(kind, workdir) for kind in ("bare", "real")}
        try:
            for kind, (_, port) in servers.items():
                asyncio.run(flat_out(port, batch(200), concurrency))  # warm-up: imports, caches, first pages
                sent += 200
            for _ in range(rounds):
                r: dict = {}
                for kind, (proc, port) in servers.items():
                    r[kind, "flat"] = measured(proc, n, flat_out(port, batch(n), concurrency))
                for kind, (proc, port) in servers.items():
                    r[kind, "rate"] = measured(proc, n, fixed_rate(port, batch(n), rate))
                sent += 4 * n
                per_round.append(r)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
        with sqlite3.connect(os.path.join(workdir, "real.db")) as db:
            recorded = db.execute("SELECT count(*) FROM jobs WHERE state = 'queued'").fetchone()[0]

    def med(kind: str, load: str, key: str) -> float:
        return round(statistics.median(r[kind, load][key] for r in per_round), 2)

    ratios = [r["real", "flat"]["events_per_s"] / r["bare", "flat"]["events_per_s"] for r in per_round]
    return {
        "events_per_s": med("real", "flat", "events_per_s"),
        "p50_ms": med("real", "flat", "p50_ms"),
        "p99_ms": med("real", "flat", "p99_ms"),
        "bare_events_per_s": med("bare", "flat", "events_per_s"),
        "bare_p50_ms": med("bare", "flat", "p50_ms"),
        "bare_p99_ms": med("bare", "flat", "p99_ms"),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_per_round": [round(x, 3) for x in ratios],
        "events_per_s_per_round": [r["real", "flat"]["events_per_s"] for r in per_round],
        "bare_events_per_s_per_round": [r["bare", "flat"]["events_per_s"] for r in per_round],
        "server_cpu_ms_per_event_per_round": [r["real", "flat"]["server_cpu_ms_per_event"] for r in per_round],
        "server_cpu_ms_per_event": med("real", "flat", "server_cpu_ms_per_event"),
        "bare_server_cpu_ms_per_event": med("bare", "flat", "server_cpu_ms_per_event"),
        f"p50_ms_at_{rate:g}_per_s": med("real", "rate", "p50_ms"),
        f"p99_ms_at_{rate:g}_per_s": med("real", "rate", "p99_ms"),
        f"achieved_per_s_at_{rate:g}_per_s": med("real", "rate", "achieved_per_s"),
        f"bare_p50_ms_at_{rate:g}_per_s": med("bare", "rate", "p50_ms"),
        f"bare_p99_ms_at_{rate:g}_per_s": med("bare", "rate", "p99_ms"),
        "client_lag_p99_ms": max(med("real", "rate", "client_lag_p99_ms"), med("bare", "rate", "client_lag_p99_ms")),
        "errors": sum(r[k]["errors"] for r in per_round for k in r),
        "jobs_recorded": recorded,
        "real_deliveries_sent": sent // 2,
        "n": n,
        "rounds": rounds,
        "concurrency": concurrency,
        "background": False,
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="deliveries per load and server (default 2000)")
    p.add_argument("--rate", type=float, default=200.0, help="fixed rate in events/s (default 200)")
    p.add_argument("--concurrency", type=int, default=16, help="connections when flat out (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians (default 3)")
    p.add_argument("--quick", action="store_true", help="300 deliveries per load, one round: a smoke run")
    p.add_argument("--serve", choices=["bare", "real"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.db)
        return 0
    n, rounds = (300, 1) if args.quick else (args.n, args.rounds)
    print(json.dumps(run(n, args.rate, args.concurrency, rounds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
