"""Google Compute Engine: Spot (or standard) VMs that the cloud itself deletes at max_lifetime.

google-cloud-compute is imported here and nowhere else. Writes use the `*_unary`
methods and poll our own ZoneOperationsClient, because `insert()`'s ExtendedOperation
builds its poller against the default endpoint and would ignore `api_endpoint`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import requests
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1

from orchestrator.config import Candidate, GcpCloud
from orchestrator.core.clock import Clock
from orchestrator.providers.base import (
    TAG_ID,
    TAG_RUNNER,
    AuthError,
    CapacityError,
    CloudInstance,
    LaunchKeyUsedError,
    LaunchSpec,
    Provider,
    ProviderError,
    QuotaError,
    TransientError,
)

log = logging.getLogger(__name__)

# Fixed namespace so a launch key maps to the same requestId in every process.
_REQUEST_NS = uuid.UUID("6f1c3a52-3c1e-5b0e-9d7a-2f4f9a1e8c01")

_CAPACITY_CODES = {
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
    "RESOURCE_POOL_EXHAUSTED",
    "STOCKOUT",
}
_CAPACITY_TEXT = ("resource pool exhausted", "does not have enough resources", "stockout")
_QUOTA_CODES = {"QUOTA_EXCEEDED", "quotaExceeded"}
_TRANSIENT_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "backendError", "RATE_LIMIT_EXCEEDED"}
_EXISTS_CODES = {"alreadyExists", "RESOURCE_ALREADY_EXISTS"}
_GONE_CODES = {"notFound", "RESOURCE_NOT_FOUND"}

_STATE = {
    "PROVISIONING": "pending",
    "STAGING": "pending",
    "RUNNING": "running",
    "STOPPING": "stopping",
    "SUSPENDING": "stopping",
    "SUSPENDED": "stopping",
    "REPAIRING": "stopping",
    # A TERMINATED instance is stopped, not gone: it still holds its disk until deleted.
    "TERMINATED": "stopping",
}

# us-central1 list prices, USD/hour. Budgets reserve against these, so stale entries
# should err high; candidate.price_per_hour overrides. (on-demand, spot)
MACHINE_USD: dict[str, tuple[float, float]] = {
    "n1-standard-4": (0.190, 0.040),
    "n1-standard-8": (0.380, 0.080),
    "n1-standard-16": (0.760, 0.160),
    "n1-highmem-8": (0.473, 0.100),
    "g2-standard-4": (0.707, 0.284),
    "g2-standard-8": (0.854, 0.341),
    "g2-standard-12": (1.001, 0.400),
    "g2-standard-16": (1.148, 0.459),
    "g2-standard-24": (2.002, 0.800),
    "g2-standard-32": (1.733, 0.693),
    "g2-standard-48": (4.003, 1.600),
    "g2-standard-96": (8.007, 3.201),
    "a2-highgpu-1g": (3.673, 1.102),
    "a2-highgpu-2g": (7.347, 2.204),
    "a2-highgpu-4g": (14.694, 4.408),
    "a2-highgpu-8g": (29.387, 8.816),
    "a2-megagpu-16g": (55.739, 16.722),
    "a2-ultragpu-1g": (5.069, 1.570),
    "a2-ultragpu-2g": (10.137, 3.140),
    "a2-ultragpu-4g": (20.275, 6.280),
    "a2-ultragpu-8g": (40.550, 12.560),
    "a3-highgpu-1g": (11.061, 3.700),
    "a3-highgpu-2g": (22.122, 7.400),
    "a3-highgpu-4g": (44.244, 14.800),
    "a3-highgpu-8g": (88.490, 29.600),
    "a3-megagpu-8g": (96.000, 32.000),
}
# Per attached GPU on N1 machines. (on-demand, spot)
ACCELERATOR_USD: dict[str, tuple[float, float]] = {
    "nvidia-tesla-t4": (0.350, 0.140),
    "nvidia-tesla-v100": (2.480, 0.740),
    "nvidia-tesla-p100": (1.460, 0.430),
    "nvidia-tesla-p4": (0.600, 0.240),
    "nvidia-l4": (0.560, 0.224),
}
# Per vCPU when a machine type is not in the table. (on-demand, spot)
_VCPU_USD = {"n1": (0.0475, 0.010), "n2": (0.0486, 0.012), "n2d": (0.0423, 0.010), "e2": (0.0335, 0.010),
             "c2": (0.0522, 0.013), "c3": (0.0504, 0.012)}
# Unknown shapes: reserve high rather than let a budget be overrun.
_UNKNOWN_USD = 100.0

# Accelerator-optimized families carry their GPUs in the machine type.
_IMPLIED_GPUS = re.compile(r"^(a2|a3)-[a-z]+-(\d+)g$")
_G2_GPUS = {"g2-standard-4": 1, "g2-standard-8": 1, "g2-standard-12": 1, "g2-standard-16": 1,
            "g2-standard-24": 2, "g2-standard-32": 1, "g2-standard-48": 4, "g2-standard-96": 8}
_BUNDLED_GPU_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "g4-")

_LABEL_BAD = re.compile(r"[^a-z0-9_-]")


def label_value(value: str) -> str:
    """GCE label values: lowercase letters, digits, _ and -, at most 63."""
    return _LABEL_BAD.sub("_", value.lower())[:63]


def label_key(key: str) -> str:
    key = label_value(key)
    return key if key[:1].isalpha() else f"k{key}"[:63]


def request_id(orchestrator_id: str, launch_key: str) -> str:
    """Insert requestId for a launch key: a retry is deduplicated by GCE itself."""
    return str(uuid.uuid5(_REQUEST_NS, f"{orchestrator_id}/{launch_key}"))


def implied_gpus(machine_type: str) -> int:
    m = _IMPLIED_GPUS.match(machine_type)
    if m:
        return int(m.group(2))
    return _G2_GPUS.get(machine_type, 0)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return None


# What a call to the API may raise; anything else is a bug and propagates as is.
_API_FAILURES = (gexc.GoogleAPIError, auth_exc.GoogleAuthError, requests.RequestException,
                 ConnectionError, TimeoutError)


def _api_error_codes(exc: gexc.GoogleAPICallError) -> list[str]:
    codes: list[str] = []
    for err in exc.errors or []:
        if isinstance(err, dict):
            codes += [str(err[k]) for k in ("reason", "code") if err.get(k)]
    if getattr(exc, "reason", None):
        codes.append(str(exc.reason))
    return codes


def classify(codes: Iterable[str], http_status: int | None, message: str) -> ProviderError:
    """One place that decides what a GCE failure means to the scaler."""
    codes = [c for c in codes if c]
    code = codes[0] if codes else None
    low = message.lower()
    text = f"GCE: {message}"
    if any(c in _CAPACITY_CODES for c in codes) or any(t in low for t in _CAPACITY_TEXT):
        return CapacityError(text, code=next((c for c in codes if c in _CAPACITY_CODES), code))
    # QUOTA_EXCEEDED arrives as 403: it must not read as an auth failure.
    if any(c in _QUOTA_CODES for c in codes):
        return QuotaError(text, code=next(c for c in codes if c in _QUOTA_CODES))
    # API rate limits also say "quota exceeded" but pass in seconds.
    if any(c in _TRANSIENT_REASONS for c in codes):
        return TransientError(text, code=code)
    if "quota" in low and "exceeded" in low:
        return QuotaError(text, code=code)
    if http_status in (401, 403):
        return AuthError(f"{text} (check the credentials and IAM roles of the orchestrator)", code=code)
    if http_status == 429 or (http_status or 0) >= 500:
        return TransientError(text, code=code or str(http_status))
    return ProviderError(text, code=code)


def map_api_error(exc: Exception, action: str) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, gexc.GoogleAPICallError):
        status = exc.code if isinstance(exc.code, int) else None
        return classify(_api_error_codes(exc), status, f"{action}: {exc.message}")
    if isinstance(exc, auth_exc.DefaultCredentialsError):
        return AuthError(f"GCE {action}: no credentials found ({exc}); set GOOGLE_APPLICATION_CREDENTIALS",
                         code="DefaultCredentialsError")
    if isinstance(exc, auth_exc.RefreshError):
        return AuthError(f"GCE {action}: {exc}", code="RefreshError")
    if isinstance(exc, (gexc.RetryError, auth_exc.TransportError, ConnectionError, TimeoutError)):
        return TransientError(f"GCE {action}: {exc}", code=type(exc).__name__)
    if isinstance(exc, requests.RequestException):
        return TransientError(f"GCE {action}: {exc}", code=type(exc).__name__)
    return ProviderError(f"GCE {action}: {exc}")


def _operation_error(op: compute_v1.Operation, action: str) -> ProviderError | None:
    errors = list(op.error.errors) if op.error else []
    if not errors:
        return None
    codes = [e.code for e in errors]
    message = "; ".join(f"{e.code}: {e.message}" for e in errors)
    status = op.http_error_status_code or None
    return classify(codes, status, f"{action}: {message}")


class GcpProvider(Provider):
    cloud = "gcp"
    min_billing_seconds = 60

    def __init__(
        self,
        cloud: GcpCloud,
        orchestrator_id: str,
        clock: Clock,
        *,
        credentials: Any = None,
        poll_sleep: Callable[[float], None] = time.sleep,
        poll_interval: float = 2.0,
        operation_timeout: float = 600.0,
        request_timeout: float = 60.0,
        list_page_size: int = 500,
    ):
        self.config = cloud
        self.orchestrator_id = orchestrator_id
        self.clock = clock
        self.poll_sleep = poll_sleep
        self.poll_interval = poll_interval
        self.operation_timeout = operation_timeout
        self.request_timeout = request_timeout
        self.list_page_size = list_page_size
        self.api_calls: Counter[str] = Counter()
        self._credentials = credentials
        self._instances: compute_v1.InstancesClient | None = None
        self._operations: compute_v1.ZoneOperationsClient | None = None
        self._lock = threading.Lock()

    # --- plumbing -------------------------------------------------------------

    def _client_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        credentials = self._credentials
        endpoint = self.config.api_endpoint
        if endpoint:
            args["client_options"] = {"api_endpoint": endpoint}
            # A plain-http endpoint is an emulator or test server; real endpoints keep ADC.
            if credentials is None and endpoint.startswith("http://"):
                credentials = AnonymousCredentials()
        if credentials is not None:
            args["credentials"] = credentials
        return args

    def _clients(self) -> tuple[compute_v1.InstancesClient, compute_v1.ZoneOperationsClient]:
        # Built on first use so that configs load without credentials present.
        with self._lock:
            if self._instances is None or self._operations is None:
                try:
                    args = self._client_args()
                    self._instances = compute_v1.InstancesClient(**args)
                    self._operations = compute_v1.ZoneOperationsClient(**args)
                except auth_exc.GoogleAuthError as exc:
                    raise map_api_error(exc, "client") from exc
            return self._instances, self._operations

    def _call(self, op: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        with self._lock:
            self.api_calls[op] += 1
        try:
            # retry=None: the scaler and reaper retry on their own schedule, not inside a call.
            return fn(retry=None, timeout=self.request_timeout, **kwargs)
        except _API_FAILURES as exc:
            raise map_api_error(exc, op) from exc

    def _wait(self, op: compute_v1.Operation, zone: str) -> compute_v1.Operation:
        """Poll a zone operation until DONE or the timeout; returns the last state seen."""
        _, operations = self._clients()
        deadline = time.monotonic() + self.operation_timeout
        while op.status != compute_v1.Operation.Status.DONE:
            if time.monotonic() > deadline:
                break
            # wait() blocks server-side until DONE (or ~2 minutes), so polls are few.
            op = self._call("zone_operations.wait", operations.wait,
                            project=self.config.project, zone=zone, operation=op.name)
            if op.status != compute_v1.Operation.Status.DONE:
                self.poll_sleep(self.poll_interval)
        return op

    def _get(self, zone: str, name: str) -> compute_v1.Instance | None:
        instances, _ = self._clients()
        try:
            return self._call("instances.get", instances.get,
                              project=self.config.project, zone=zone, instance=name)
        except ProviderError as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                return None
            raise

    def _ours(self, inst: compute_v1.Instance) -> bool:
        return dict(inst.labels).get(TAG_ID) == label_value(self.orchestrator_id)

    def _to_instance(self, inst: compute_v1.Instance) -> CloudInstance:
        labels = dict(inst.labels)
        return CloudInstance(
            instance_id=inst.name,
            name=labels.get(TAG_RUNNER) or inst.name,
            cloud=self.cloud,
            location=inst.zone.rsplit("/", 1)[-1],
            instance_type=inst.machine_type.rsplit("/", 1)[-1],
            spot=inst.scheduling.provisioning_model == "SPOT" or bool(inst.scheduling.preemptible),
            state=_STATE.get(inst.status, "pending"),
            launched_at=_parse_time(inst.creation_timestamp) or self.clock.now(),
            tags=labels,
        )

    def location_of(self, candidate: Candidate) -> str:
        return candidate.zone or ""

    # --- launch ---------------------------------------------------------------

    def instance_resource(self, spec: LaunchSpec) -> compute_v1.Instance:
        cand = spec.candidate
        zone = cand.zone or ""
        labels = {label_key(k): label_value(v) for k, v in spec.tags.items()}
        labels[TAG_ID] = label_value(self.orchestrator_id)
        scheduling = compute_v1.Scheduling(
            provisioning_model="SPOT" if cand.spot else "STANDARD",
            # The cloud deletes the VM at max_lifetime even if we are down.
            instance_termination_action="DELETE",
            max_run_duration=compute_v1.Duration(seconds=int(spec.pool.max_lifetime)),
            on_host_maintenance="TERMINATE",  # GPUs cannot live-migrate
            automatic_restart=False,
        )
        accelerators = []
        if cand.gpu and not cand.instance_type.startswith(_BUNDLED_GPU_FAMILIES):
            accelerators.append(compute_v1.AcceleratorConfig(
                accelerator_type=f"zones/{zone}/acceleratorTypes/{cand.gpu.type}",
                accelerator_count=cand.gpu.count,
            ))
        boot = compute_v1.AttachedDisk(
            boot=True,
            auto_delete=True,
            initialize_params=compute_v1.AttachedDiskInitializeParams(
                source_image=cand.image,
                disk_size_gb=spec.pool.disk_gb,
                labels=labels,
            ),
        )
        network = self.config.network
        nic = compute_v1.NetworkInterface(
            network=network if "/" in network else f"global/networks/{network}",
            # Runners need egress to GitHub; an ephemeral IP works without Cloud NAT.
            access_configs=[compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")],
        )
        if self.config.subnetwork:
            sub = self.config.subnetwork
            region = zone.rsplit("-", 1)[0]
            nic.subnetwork = sub if "/" in sub else f"regions/{region}/subnetworks/{sub}"
        inst = compute_v1.Instance(
            name=spec.name,
            machine_type=f"zones/{zone}/machineTypes/{cand.instance_type}",
            labels=labels,
            scheduling=scheduling,
            guest_accelerators=accelerators,
            disks=[boot],
            network_interfaces=[nic],
            metadata=compute_v1.Metadata(items=[compute_v1.Items(key="user-data", value=spec.user_data)]),
        )
        if self.config.service_account:
            inst.service_accounts = [compute_v1.ServiceAccount(
                email=self.config.service_account,
                scopes=["https://www.googleapis.com/auth/cloud-platform"],
            )]
        return inst

    def _adopt(self, zone: str, name: str, launch_key: str) -> CloudInstance:
        inst = self._get(zone, name)
        if inst is None:
            raise LaunchKeyUsedError(
                f"GCE launch key {launch_key!r} already made {name}, which is gone", code="RequestIdUsed")
        if not self._ours(inst):
            raise LaunchKeyUsedError(
                f"GCE instance {name} in {zone} exists but is not ours; use the next launch attempt",
                code="alreadyExists")
        return self._to_instance(inst)

    def launch(self, spec: LaunchSpec) -> CloudInstance:
        zone = spec.candidate.zone
        if not zone:
            raise ProviderError(f"GCE candidate {spec.candidate.key()} has no zone")
        if not spec.candidate.image:
            raise ProviderError(f"GCE candidate {spec.candidate.key()} has no image")
        instances, _ = self._clients()
        try:
            op = self._call("instances.insert", instances.insert_unary,
                            request=compute_v1.InsertInstanceRequest(
                                project=self.config.project, zone=zone,
                                instance_resource=self.instance_resource(spec),
                                request_id=request_id(self.orchestrator_id, spec.launch_key)))
        except ProviderError as exc:
            cause = exc.__cause__
            if isinstance(cause, gexc.Conflict) and set(_api_error_codes(cause)) & _EXISTS_CODES:
                return self._adopt(zone, spec.name, spec.launch_key)
            raise
        op = self._wait(op, zone)
        err = _operation_error(op, "insert")
        if err is not None:
            if err.code in _EXISTS_CODES:
                return self._adopt(zone, spec.name, spec.launch_key)
            raise err
        inst = self._get(zone, spec.name)
        if inst is None:
            if op.status != compute_v1.Operation.Status.DONE:
                raise TransientError(f"GCE insert of {spec.name} still running after "
                                     f"{self.operation_timeout:.0f}s", code="OperationTimeout")
            # A reused requestId answers with the old operation; its VM is gone.
            raise LaunchKeyUsedError(
                f"GCE launch key {spec.launch_key!r} already made {spec.name}, which is gone",
                code="RequestIdUsed")
        return self._to_instance(inst)

    # --- terminate / list -----------------------------------------------------

    def terminate(self, instance_id: str, location: str) -> None:
        zone = location
        inst = self._get(zone, instance_id)
        if inst is None:
            return
        if not self._ours(inst):
            raise ProviderError(
                f"GCE instance {instance_id} in {zone} does not carry {TAG_ID}="
                f"{self.orchestrator_id}; refusing to delete it", code="NotManaged")
        instances, _ = self._clients()
        try:
            op = self._call("instances.delete", instances.delete_unary,
                            request=compute_v1.DeleteInstanceRequest(
                                project=self.config.project, zone=zone, instance=instance_id,
                                request_id=str(uuid.uuid4())))
        except ProviderError as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                return
            raise
        op = self._wait(op, zone)
        err = _operation_error(op, "delete")
        if err is not None and err.code not in _GONE_CODES:
            raise err

    def list_managed(self, locations: Iterable[str]) -> list[CloudInstance]:
        # One aggregated list covers every zone, so nothing of ours hides in a zone
        # no candidate names any more; `locations` is not needed to find it.
        instances, _ = self._clients()
        ours = label_value(self.orchestrator_id)
        request = compute_v1.AggregatedListInstancesRequest(
            project=self.config.project,
            filter=f'labels.{TAG_ID} = "{ours}"',
            max_results=self.list_page_size,
        )
        pager = self._call("instances.aggregated_list", instances.aggregated_list, request=request)
        found: list[CloudInstance] = []
        try:
            for _zone, scoped in pager:
                for inst in scoped.instances:
                    if self._ours(inst):  # the filter is the cloud's; check anyway
                        found.append(self._to_instance(inst))
        except _API_FAILURES as exc:  # later pages fail like the first
            raise map_api_error(exc, "instances.aggregated_list") from exc
        return found

    # --- prices / GPUs --------------------------------------------------------

    def price_per_hour(self, candidate: Candidate) -> float:
        if candidate.price_per_hour is not None:
            return float(candidate.price_per_hour)
        idx = 1 if candidate.spot else 0
        mtype = candidate.instance_type
        machine = MACHINE_USD.get(mtype)
        if machine is None:
            family, _, rest = mtype.partition("-")
            vcpus = rest.rsplit("-", 1)[-1]
            if family in _VCPU_USD and vcpus.isdigit():
                machine = tuple(rate * int(vcpus) for rate in _VCPU_USD[family])  # type: ignore[assignment]
        price = machine[idx] if machine else None
        if candidate.gpu and not mtype.startswith(_BUNDLED_GPU_FAMILIES):
            gpu = ACCELERATOR_USD.get(candidate.gpu.type)
            price = None if price is None or gpu is None else price + gpu[idx] * candidate.gpu.count
        if price is None:
            log.warning("GCE has no price for %s; reserving %.2f USD/h (set price_per_hour)",
                        candidate.key(), _UNKNOWN_USD)
            return _UNKNOWN_USD
        return round(price, 4)

    def expected_gpus(self, candidate: Candidate) -> int:
        if candidate.gpu:
            return candidate.gpu.count
        return implied_gpus(candidate.instance_type)
