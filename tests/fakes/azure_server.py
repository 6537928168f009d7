"""An Azure Resource Manager (Microsoft.Compute) fake over real HTTP.

It answers what azure-mgmt-compute sends for virtual machines (PUT/GET/DELETE/list)
and disks (PATCH), keeps VMs, NICs and disks in separate tables, and runs long-running
operations the ARM way: 201/202 with Azure-AsyncOperation (and Location on delete)
headers and a status endpoint that reports InProgress, then Succeeded or Failed.
Each status poll advances one step, so a client polling with interval 0 never sleeps.

Deleting a VM removes its NIC and OS disk only when their deleteOption is Delete,
as Azure does, so a test that they are gone means something.

Azure SDK clients refuse bearer tokens over plain http; tests wire them with
`client_kwargs=fake.client_kwargs()`, which swaps in a header-only auth policy.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from tests.fakes.json_http import FakeServer, JsonHandler

REQUIRED_TAGS = ("orchestrator-id", "orchestrator-pool", "orchestrator-runner")


@dataclass
class Injected:
    """A planned failure: 'sync' fails the request itself (e.g. SkuNotAvailable, quota),
    'async' fails the long-running operation (allocation failures) and leaves the VM
    behind in Failed state, as Azure does."""

    code: str
    message: str
    status: int
    mode: str = "async"


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class _FakeToken:
    """What a test credential hands out; never leaves the machine."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken("fake-token", 2**31 - 1)


def _auth_policy() -> Any:
    from azure.core.pipeline.policies import SansIOHTTPPolicy

    class FakeBearer(SansIOHTTPPolicy):
        """Adds a bearer header without the https check of BearerTokenCredentialPolicy."""

        def on_request(self, request: Any) -> None:
            request.http_request.headers["Authorization"] = "Bearer fake-token"

    return FakeBearer()


class AzureFake(FakeServer):
    def __init__(self, subscription_id: str = "00000000-0000-0000-0000-000000000001",
                 resource_group: str = "runners", location: str = "eastus",
                 list_page_size: int = 50):
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.location = location
        self.list_page_size = list_page_size
        self.vms: dict[str, dict[str, Any]] = {}
        self.nics: dict[str, dict[str, Any]] = {}
        self.disks: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.calls: list[Call] = []
        self.violations: list[str] = []
        self.puts: list[dict[str, Any]] = []
        self._errors: dict[str, list[Injected]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    # --- lifecycle --------------------------------------------------------------

    @property
    def subnet_id(self) -> str:
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/Microsoft.Network/virtualNetworks/vnet/subnets/runners")

    def credential(self) -> Any:
        return _FakeToken()

    def client_kwargs(self) -> dict[str, Any]:
        """Test-only pipeline: no https check on the token, no SDK retries, no LRO sleeps."""
        return {"authentication_policy": _auth_policy(), "retry_total": 0, "polling_interval": 0}

    def reset(self) -> None:
        with self._lock:
            for table in (self.vms, self.nics, self.disks, self.operations, self._errors):
                table.clear()
            self.calls.clear()
            self.violations.clear()
            self.puts.clear()

    # --- test controls ----------------------------------------------------------

    def inject(self, verb: str, code: str, message: str, status: int = 409, *,
               mode: str = "sync", times: int = 1) -> None:
        """Fail the next `times` calls of `verb` (put | get | delete | list)."""
        with self._lock:
            self._errors.setdefault(verb, []).extend(
                Injected(code, message, status, mode) for _ in range(times))

    def inject_capacity_error(self, code: str = "AllocationFailed", *, times: int = 1) -> None:
        if code == "SkuNotAvailable":
            self.inject("put", code, "The requested VM size is currently not available in location "
                        f"'{self.location}'.", 409, mode="sync", times=times)
        else:
            self.inject("put", code, "Allocation failed. We do not have sufficient capacity for the "
                        "requested VM size in this region.", 200, mode="async", times=times)

    def inject_quota_error(self, *, times: int = 1) -> None:
        self.inject("put", "OperationNotAllowed", "Operation could not be completed as it results in "
                    "exceeding approved Total Regional Cores quota.", 409, mode="sync", times=times)

    def create_foreign(self, name: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
        """A VM someone else made, with a NIC and a disk that are kept on delete."""
        with self._lock:
            vm = self._store_vm(name, {
                "location": self.location,
                "tags": dict(tags or {}),
                "properties": {
                    "hardwareProfile": {"vmSize": "Standard_D2s_v5"},
                    "storageProfile": {"osDisk": {"name": f"{name}-disk", "createOption": "FromImage"}},
                    "networkProfile": {"networkApiVersion": "2020-11-01", "networkInterfaceConfigurations": [
                        {"name": f"{name}-nic", "properties": {"ipConfigurations": []}}]},
                },
            })
            vm["properties"]["provisioningState"] = "Succeeded"
            return vm

    def evict(self, name: str) -> None:
        """A Spot eviction with evictionPolicy=Delete."""
        with self._lock:
            self._delete_now(name)

    # --- internals ----------------------------------------------------------------

    def _rg_path(self) -> str:
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"

    def _vm_id(self, name: str) -> str:
        return f"{self._rg_path()}/providers/Microsoft.Compute/virtualMachines/{name}"

    def _store_vm(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        vm = json.loads(json.dumps(body))
        props = vm.setdefault("properties", {})
        vm.update({"id": self._vm_id(name), "name": name, "type": "Microsoft.Compute/virtualMachines"})
        props.update({
            "provisioningState": "Creating",
            "vmId": str(uuid.uuid4()),
            "timeCreated": datetime.now(timezone.utc).isoformat(),
        })
        props.get("osProfile", {}).pop("customData", None)  # ARM never returns it
        os_disk = props.setdefault("storageProfile", {}).setdefault("osDisk", {})
        disk_name = os_disk.get("name") or f"{name}_OsDisk_1_{uuid.uuid4().hex[:8]}"
        os_disk["name"] = disk_name
        self.disks[disk_name] = {
            "id": f"{self._rg_path()}/providers/Microsoft.Compute/disks/{disk_name}",
            "name": disk_name, "location": vm.get("location"), "tags": {},
            "managedBy": vm["id"], "deleteOption": os_disk.get("deleteOption", "Detach"),
            "properties": {"diskSizeGB": os_disk.get("diskSizeGB"), "diskState": "Attached"},
        }
        refs = []
        for cfg in props.get("networkProfile", {}).get("networkInterfaceConfigurations") or []:
            nic_id = f"{self._rg_path()}/providers/Microsoft.Network/networkInterfaces/{cfg['name']}"
            self.nics[cfg["name"]] = {
                "id": nic_id, "name": cfg["name"], "tags": dict(cfg.get("tags") or {}),
                "virtualMachine": vm["id"],
                "deleteOption": (cfg.get("properties") or {}).get("deleteOption", "Detach"),
            }
            refs.append({"id": nic_id, "properties": {
                "deleteOption": (cfg.get("properties") or {}).get("deleteOption", "Detach")}})
        props.setdefault("networkProfile", {})["networkInterfaces"] = refs
        self.vms[name] = vm
        return vm

    def _delete_now(self, name: str) -> None:
        vm = self.vms.pop(name, None)
        if vm is None:
            return
        for nic_name, nic in list(self.nics.items()):
            if nic.get("virtualMachine") == vm["id"]:
                if nic["deleteOption"] == "Delete":
                    del self.nics[nic_name]
                else:
                    nic["virtualMachine"] = None
        for disk_name, disk in list(self.disks.items()):
            if disk.get("managedBy") == vm["id"]:
                if disk["deleteOption"] == "Delete":
                    del self.disks[disk_name]
                else:
                    disk["managedBy"] = None
                    disk["properties"]["diskState"] = "Unattached"

    def _operation(self, on_done: Any, error: Injected | None = None) -> str:
        op_id = str(uuid.uuid4())
        self.operations[op_id] = {"status": "InProgress", "on_done": on_done, "error": error, "polls": 0}
        return op_id

    def _op_url(self, op_id: str, api_version: str, monitor: bool = False) -> str:
        url = (f"{self.endpoint}/subscriptions/{self.subscription_id}/providers/Microsoft.Compute"
               f"/locations/{self.location}/operations/{op_id}?api-version={api_version}")
        return url + "&monitor=true" if monitor else url

    def _progress_others(self, polled: str | None) -> None:
        """ARM works on whether or not anyone polls: every request moves other operations on."""
        for op_id in list(self.operations):
            if op_id != polled:
                self._advance(op_id)

    def _advance(self, op_id: str) -> dict[str, Any] | None:
        op = self.operations.get(op_id)
        if op is None:
            return None
        op["polls"] += 1
        if op["status"] == "InProgress" and op["polls"] >= 2:
            if op["error"] is not None:
                op["status"] = "Failed"
                if "on_fail" in op:
                    op.pop("on_fail")()
            else:
                op["status"] = "Succeeded"
                if op["on_done"] is not None:
                    op["on_done"]()
        return op

    def _take(self, verb: str, mode: str | None = None) -> Injected | None:
        queue = self._errors.get(verb)
        if queue and (mode is None or queue[0].mode == mode):
            return queue.pop(0)
        return None

    def check_put(self, name: str, body: dict[str, Any], query: dict[str, list[str]]) -> list[str]:
        """What our provider must send on every VM PUT; returns the problems."""
        where = f"PUT {name}"
        problems: list[str] = []
        if not (query.get("api-version") or [""])[0]:
            problems.append(f"{where}: no api-version")
        tags = body.get("tags") or {}
        for key in REQUIRED_TAGS:
            if not tags.get(key):
                problems.append(f"{where}: tag {key} missing")
        props = body.get("properties") or {}
        if not (props.get("hardwareProfile") or {}).get("vmSize"):
            problems.append(f"{where}: no vmSize")
        if props.get("priority") == "Spot":
            if props.get("evictionPolicy") != "Delete":
                problems.append(f"{where}: Spot without evictionPolicy=Delete")
            if "maxPrice" not in (props.get("billingProfile") or {}):
                problems.append(f"{where}: Spot without billingProfile.maxPrice")
        elif props.get("priority") not in (None, "Regular"):
            problems.append(f"{where}: unexpected priority {props.get('priority')!r}")
        storage = props.get("storageProfile") or {}
        os_disk = storage.get("osDisk") or {}
        if os_disk.get("deleteOption") != "Delete":
            problems.append(f"{where}: OS disk deleteOption is not Delete")
        if not os_disk.get("diskSizeGB"):
            problems.append(f"{where}: OS disk diskSizeGB missing")
        if not storage.get("imageReference"):
            problems.append(f"{where}: no imageReference")
        net = props.get("networkProfile") or {}
        if (net.get("networkApiVersion") or "") < "2020-11-01":
            problems.append(f"{where}: networkApiVersion missing or older than 2020-11-01")
        cfgs = net.get("networkInterfaceConfigurations") or []
        if not cfgs:
            problems.append(f"{where}: no inline networkInterfaceConfigurations")
        for cfg in cfgs:
            cprops = cfg.get("properties") or {}
            if cprops.get("deleteOption") != "Delete":
                problems.append(f"{where}: NIC {cfg.get('name')} deleteOption is not Delete")
            if (cfg.get("tags") or {}).get("orchestrator-id") != tags.get("orchestrator-id"):
                problems.append(f"{where}: NIC {cfg.get('name')} not tagged")
            ips = cprops.get("ipConfigurations") or []
            if not ips or not all(((ip.get("properties") or {}).get("subnet") or {}).get("id") for ip in ips):
                problems.append(f"{where}: NIC {cfg.get('name')} has no subnet")
        custom = (props.get("osProfile") or {}).get("customData")
        try:
            if not custom or not base64.b64decode(custom, validate=True):
                problems.append(f"{where}: customData (user-data) missing")
        except ValueError:
            problems.append(f"{where}: customData is not base64")
        return problems

    # --- request handling -----------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any,
               headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self.calls.append(Call(method, path, query, body, headers))
            if not headers.get("authorization", "").startswith("Bearer "):
                self.violations.append(f"{method} {path}: no bearer token")
            api_version = (query.get("api-version") or ["2024-07-01"])[0]
            low = path.lower()
            rg = self._rg_path().lower()
            ops = f"/subscriptions/{self.subscription_id}/providers/microsoft.compute/locations/".lower()
            self._progress_others(path.rsplit("/", 1)[-1] if low.startswith(ops) else None)
            if low.startswith(ops) and method == "GET":
                return self._op_status(path.rsplit("/", 1)[-1], "monitor" in query)
            vms = f"{rg}/providers/microsoft.compute/virtualmachines"
            if low == vms and method == "GET":
                return self._list(query, api_version)
            if low.startswith(vms + "/"):
                name = path[len(vms) + 1:]
                if "/" in name:
                    return _error(404, "NotFound", f"unsupported {path}")
                if method == "PUT":
                    return self._put(name, body or {}, query, api_version)
                if method == "GET":
                    return self._get(name)
                if method == "DELETE":
                    return self._delete(name, query, api_version)
            disks = f"{rg}/providers/microsoft.compute/disks/"
            if low.startswith(disks) and method == "PATCH":
                return self._patch_disk(path[len(disks):], body or {})
            return _error(404, "InvalidResourceType", f"unsupported {method} {path}")

    def _sync_error(self, verb: str) -> tuple[int, Any, dict[str, str]] | None:
        err = self._take(verb, "sync")
        return _error(err.status, err.code, err.message) if err else None

    def _put(self, name: str, body: dict[str, Any], query: dict[str, list[str]],
             api_version: str) -> tuple[int, Any, dict[str, str]]:
        self.puts.append(body)
        self.violations.extend(self.check_put(name, body, query))
        failed = self._sync_error("put")
        if failed:
            return failed
        if name in self.vms:
            # An update: our provider never sends one, but ARM would accept it.
            vm = self.vms[name]
            return 200, vm, {}
        vm = self._store_vm(name, body)
        err = self._take("put", "async")

        def done() -> None:
            if self.vms.get(name) is vm:
                vm["properties"]["provisioningState"] = "Succeeded"

        op_id = self._operation(done, err)
        if err is not None:
            def failed_state() -> None:
                vm["properties"]["provisioningState"] = "Failed"
            self.operations[op_id]["on_fail"] = failed_state
        return 201, vm, {"Azure-AsyncOperation": self._op_url(op_id, api_version)}

    def _get(self, name: str) -> tuple[int, Any, dict[str, str]]:
        failed = self._sync_error("get")
        if failed:
            return failed
        vm = self.vms.get(name)
        if vm is None:
            return _error(404, "ResourceNotFound",
                          f"The Resource 'Microsoft.Compute/virtualMachines/{name}' under resource group "
                          f"'{self.resource_group}' was not found.")
        return 200, vm, {}

    def _delete(self, name: str, query: dict[str, list[str]], api_version: str) -> tuple[int, Any, dict[str, str]]:
        failed = self._sync_error("delete")
        if failed:
            return failed
        if name not in self.vms:
            return 204, None, {}
        if (query.get("forceDeletion") or [""])[0].lower() != "true":
            self.violations.append(f"DELETE {name}: forceDeletion not set")
        vm = self.vms[name]
        vm["properties"]["provisioningState"] = "Deleting"
        op_id = self._operation(lambda: self._delete_now(name), self._take("delete", "async"))
        return 202, None, {"Azure-AsyncOperation": self._op_url(op_id, api_version),
                           "Location": self._op_url(op_id, api_version, monitor=True)}

    def _op_status(self, op_id: str, monitor: bool) -> tuple[int, Any, dict[str, str]]:
        op = self._advance(op_id)
        if op is None:
            return _error(404, "NotFound", f"operation {op_id} not found")
        if monitor:
            return (202, None, {}) if op["status"] == "InProgress" else (200, None, {})
        out: dict[str, Any] = {"name": op_id, "status": op["status"],
                               "startTime": datetime.now(timezone.utc).isoformat()}
        if op["status"] == "Failed":
            err: Injected = op["error"]
            out["error"] = {"code": err.code, "message": err.message}
        return 200, out, {}

    def _list(self, query: dict[str, list[str]], api_version: str) -> tuple[int, Any, dict[str, str]]:
        failed = self._sync_error("list")
        if failed:
            return failed
        start = int((query.get("$skiptoken") or ["0"])[0])
        names = sorted(self.vms)
        chunk = names[start:start + self.list_page_size]
        out: dict[str, Any] = {"value": [self.vms[n] for n in chunk]}
        if start + self.list_page_size < len(names):
            out["nextLink"] = (f"{self.endpoint}{self._rg_path()}/providers/Microsoft.Compute/virtualMachines"
                               f"?api-version={api_version}&$skiptoken={start + self.list_page_size}")
        return 200, out, {}

    def _patch_disk(self, name: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        disk = self.disks.get(name)
        if disk is None:
            return _error(404, "ResourceNotFound", f"disk {name} not found")
        if "tags" in body:
            disk["tags"] = dict(body["tags"] or {})
        return 200, {k: v for k, v in disk.items() if k not in ("managedBy", "deleteOption")}, {}


def _error(status: int, code: str, message: str) -> tuple[int, Any, dict[str, str]]:
    headers = {"Retry-After": "7"} if status == 429 else {}  # ARM throttling names a wait
    return status, {"error": {"code": code, "message": message}}, headers


class _Handler(JsonHandler):
    state: AzureFake

    def extra_headers(self) -> dict[str, str]:
        return {"x-ms-request-id": str(uuid.uuid4())}


AzureFake.handler = _Handler
