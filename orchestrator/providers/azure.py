"""Azure: Spot (or regular) VMs whose NIC and OS disk die with them.

azure-mgmt-compute and azure-identity are imported here and nowhere else. The NIC is
declared inline (networkInterfaceConfigurations), so one PUT makes VM, NIC and disk,
and one DELETE removes all three.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections import Counter
from datetime import timezone
from enum import Enum
from typing import Any, Callable, Iterable

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.identity import CredentialUnavailableError, DefaultAzureCredential
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute import models as m

from orchestrator.config import AzureCloud, Candidate
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

_CAPACITY_CODES = {
    "SkuNotAvailable",
    "AllocationFailed",
    "OverconstrainedAllocationRequest",
    "ZonalAllocationFailed",
    "OverconstrainedZonalAllocationRequest",
    "SpotVMEvictionOrCapacity",
}
_QUOTA_CODES = {"QuotaExceeded", "OperationNotAllowed", "LowPriorityQuotaExceeded"}
_AUTH_CODES = {
    "AuthorizationFailed",
    "AuthenticationFailed",
    "InvalidAuthenticationToken",
    "InvalidAuthenticationTokenTenant",
    "ExpiredAuthenticationToken",
    "LinkedAuthorizationFailed",
}
_GONE_CODES = {"ResourceNotFound", "NotFound", "ResourceGroupNotFound"}

_STATE = {
    "Creating": "pending",
    "Updating": "pending",
    "Migrating": "pending",
    "Succeeded": "running",
    "Deleting": "stopping",
    # A failed VM still exists (and may bill): the reaper must see it to delete it.
    "Failed": "stopping",
    "Canceled": "stopping",
}

# The min NIC API version Azure accepts for inline networkInterfaceConfigurations.
_NETWORK_API_VERSION = "2020-11-01"
_ADMIN_USER = "orchestrator"

# East US Linux list prices, USD/hour: (on-demand, spot). Budgets reserve against
# these, so stale entries should err high; candidate.price_per_hour overrides.
PRICE_USD: dict[str, tuple[float, float]] = {
    "Standard_NC4as_T4_v3": (0.526, 0.158),
    "Standard_NC8as_T4_v3": (0.752, 0.226),
    "Standard_NC16as_T4_v3": (1.204, 0.361),
    "Standard_NC64as_T4_v3": (4.352, 1.306),
    "Standard_NV6ads_A10_v5": (0.454, 0.137),
    "Standard_NV12ads_A10_v5": (0.908, 0.273),
    "Standard_NV18ads_A10_v5": (1.600, 0.480),
    "Standard_NV36ads_A10_v5": (3.200, 0.960),
    "Standard_NV36adms_A10_v5": (4.520, 1.356),
    "Standard_NV72ads_A10_v5": (6.520, 1.956),
    "Standard_NC24ads_A100_v4": (3.673, 1.102),
    "Standard_NC48ads_A100_v4": (7.346, 2.204),
    "Standard_NC96ads_A100_v4": (14.692, 4.408),
    "Standard_NC40ads_H100_v5": (6.980, 2.094),
    "Standard_NC80adis_H100_v5": (13.960, 4.188),
}
# GPUs the guest sees (a fractional A10 still shows as one device).
GPU_COUNT: dict[str, int] = {
    "Standard_NC4as_T4_v3": 1, "Standard_NC8as_T4_v3": 1, "Standard_NC16as_T4_v3": 1,
    "Standard_NC64as_T4_v3": 4,
    "Standard_NV6ads_A10_v5": 1, "Standard_NV12ads_A10_v5": 1, "Standard_NV18ads_A10_v5": 1,
    "Standard_NV36ads_A10_v5": 1, "Standard_NV36adms_A10_v5": 1, "Standard_NV72ads_A10_v5": 2,
    "Standard_NC24ads_A100_v4": 1, "Standard_NC48ads_A100_v4": 2, "Standard_NC96ads_A100_v4": 4,
    "Standard_NC40ads_H100_v5": 1, "Standard_NC80adis_H100_v5": 2,
}
# Unknown sizes: reserve high rather than let a budget be overrun.
_UNKNOWN_USD = 100.0


def _lookup(table: dict[str, Any], size: str) -> Any:
    """VM size names are case-insensitive in Azure."""
    if size in table:
        return table[size]
    low = size.lower()
    return next((v for k, v in table.items() if k.lower() == low), None)


def image_reference(image: str) -> m.ImageReference:
    """URN publisher:offer:sku:version, or a managed image / gallery resource id."""
    low = image.lower()
    if "/communitygalleries/" in low:
        return m.ImageReference(community_gallery_image_id=image)
    if "/sharedgalleries/" in low:
        return m.ImageReference(shared_gallery_image_id=image)
    if image.startswith("/"):
        return m.ImageReference(id=image)
    parts = image.split(":")
    if len(parts) != 4 or not all(parts):
        raise ProviderError(f"Azure image {image!r} is neither publisher:offer:sku:version nor a resource id",
                            code="InvalidImage")
    publisher, offer, sku, version = parts
    return m.ImageReference(publisher=publisher, offer=offer, sku=sku, version=version)


def _error_codes(exc: HttpResponseError) -> list[str]:
    err = getattr(exc, "error", None)
    if err is None:
        return []
    codes = [str(err.code)] if getattr(err, "code", None) else []
    return codes + [str(d.code) for d in getattr(err, "details", None) or [] if getattr(d, "code", None)]


def map_error(exc: Exception, action: str) -> ProviderError:
    """One place that decides what an Azure failure means to the scaler."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, (CredentialUnavailableError, ClientAuthenticationError)) and not getattr(
            exc, "status_code", None):
        return AuthError(f"Azure {action}: no usable credentials ({exc})", code=type(exc).__name__)
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        codes = _error_codes(exc)
        err = getattr(exc, "error", None)
        text = str(getattr(err, "message", None) or exc.message or exc)
        # A failed LRO may carry the code only in its message text.
        codes += sorted(c for c in _CAPACITY_CODES | _QUOTA_CODES if c in text and c not in codes)
        code = codes[0] if codes else None
        low = text.lower()
        msg = f"Azure {action}: {code + ': ' if code else ''}{text}"
        if any(c in _CAPACITY_CODES for c in codes):
            return CapacityError(msg, code=next(c for c in codes if c in _CAPACITY_CODES))
        # OperationNotAllowed is also a quota code (cores quota) but not only.
        if "QuotaExceeded" in codes or "LowPriorityQuotaExceeded" in codes or (
                "OperationNotAllowed" in codes and "quota" in low):
            return QuotaError(msg, code=next(c for c in codes if c in _QUOTA_CODES))
        if status in (401, 403) or any(c in _AUTH_CODES for c in codes):
            return AuthError(f"{msg} (check the credential and its role on the resource group)", code=code)
        if status == 429 or status >= 500:
            retry_after = None
            resp = getattr(exc, "response", None)
            if resp is not None and resp.headers.get("Retry-After", "").isdigit():
                retry_after = float(resp.headers["Retry-After"])
            return TransientError(msg, code=code or str(status), retry_after=retry_after)
        return ProviderError(msg, code=code)
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return TransientError(f"Azure {action}: {exc}", code=type(exc).__name__)
    return ProviderError(f"Azure {action}: {exc}", code=type(exc).__name__)


_KEY_LOCK = threading.Lock()
_PUBLIC_KEY: list[str] = []


def _throwaway_public_key() -> str:
    """Azure insists on a credential for the admin user; this key's private half is
    never kept, so nobody can log in with it. One per process: RSA keygen is slow."""
    with _KEY_LOCK:
        if not _PUBLIC_KEY:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
            _PUBLIC_KEY.append(key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode())
        return _PUBLIC_KEY[0]


def _text(value: Any) -> str:
    """SDK enums are str subclasses whose str() is the member name, not the value."""
    return str(value.value) if isinstance(value, Enum) else str(value or "")


def _is_gone(exc: ProviderError) -> bool:
    return isinstance(exc.__cause__, ResourceNotFoundError) or exc.code in _GONE_CODES


class AzureProvider(Provider):
    cloud = "azure"
    min_billing_seconds = 60

    def __init__(
        self,
        cloud: AzureCloud,
        orchestrator_id: str,
        clock: Clock,
        *,
        credential: Any = None,
        client_kwargs: dict[str, Any] | None = None,
    ):
        self.config = cloud
        self.orchestrator_id = orchestrator_id
        self.clock = clock
        self.api_calls: Counter[str] = Counter()
        self._credential = credential
        self._client_kwargs = dict(client_kwargs or {})
        self._client: ComputeManagementClient | None = None
        self._lock = threading.Lock()

    # --- plumbing -------------------------------------------------------------

    @property
    def client(self) -> ComputeManagementClient:
        # Built on first use so that configs load without credentials present.
        with self._lock:
            if self._client is None:
                kwargs: dict[str, Any] = {"retry_total": 3}  # the scaler retries too; keep calls short
                base_url = self.config.base_url
                if base_url:
                    kwargs["base_url"] = base_url
                    if base_url.startswith("https://"):
                        # Sovereign clouds issue tokens for their own ARM audience.
                        kwargs["credential_scopes"] = [base_url.rstrip("/") + "/.default"]
                kwargs.update(self._client_kwargs)
                credential = self._credential or DefaultAzureCredential()
                self._client = ComputeManagementClient(credential, self.config.subscription_id, **kwargs)
            return self._client

    def _call(self, op: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.api_calls[op] += 1
        try:
            return fn(*args, **kwargs)
        except AzureError as exc:
            raise map_error(exc, op) from exc

    @property
    def _rg(self) -> str:
        return self.config.resource_group

    def _ours(self, vm: Any) -> bool:
        tags = {k.lower(): v for k, v in (vm.tags or {}).items()}  # tag names are case-insensitive
        return tags.get(TAG_ID) == self.orchestrator_id

    def _get(self, name: str) -> Any | None:
        try:
            return self._call("virtual_machines.get", self.client.virtual_machines.get, self._rg, name)
        except ProviderError as exc:
            if _is_gone(exc):
                return None
            raise

    def _to_instance(self, vm: Any) -> CloudInstance:
        tags = dict(vm.tags or {})
        created = vm.time_created
        if created is not None and created.tzinfo is None:
            created = created.replace(tzinfo=timezone.utc)
        size = vm.hardware_profile.vm_size if vm.hardware_profile else ""
        return CloudInstance(
            instance_id=vm.name,
            name=tags.get(TAG_RUNNER) or vm.name,
            cloud=self.cloud,
            location=vm.location,
            instance_type=_text(size),
            spot=_text(vm.priority).lower() == "spot",
            state=_STATE.get(_text(vm.provisioning_state), "pending"),
            launched_at=created or self.clock.now(),
            tags=tags,
        )

    def location_of(self, candidate: Candidate) -> str:
        return candidate.location or self.config.location

    def _public_key(self) -> str:
        return _throwaway_public_key()

    # --- launch ---------------------------------------------------------------

    def vm_resource(self, spec: LaunchSpec) -> m.VirtualMachine:
        cand = spec.candidate
        if not cand.image:
            raise ProviderError(f"Azure candidate {cand.key()} has no image", code="InvalidImage")
        tags = {**spec.tags, TAG_ID: self.orchestrator_id}
        nic = m.VirtualMachineNetworkInterfaceConfiguration(
            name=f"{spec.name}-nic",
            tags=tags,
            primary=True,
            delete_option="Delete",
            ip_configurations=[m.VirtualMachineNetworkInterfaceIPConfiguration(
                name="ipconfig1", primary=True, subnet=m.SubResource(id=self.config.subnet_id))],
        )
        vm = m.VirtualMachine(
            location=self.location_of(cand),
            tags=tags,
            hardware_profile=m.HardwareProfile(vm_size=cand.instance_type),
            storage_profile=m.StorageProfile(
                image_reference=image_reference(cand.image),
                os_disk=m.OSDisk(
                    name=f"{spec.name}-osdisk",
                    create_option="FromImage",
                    disk_size_gb=spec.pool.disk_gb,
                    delete_option="Delete",
                    managed_disk=m.ManagedDiskParameters(storage_account_type="StandardSSD_LRS"),
                ),
            ),
            os_profile=m.OSProfile(
                computer_name=spec.name,
                admin_username=_ADMIN_USER,
                custom_data=base64.b64encode(spec.user_data.encode()).decode(),
                linux_configuration=m.LinuxConfiguration(
                    disable_password_authentication=True,
                    ssh=m.SshConfiguration(public_keys=[m.SshPublicKey(
                        path=f"/home/{_ADMIN_USER}/.ssh/authorized_keys", key_data=self._public_key())]),
                ),
            ),
            network_profile=m.NetworkProfile(
                network_api_version=_NETWORK_API_VERSION,
                network_interface_configurations=[nic],
            ),
        )
        if cand.zone:
            vm.zones = [cand.zone]
        if cand.spot:
            vm.priority = "Spot"
            vm.eviction_policy = "Delete"
            # -1: pay up to the on-demand price rather than be evicted on price.
            vm.billing_profile = m.BillingProfile(max_price=cand.max_price if cand.max_price else -1)
        return vm

    def _tag_disk(self, name: str, tags: dict[str, str]) -> None:
        # The OS disk cannot be tagged in the VM body; tag it so it is attributable too.
        try:
            poller = self._call("disks.update", self.client.disks.begin_update, self._rg,
                                f"{name}-osdisk", m.DiskUpdate(tags=tags))
            self._call("disks.update", poller.result)
        except ProviderError as exc:
            log.warning("Azure: could not tag the OS disk of %s: %s", name, exc)

    def launch(self, spec: LaunchSpec) -> CloudInstance:
        existing = self._get(spec.name)
        if existing is not None:
            state = _text(existing.provisioning_state)
            if self._ours(existing) and state in ("Failed", "Deleting", "Canceled"):
                raise LaunchKeyUsedError(
                    f"Azure VM {spec.name} of launch key {spec.launch_key!r} is {state}", code=state)
            if self._ours(existing):
                return self._to_instance(existing)
            raise LaunchKeyUsedError(
                f"Azure VM {spec.name} exists in {self._rg} but is not ours; use the next launch attempt",
                code="NameTaken")
        body = self.vm_resource(spec)
        poller = self._call("virtual_machines.create_or_update",
                            self.client.virtual_machines.begin_create_or_update, self._rg, spec.name, body)
        try:
            vm = self._call("virtual_machines.create_or_update", poller.result)
        except ProviderError as err:
            # A failed allocation leaves the VM resource behind in Failed state; start
            # its deletion now rather than wait for the reaper. A failed poll proves
            # nothing about the VM, so that one is left for a retry to find.
            if not isinstance(err, TransientError):
                try:
                    self._call("virtual_machines.delete", self.client.virtual_machines.begin_delete,
                               self._rg, spec.name, force_deletion=True, polling=False)
                except ProviderError as exc:
                    log.warning("Azure: could not delete failed VM %s: %s", spec.name, exc)
            raise
        self._tag_disk(spec.name, dict(body.tags or {}))
        return self._to_instance(vm)

    # --- terminate / list -----------------------------------------------------

    def terminate(self, instance_id: str, location: str) -> None:
        vm = self._get(instance_id)
        if vm is None:
            return
        if not self._ours(vm):
            raise ProviderError(
                f"Azure VM {instance_id} in {self._rg} does not carry {TAG_ID}={self.orchestrator_id}; "
                f"refusing to delete it", code="NotManaged")
        try:
            poller = self._call("virtual_machines.delete", self.client.virtual_machines.begin_delete,
                                self._rg, instance_id, force_deletion=True)
            self._call("virtual_machines.delete", poller.result)
        except ProviderError as exc:
            if _is_gone(exc):
                return
            raise

    def list_managed(self, locations: Iterable[str]) -> list[CloudInstance]:
        # One resource group holds every location; ARM has no server-side tag filter
        # on this list, so ours are picked out here.
        found: list[CloudInstance] = []
        pages = self.client.virtual_machines.list(self._rg).by_page()
        while True:
            with self._lock:
                self.api_calls["virtual_machines.list"] += 1  # one request per page
            try:
                page = list(next(pages))
            except StopIteration:
                with self._lock:
                    self.api_calls["virtual_machines.list"] -= 1  # the pager ended without a request
                break
            except AzureError as exc:
                raise map_error(exc, "virtual_machines.list") from exc
            found.extend(self._to_instance(vm) for vm in page if self._ours(vm))
        return found

    # --- prices / GPUs --------------------------------------------------------

    def price_per_hour(self, candidate: Candidate) -> float:
        if candidate.price_per_hour is not None:
            return float(candidate.price_per_hour)
        row = _lookup(PRICE_USD, candidate.instance_type)
        if row is None:
            log.warning("Azure has no price for %s; reserving %.2f USD/h (set price_per_hour)",
                        candidate.key(), _UNKNOWN_USD)
            return _UNKNOWN_USD
        price = row[1] if candidate.spot else row[0]
        if candidate.spot and candidate.max_price:
            price = min(price, candidate.max_price)  # the bid caps what we pay
        return price

    def expected_gpus(self, candidate: Candidate) -> int:
        if candidate.gpu:
            return candidate.gpu.count
        return _lookup(GPU_COUNT, candidate.instance_type) or 0
