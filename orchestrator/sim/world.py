"""Wiring of the simulated world: the sandbox cloud's guest program, which plays
the part of cloud_init/bootstrap.sh, against the orchestrator's VM API and the
simulated GitHub."""

from __future__ import annotations

import json
import logging
import math
import random
import urllib.error
import urllib.request
from typing import Protocol

from orchestrator.core.lifecycle import Lifecycle, NotReady
from orchestrator.github.simulated import SimJob, SimulatedGitHub
from orchestrator.providers.sandbox import SandboxVM, SandboxWorld

log = logging.getLogger(__name__)


class VmApi(Protocol):
    def bootstrap(self, token: str) -> dict: ...

    def event(self, name: str, token: str, kind: str, detail: dict | None = None) -> None: ...


class DirectVmApi:
    """Calls the lifecycle service in-process (simulator, tests)."""

    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle

    def bootstrap(self, token: str) -> dict:
        r = self.lifecycle.bootstrap(token)
        return {"instance_id": r.instance_id, "jit_config": r.jit_config, "instance_token": r.instance_token}

    def event(self, name: str, token: str, kind: str, detail: dict | None = None) -> None:
        self.lifecycle.event(name, token, kind, detail or {})


class HttpVmApi:
    """Calls the VM-facing HTTP API, exactly as bootstrap.sh does (demo)."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def _post(self, path: str, token: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - our own loopback server
            return json.loads(resp.read() or b"{}")

    def bootstrap(self, token: str) -> dict:
        try:
            return self._post("/api/v1/bootstrap", token, {})
        except urllib.error.HTTPError as e:
            if e.code == 503:
                raise NotReady("runner config not ready yet") from None
            raise

    def event(self, name: str, token: str, kind: str, detail: dict | None = None) -> None:
        self._post(f"/api/v1/instances/{name}/events", token, {"event": kind, "detail": detail or {}})


def interruption_delay(rng: random.Random, rate_per_hour: float) -> float | None:
    """Seconds until a spot VM is reclaimed: `rate_per_hour` is the chance it happens within an hour
    of running (a constant hazard, so long-lived VMs are hit more often than short ones); 1 = soon."""
    if rate_per_hour <= 0:
        return None
    if rate_per_hour >= 1:
        return rng.uniform(30, 900)
    return rng.expovariate(-math.log(1.0 - rate_per_hour) / 3600.0)


class Guest:
    """What a sandbox VM does once booted: bootstrap once, run one job, power off."""

    def __init__(self, world: SandboxWorld, github: SimulatedGitHub, vm_api: VmApi, *, rng: random.Random | None = None):
        self.world = world
        self.github = github
        self.vm_api = vm_api
        self.rng = rng or random.Random(world.settings.seed + 1)
        world.guest = self
        world.on_terminated = lambda vm: github.runner_lost(vm.name)

    def __call__(self, vm: SandboxVM) -> None:
        timeline = self.world.timeline
        lifetime = float(vm.metadata.get("max_lifetime_s", 0) or 0)
        if lifetime and timeline is not None:
            # The in-VM watchdog: shutdown -h +max_lifetime, armed first thing.
            timeline.at(vm.launched_at + lifetime, lambda: self.world.terminate(vm.instance_id))
        self._bootstrap(vm, tries=8)

    def _bootstrap(self, vm: SandboxVM, tries: int) -> None:
        timeline = self.world.timeline
        token = vm.metadata.get("bootstrap_token", "")
        try:
            res = self.vm_api.bootstrap(token)
        except NotReady:
            if tries > 1 and timeline is not None:  # bootstrap.sh retries a 503 with backoff
                timeline.after(5, lambda: self._bootstrap(vm, tries - 1) if vm.state == "running" else None)
            else:
                self.world.terminate(vm.instance_id)
            return
        except Exception as e:  # 401 or unreachable: bootstrap.sh powers off
            log.info("sandbox guest: bootstrap refused, powering off", extra={"instance": vm.name, "error": type(e).__name__})
            self.world.terminate(vm.instance_id)
            return
        instance_token = res["instance_token"]
        vm.guest_state["token"] = instance_token
        if vm.spot and timeline is not None:
            delay = interruption_delay(self.rng, self.world.settings.spot_interruption_rate)
            if delay is not None:
                timeline.after(delay, lambda: self.interrupt(vm))

        def started(job: SimJob) -> None:
            self._post(vm, "job-started", {"job_id": job.id})

        def completed(job: SimJob) -> None:
            self._post(vm, "job-completed", {"job_id": job.id, "conclusion": job.conclusion})
            self.world.terminate(vm.instance_id)  # run.sh exited: poweroff

        self.github.runner_online(res["jit_config"], on_started=started, on_completed=completed)

    def interrupt(self, vm: SandboxVM) -> None:
        if vm.state != "running":
            return
        self._post(vm, "spot-interruption", {})
        self.world.terminate(vm.instance_id, interrupted=True)

    def _post(self, vm: SandboxVM, kind: str, detail: dict) -> None:
        try:
            self.vm_api.event(vm.name, vm.guest_state.get("token", ""), kind, detail)
        except (urllib.error.URLError, OSError, Exception) as e:  # the orchestrator being down must not crash the VM
            log.info("sandbox guest: event not delivered", extra={"instance": vm.name, "event": kind, "error": type(e).__name__})
