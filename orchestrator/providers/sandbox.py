"""The sandbox cloud: an in-process simulated cloud for the demo, the simulator and tests.

VMs boot after a delay, then run a guest program (the simulated bootstrap
script); they bill per second with a minimum at the candidate's price. Capacity
errors and spot interruptions can be injected or drawn at configured rates.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable

from orchestrator.config import Candidate, SandboxCloud as SandboxSettings
from orchestrator.core.clock import Clock
from orchestrator.providers.base import TAG_ID, TAG_RUNNER, CapacityError, CloudInstance, LaunchSpec, Provider, ProviderError

DEFAULT_REGION = "sandbox-1"


@dataclass
class SandboxVM:
    instance_id: str
    name: str
    location: str
    instance_type: str
    spot: bool
    price_per_hour: float
    tags: dict[str, str]
    user_data: str
    metadata: dict[str, str]
    launch_key: str
    launched_at: float
    boot_at: float
    state: str = "pending"          # pending | running | terminated
    terminated_at: float | None = None
    interrupted: bool = False
    guest_state: dict = field(default_factory=dict)


class SandboxWorld:
    """The simulated cloud's state; a SandboxProvider is its API."""

    def __init__(self, clock: Clock, settings: SandboxSettings | None = None, *, timeline=None, rng: random.Random | None = None):
        self.clock = clock
        self.settings = settings or SandboxSettings()
        self.timeline = timeline
        self.rng = rng or random.Random(self.settings.seed)
        self.vms: dict[str, SandboxVM] = {}
        self.calls: Counter[str] = Counter()
        # Per instance type (boot_time, boot_jitter) overrides; the simulator sets these.
        self.boot_times: dict[str, tuple[float, float]] = {}
        # Every launch request as (time, launch_key), refused ones too: decision delay is measured on it.
        self.launch_requests: list[tuple[float, str]] = []
        self._live: dict[str, SandboxVM] = {}      # indexes: a day of VMs must not make every call O(n)
        self._by_key: dict[str, SandboxVM] = {}
        self.guest: Callable[[SandboxVM], None] | None = None
        self.on_terminated: Callable[[SandboxVM], None] | None = None
        self._fail_next: list[str] = []
        self._seq = 0
        self._lock = threading.RLock()

    # --- fault injection ---------------------------------------------------

    def fail_next_launches(self, count: int = 1, kind: str = "capacity") -> None:
        self._fail_next.extend([kind] * count)

    # --- lifecycle ---------------------------------------------------------

    def create(self, spec: LaunchSpec, price: float) -> SandboxVM:
        with self._lock:
            self.launch_requests.append((self.clock.time(), spec.launch_key))
            known = self._by_key.get(spec.launch_key)
            if known is not None:
                return known  # idempotent on the launch key, like a ClientToken
            if self._fail_next:
                kind = self._fail_next.pop(0)
                raise CapacityError(f"sandbox: injected {kind} error", code="SandboxInsufficientCapacity")
            if spec.candidate.spot and self.rng.random() < self.settings.capacity_error_rate:
                raise CapacityError("sandbox: no spot capacity", code="SandboxInsufficientCapacity")
            self._seq += 1
            now = self.clock.time()
            mean, jitter = self.boot_profile(spec.candidate)
            boot = max(mean + self.rng.uniform(-1, 1) * jitter, 1.0)
            digest = hashlib.sha256(spec.launch_key.encode()).hexdigest()[:8]
            vm = SandboxVM(
                instance_id=f"sbx-{self._seq:06d}-{digest}",
                name=spec.name,
                location=spec.candidate.region or DEFAULT_REGION,
                instance_type=spec.candidate.instance_type,
                spot=spec.candidate.spot,
                price_per_hour=price,
                tags=dict(spec.tags),
                user_data=spec.user_data,
                metadata=dict(spec.metadata),
                launch_key=spec.launch_key,
                launched_at=now,
                boot_at=now + boot,
            )
            self._add(vm)
        if self.timeline is not None:
            self.timeline.at(vm.boot_at, lambda: self._boot(vm))
        return vm

    def add_foreign(self, tags: dict[str, str], name: str = "foreign") -> SandboxVM:
        """A VM somebody else made (another orchestrator, or a person)."""
        with self._lock:
            self._seq += 1
            now = self.clock.time()
            vm = SandboxVM(f"sbx-{self._seq:06d}-ext", name, DEFAULT_REGION, "other", False, 0.0, dict(tags), "", {}, f"ext-{self._seq}", now, now, "running")
            self._add(vm)
            return vm

    def _add(self, vm: SandboxVM) -> None:
        self.vms[vm.instance_id] = vm
        self._live[vm.instance_id] = vm
        self._by_key[vm.launch_key] = vm

    def boot_profile(self, candidate: Candidate) -> tuple[float, float]:
        return boot_profile(candidate, self.settings, self.boot_times)

    def step(self) -> None:
        """Boot whatever is due (when no timeline drives the world)."""
        for vm in list(self._live.values()):
            if vm.state == "pending" and vm.boot_at <= self.clock.time():
                self._boot(vm)

    def _boot(self, vm: SandboxVM) -> None:
        if vm.state != "pending":
            return
        vm.state = "running"
        if self.guest is not None:
            self.guest(vm)

    def terminate(self, instance_id: str, *, interrupted: bool = False) -> bool:
        with self._lock:
            vm = self.vms.get(instance_id)
            if vm is None or vm.state == "terminated":
                return False
            vm.state = "terminated"
            vm.terminated_at = self.clock.time()
            self._live.pop(instance_id, None)
            vm.interrupted = vm.interrupted or interrupted
        if self.on_terminated is not None:
            self.on_terminated(vm)
        return True

    # --- billing -----------------------------------------------------------

    def billed_seconds(self, vm: SandboxVM, until: float | None = None) -> float:
        end = vm.terminated_at if vm.terminated_at is not None else (until if until is not None else self.clock.time())
        return max(end - vm.launched_at, float(self.settings.min_billing))

    def cost_usd(self, vm: SandboxVM, until: float | None = None) -> float:
        return vm.price_per_hour * self.billed_seconds(vm, until) / 3600.0

    def live(self) -> list[SandboxVM]:
        return [vm for vm in self._live.values() if vm.state != "terminated"]


def boot_profile(candidate: Candidate, settings: SandboxSettings, by_type: dict[str, tuple[float, float]] | None = None) -> tuple[float, float]:
    """(boot time, jitter) of a candidate: its own fields where the config has them, else per instance type, else cloud-wide."""
    own = candidate.boot_time
    if own is not None:
        jitter = candidate.boot_jitter
        return float(own), float(settings.boot_jitter if jitter is None else jitter)
    return (by_type or {}).get(candidate.instance_type, (float(settings.boot_time), float(settings.boot_jitter)))


def sandbox_price(candidate: Candidate) -> float:
    """USD per hour: the candidate's own price, else a flat spot / on-demand pair."""
    if candidate.price_per_hour is not None:
        return candidate.price_per_hour
    return 0.20 if candidate.spot else 0.60


def _to_cloud_instance(vm: SandboxVM) -> CloudInstance:
    return CloudInstance(
        instance_id=vm.instance_id,
        name=vm.tags.get(TAG_RUNNER, vm.name),
        cloud="sandbox",
        location=vm.location,
        instance_type=vm.instance_type,
        spot=vm.spot,
        state=vm.state,
        launched_at=datetime.fromtimestamp(vm.launched_at, tz=timezone.utc),
        tags=dict(vm.tags),
    )


class SandboxProvider(Provider):
    cloud = "sandbox"

    def __init__(self, world: SandboxWorld, orchestrator_id: str):
        self.world = world
        self.orchestrator_id = orchestrator_id
        self.min_billing_seconds = int(world.settings.min_billing)

    def launch(self, spec: LaunchSpec) -> CloudInstance:
        self.world.calls["launch"] += 1
        if spec.tags.get(TAG_ID) != self.orchestrator_id:
            raise ProviderError("refusing to launch without our orchestrator-id tag")
        return _to_cloud_instance(self.world.create(spec, self.price_per_hour(spec.candidate)))

    def terminate(self, instance_id: str, location: str) -> None:
        self.world.calls["terminate"] += 1
        vm = self.world.vms.get(instance_id)
        if vm is None or vm.tags.get(TAG_ID) != self.orchestrator_id:
            return  # never touch what is not ours
        self.world.terminate(instance_id)

    def list_managed(self, locations: Iterable[str]) -> list[CloudInstance]:
        self.world.calls["list"] += 1
        return [
            _to_cloud_instance(vm)
            for vm in self.world.live()
            if vm.tags.get(TAG_ID) == self.orchestrator_id
        ]

    def price_per_hour(self, candidate: Candidate) -> float:
        return sandbox_price(candidate)

    def expected_gpus(self, candidate: Candidate) -> int:
        return candidate.gpu.count if candidate.gpu else 0

    def location_of(self, candidate: Candidate) -> str:
        return candidate.region or DEFAULT_REGION
