"""A Compute Engine REST fake over real HTTP, for the GCP provider and conformance tests.

It answers the requests google-cloud-compute actually sends (instances insert/get/
delete/aggregatedList, zoneOperations get/wait), keeps state, checks every insert
body against what our provider must send and records violations. Operations move
PENDING -> RUNNING -> DONE, one step per get/wait, so a client that polls terminates
at once without sleeping.

    with GceFake(project="p") as gce:
        provider = GcpProvider(GcpCloud(project="p", api_endpoint=gce.endpoint), ...)
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from tests.fakes.json_http import FakeServer, JsonHandler

REQUIRED_LABELS = ("orchestrator-id", "orchestrator-pool", "orchestrator-runner")
_LABEL_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
_LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_FILTER_RE = re.compile(r'^\s*labels\.([a-z0-9_-]+)\s*(=|eq)\s*"?([^"]*)"?\s*$')

CAPACITY_MESSAGE = (
    "The zone '{zone}' does not have enough resources available to fulfill the request. "
    "Try a different zone, or try again later."
)


@dataclass
class Injected:
    """One planned failure: `mode` 'operation' fails the operation (how GCE reports
    stockouts), 'http' fails the request itself."""

    code: str
    message: str
    status: int
    mode: str = "operation"
    reason: str | None = None


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class GceFake(FakeServer):
    def __init__(self, project: str = "test-project", list_page_size: int | None = None):
        self.project = project
        self.list_page_size = list_page_size  # server-side cap, to exercise pagination
        self.instances: dict[tuple[str, str], dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.request_ids: dict[str, str] = {}
        self.calls: list[Call] = []
        self.violations: list[str] = []
        self.inserts: list[dict[str, Any]] = []
        self._errors: dict[str, list[Injected]] = {}
        self._ids = itertools.count(1000)
        self._lock = threading.RLock()

    # --- lifecycle --------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.instances.clear()
            self.operations.clear()
            self.request_ids.clear()
            self.calls.clear()
            self.violations.clear()
            self.inserts.clear()
            self._errors.clear()

    # --- test controls ----------------------------------------------------------

    def inject(self, verb: str, code: str, message: str, status: int, *, mode: str = "operation",
               reason: str | None = None, times: int = 1) -> None:
        """Fail the next `times` calls of `verb` (insert | delete | get | list)."""
        with self._lock:
            self._errors.setdefault(verb, []).extend(
                Injected(code, message, status, mode, reason) for _ in range(times))

    def inject_capacity_error(self, zone: str = "", *, times: int = 1,
                              code: str = "ZONE_RESOURCE_POOL_EXHAUSTED") -> None:
        self.inject("insert", code, CAPACITY_MESSAGE.format(zone=zone or "the zone"), 503, times=times)

    def inject_quota_error(self, *, times: int = 1) -> None:
        self.inject("insert", "QUOTA_EXCEEDED",
                    "Quota 'NVIDIA_T4_GPUS' exceeded.  Limit: 0.0 in region us-central1.", 403, times=times)

    def preempt(self, zone: str, name: str) -> None:
        """A Spot preemption with instanceTerminationAction=DELETE: the VM just disappears."""
        with self._lock:
            self.instances.pop((zone, name), None)

    def create_foreign(self, zone: str, name: str, labels: dict[str, str] | None = None,
                       machine_type: str = "n1-standard-4") -> dict[str, Any]:
        """An instance made by someone else, straight into the state."""
        with self._lock:
            inst = self._new_instance(zone, {
                "name": name,
                "machineType": f"zones/{zone}/machineTypes/{machine_type}",
                "labels": dict(labels or {}),
                "scheduling": {"provisioningModel": "STANDARD"},
            })
            inst["status"] = "RUNNING"
            self.instances[(zone, name)] = inst
            return inst

    def instance(self, zone: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self.instances.get((zone, name))

    def count(self, method: str, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._lock:
            return sum(1 for c in self.calls if c.method == method and rx.search(c.path))

    # --- internals ----------------------------------------------------------------

    def _link(self, path: str) -> str:
        return f"https://www.googleapis.com/compute/v1/projects/{self.project}/{path}"

    def _new_instance(self, zone: str, body: dict[str, Any]) -> dict[str, Any]:
        inst = json.loads(json.dumps(body))
        inst.update({
            "kind": "compute#instance",
            "id": str(next(self._ids)),
            "zone": self._link(f"zones/{zone}"),
            "selfLink": self._link(f"zones/{zone}/instances/{body['name']}"),
            "status": "PROVISIONING",
            "creationTimestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        })
        mt = inst.get("machineType", "")
        if mt and not mt.startswith("https://"):
            inst["machineType"] = self._link(mt)
        return inst

    def _operation(self, zone: str, kind: str, target: str, on_done: Any = None,
                   error: Injected | None = None) -> dict[str, Any]:
        name = f"operation-{uuid.uuid4().hex[:20]}"
        op = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": name,
            "zone": self._link(f"zones/{zone}"),
            "operationType": kind,
            "targetLink": self._link(f"zones/{zone}/instances/{target}"),
            "status": "PENDING",
            "progress": 0,
            "insertTime": datetime.now(timezone.utc).isoformat(),
            "selfLink": self._link(f"zones/{zone}/operations/{name}"),
        }
        self.operations[name] = {"op": op, "on_done": on_done, "error": error, "zone": zone}
        return op

    def _advance(self, name: str) -> dict[str, Any] | None:
        entry = self.operations.get(name)
        if entry is None:
            return None
        op = entry["op"]
        if op["status"] == "PENDING":
            op["status"] = "RUNNING"
            op["progress"] = 50
        elif op["status"] == "RUNNING":
            op["status"] = "DONE"
            op["progress"] = 100
            op["endTime"] = datetime.now(timezone.utc).isoformat()
            err: Injected | None = entry["error"]
            if err is not None:
                op["error"] = {"errors": [{"code": err.code, "message": err.message}]}
                op["httpErrorStatusCode"] = err.status
                op["httpErrorMessage"] = "SERVICE UNAVAILABLE" if err.status == 503 else "FORBIDDEN"
            elif entry["on_done"] is not None:
                entry["on_done"]()
        return op

    def _take_error(self, verb: str) -> Injected | None:
        queue = self._errors.get(verb)
        return queue.pop(0) if queue else None

    def check_insert(self, zone: str, body: dict[str, Any], query: dict[str, list[str]]) -> list[str]:
        """What our provider must send on every insert; returns the problems."""
        problems: list[str] = []
        name = body.get("name", "")
        where = f"insert {name}"
        rid = (query.get("requestId") or [""])[0]
        try:
            uuid.UUID(rid)
        except ValueError:
            problems.append(f"{where}: requestId {rid!r} is not a UUID")
        if not _NAME_RE.match(name):
            problems.append(f"{where}: bad instance name")
        labels = body.get("labels") or {}
        for key in REQUIRED_LABELS:
            if key not in labels:
                problems.append(f"{where}: label {key} missing")
        for key, value in labels.items():
            if not _LABEL_KEY_RE.match(key) or not _LABEL_RE.match(str(value)):
                problems.append(f"{where}: label {key}={value!r} is not a valid GCE label")
        sched = body.get("scheduling") or {}
        if sched.get("provisioningModel") not in ("SPOT", "STANDARD"):
            problems.append(f"{where}: scheduling.provisioningModel missing")
        if sched.get("instanceTerminationAction") != "DELETE":
            problems.append(f"{where}: instanceTerminationAction is not DELETE")
        mrd = (sched.get("maxRunDuration") or {}).get("seconds")
        if not mrd or int(mrd) <= 0:
            problems.append(f"{where}: maxRunDuration missing")
        if sched.get("onHostMaintenance") != "TERMINATE":
            problems.append(f"{where}: onHostMaintenance is not TERMINATE")
        if sched.get("automaticRestart") is not False:
            problems.append(f"{where}: automaticRestart is not false")
        for acc in body.get("guestAccelerators") or []:
            if not re.match(rf"^(.*/)?zones/{re.escape(zone)}/acceleratorTypes/[a-z0-9-]+$",
                            acc.get("acceleratorType", "")):
                problems.append(f"{where}: bad acceleratorType {acc.get('acceleratorType')!r}")
            if int(acc.get("acceleratorCount", 0)) < 1:
                problems.append(f"{where}: acceleratorCount < 1")
        mt = body.get("machineType", "")
        if not re.search(rf"zones/{re.escape(zone)}/machineTypes/[a-z0-9-]+$", mt):
            problems.append(f"{where}: bad machineType {mt!r}")
        disks = body.get("disks") or []
        boot = [d for d in disks if d.get("boot")]
        if len(boot) != 1:
            problems.append(f"{where}: expected one boot disk")
        else:
            d = boot[0]
            params = d.get("initializeParams") or {}
            if d.get("autoDelete") is not True:
                problems.append(f"{where}: boot disk autoDelete is not true")
            if not params.get("sourceImage"):
                problems.append(f"{where}: boot disk has no sourceImage")
            if int(params.get("diskSizeGb") or 0) < 10:
                problems.append(f"{where}: boot disk diskSizeGb missing")
            if (params.get("labels") or {}).get("orchestrator-id") != labels.get("orchestrator-id"):
                problems.append(f"{where}: boot disk not labelled")
        items = {i.get("key"): i.get("value") for i in (body.get("metadata") or {}).get("items") or []}
        if not items.get("user-data"):
            problems.append(f"{where}: metadata user-data missing")
        if not body.get("networkInterfaces"):
            problems.append(f"{where}: no network interface")
        return problems

    def _match_filter(self, inst: dict[str, Any], flt: str) -> bool:
        if not flt:
            return True
        m = _FILTER_RE.match(flt)
        if not m:
            self.violations.append(f"aggregatedList: filter {flt!r} not understood")
            return True
        return (inst.get("labels") or {}).get(m.group(1)) == m.group(3)

    # --- request handling (called from the handler thread) ---------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any,
               headers: dict[str, str]) -> tuple[int, Any]:
        with self._lock:
            self.calls.append(Call(method, path, query, body, headers))
            prefix = f"/compute/v1/projects/{self.project}/"
            if not path.startswith(prefix):
                return _error(404, "notFound", f"unknown path {path}")
            rest = path[len(prefix):]
            parts = rest.split("/")
            if parts[:2] == ["aggregated", "instances"] and method == "GET":
                return self._aggregated(query)
            if len(parts) >= 3 and parts[0] == "zones":
                zone = parts[1]
                if parts[2] == "instances":
                    if len(parts) == 3 and method == "POST":
                        return self._insert(zone, body or {}, query)
                    if len(parts) == 4 and method == "GET":
                        return self._get(zone, parts[3])
                    if len(parts) == 4 and method == "DELETE":
                        return self._delete(zone, parts[3])
                if parts[2] == "operations" and len(parts) >= 4:
                    if (len(parts) == 4 and method == "GET") or (
                            len(parts) == 5 and parts[4] == "wait" and method == "POST"):
                        op = self._advance(parts[3])
                        if op is None:
                            return _error(404, "notFound", f"operation {parts[3]} not found")
                        return 200, op
            return _error(404, "notFound", f"unsupported {method} {path}")

    def _http_error(self, verb: str) -> tuple[int, Any] | None:
        err = self._errors.get(verb)
        if err and err[0].mode == "http":
            e = err.pop(0)
            return _error(e.status, e.reason or e.code, e.message)
        return None

    def _insert(self, zone: str, body: dict[str, Any], query: dict[str, list[str]]) -> tuple[int, Any]:
        self.inserts.append(body)
        self.violations.extend(self.check_insert(zone, body, query))
        rid = (query.get("requestId") or [""])[0]
        if rid and rid in self.request_ids:
            # GCE answers a repeated requestId with the original operation.
            return 200, self.operations[self.request_ids[rid]]["op"]
        failed = self._http_error("insert")
        if failed:
            return failed
        name = body.get("name", "")
        if (zone, name) in self.instances:
            return _error(409, "alreadyExists",
                          f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' already exists")
        err = self._take_error("insert")
        if err is None:
            inst = self._new_instance(zone, body)
            self.instances[(zone, name)] = inst

            def started() -> None:
                if self.instances.get((zone, name)) is inst:
                    inst["status"] = "RUNNING"

            op = self._operation(zone, "insert", name, on_done=started)
        else:
            op = self._operation(zone, "insert", name, error=err)
        if rid:
            self.request_ids[rid] = op["name"]
        return 200, op

    def _get(self, zone: str, name: str) -> tuple[int, Any]:
        failed = self._http_error("get")
        if failed:
            return failed
        inst = self.instances.get((zone, name))
        if inst is None:
            return _error(404, "notFound",
                          f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' was not found")
        return 200, inst

    def _delete(self, zone: str, name: str) -> tuple[int, Any]:
        failed = self._http_error("delete")
        if failed:
            return failed
        inst = self.instances.get((zone, name))
        if inst is None:
            return _error(404, "notFound",
                          f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' was not found")
        inst["status"] = "STOPPING"

        def gone() -> None:
            if self.instances.get((zone, name)) is inst:
                del self.instances[(zone, name)]

        return 200, self._operation(zone, "delete", name, on_done=gone, error=self._take_error("delete"))

    def _aggregated(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        failed = self._http_error("list")
        if failed:
            return failed
        flt = (query.get("filter") or [""])[0]
        page = int((query.get("maxResults") or ["500"])[0])
        if self.list_page_size:
            page = min(page, self.list_page_size)
        start = int((query.get("pageToken") or ["0"])[0])
        matching = sorted(
            (k for k, inst in self.instances.items() if self._match_filter(inst, flt)),
            key=lambda k: (k[0], k[1]))
        chunk = matching[start:start + page]
        items: dict[str, Any] = {}
        for zone, name in chunk:
            items.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(self.instances[(zone, name)])
        # GCE lists zones with nothing in them as warnings; the client must cope.
        items.setdefault("zones/us-east1-b", {"warning": {
            "code": "NO_RESULTS_ON_PAGE",
            "message": "There are no results for scope 'zones/us-east1-b' on this page."}})
        out: dict[str, Any] = {"kind": "compute#instanceAggregatedList", "items": items,
                               "id": f"projects/{self.project}/aggregated/instances"}
        if start + page < len(matching):
            out["nextPageToken"] = str(start + page)
        return 200, out


def _error(status: int, reason: str, message: str) -> tuple[int, Any]:
    return status, {"error": {"code": status, "message": message,
                              "errors": [{"message": message, "domain": "global", "reason": reason}]}}


class _Handler(JsonHandler):
    state: GceFake
    content_type = "application/json; charset=UTF-8"


GceFake.handler = _Handler
