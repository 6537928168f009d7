"""`orchestrator demo`: the real service on SQLite, the sandbox cloud and a
simulated GitHub that sends signed webhooks over HTTP; sandbox VMs talk to the
VM-facing API over HTTP too. No credentials, no network beyond loopback."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import tempfile
import threading
import time
import urllib.request

from orchestrator.config import load_config_text

DEMO_SECRET = "demo-webhook-secret"
DEMO_CONFIG = """
github:
  simulated: true
  webhook_secret: {secret}
  allowed_repositories: ["demo-org/*"]
  poll_interval: 10s
server:
  listen: 127.0.0.1:{port}
  public_url: http://127.0.0.1:{port}
  admin_tokens: [demo-admin-token]
  reaper_interval: 2s
database:
  url: sqlite:///{db}
clouds:
  sandbox: {{boot_time: 3s, boot_jitter: 1s, min_billing: 60s}}
pools:
  - name: gpu-sim
    labels: [gpu-sim]
    max_runners: 6
    idle_timeout: 20s
    boot_timeout: 60s
    max_lifetime: 5m
    candidates:
      - {{cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.25}}
      - {{cloud: sandbox, instance_type: gpu-t4-sim, spot: false, price_per_hour: 0.53}}
budgets:
  - {{name: demo-daily, scope: global, period: daily, limit_usd: 5, on_exceed: block}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_deliver(base_url: str, secret: bytes):
    def deliver(event: str, guid: str, payload: dict) -> None:
        body = json.dumps(payload).encode()
        sig = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        req = urllib.request.Request(
            base_url + "/webhook", data=body, method="POST",
            headers={"X-GitHub-Event": event, "X-GitHub-Delivery": guid, "X-Hub-Signature-256": sig, "Content-Type": "application/json"},
        )

        def send():
            try:
                with urllib.request.urlopen(req, timeout=10):  # noqa: S310 - loopback
                    pass
            except Exception as e:
                logging.getLogger(__name__).info("demo webhook not delivered: %s", type(e).__name__)

        threading.Thread(target=send, daemon=True).start()

    return deliver


def _table(orch, started: float, jobs_total: int):
    from rich.table import Table

    from orchestrator.api.admin import runner_item

    grid = Table.grid(padding=(0, 2))
    jt = Table(title="jobs", show_lines=False)
    for col in ("id", "labels", "state", "runner", "reason"):
        jt.add_column(col)
    for j in orch.store.jobs()[-12:]:
        jt.add_row(str(j.id), ",".join(j.labels), j.state, (j.runner_name or "")[-18:], j.reason or "")
    rt = Table(title="runners")
    for col in ("name", "type", "spot", "state", "job", "cost $"):
        rt.add_column(col)
    now = orch.clock.now()
    for inst in orch.store.instances()[-12:]:
        item = runner_item(inst, now)
        rt.add_row(inst.id[-22:], inst.instance_type, "yes" if inst.spot else "no", inst.state, str(inst.job_id or ""), f"{item['cost_usd']:.4f}")
    bt = Table(title=f"budgets  (t+{time.monotonic() - started:4.0f}s, {jobs_total} jobs fed)")
    for col in ("name", "spent $", "reserved $", "limit $", "status"):
        bt.add_column(col)
    for v in orch.budgets.views():
        bt.add_row(v.name, f"{v.spent_usd:.4f}", f"{v.reserved_usd:.4f}", f"{v.limit_usd:.2f}", v.status)
    grid.add_row(jt)
    grid.add_row(rt)
    grid.add_row(bt)
    return grid


def run_demo(duration_s: float = 60.0, jobs: int = 8, db: str | None = None) -> int:
    import uvicorn
    from rich.console import Console
    from rich.live import Live

    from orchestrator.app import Orchestrator, create_app
    from orchestrator.logging import register_config_secrets, setup_logging
    from orchestrator.sim.world import HttpVmApi

    tmp = tempfile.TemporaryDirectory(prefix="orchestrator-demo-")
    db_path = db or os.path.join(tmp.name, "demo.db")
    port = _free_port()
    config = load_config_text(DEMO_CONFIG.format(secret=DEMO_SECRET, port=port, db=db_path), "<demo>")
    setup_logging("WARNING", stream=open(os.path.join(tmp.name, "demo.log"), "w"))
    register_config_secrets(config)
    orch = Orchestrator(config)
    base = config.server.public_url
    orch.github.deliver = _http_deliver(base, DEMO_SECRET.encode())
    orch.guest.vm_api = HttpVmApi(base)

    server = uvicorn.Server(uvicorn.Config(create_app(orch, background=True), host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)

    script = [
        (0.5 + i * 1.5, ["self-hosted", "gpu-sim"] if i % 4 != 3 else ["self-hosted", f"gpu-sim--run{i}"], 6 + (i % 3) * 3)
        for i in range(jobs)
    ] + [(2.0, ["self-hosted", "no-such-pool"], 5)]
    fed = 0
    started = time.monotonic()
    console = Console()
    code = 0
    try:
        with Live(_table(orch, started, fed), console=console, refresh_per_second=4, transient=False) as live:
            while time.monotonic() - started < duration_s:
                t = time.monotonic() - started
                while script and script[0][0] <= t:
                    _, labels, dur = script.pop(0)
                    orch.github.enqueue_job("demo-org/models", labels, dur)
                    fed += 1
                live.update(_table(orch, started, fed))
                if not script and _settled(orch):
                    break
                time.sleep(0.25)
            live.update(_table(orch, started, fed))
    except KeyboardInterrupt:
        code = 130
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        _summary(console, orch)
        orch.store.close()
        tmp.cleanup()
    return code


def _settled(orch) -> bool:
    from orchestrator.core.states import INSTANCE_LIVE, JOB_FINAL, JobState

    jobs = orch.store.jobs()
    live = [i for i in orch.store.instances() if i.state in {s.value for s in INSTANCE_LIVE}]
    return bool(jobs) and all(JobState(j.state) in JOB_FINAL for j in jobs) and not live


def _summary(console, orch) -> None:
    jobs = orch.store.jobs()
    done = sum(j.state == "completed" for j in jobs)
    vms = orch.store.instances()
    live = [i for i in vms if i.state not in ("terminated", "failed")]
    cost = sum(i.cost_usd or 0 for i in vms)
    console.print(
        f"demo finished: {done}/{sum(j.state != 'ignored' for j in jobs)} routed jobs completed, "
        f"{len(vms)} VMs launched, {len(live)} still live, spend ${cost:.4f}"
    )
