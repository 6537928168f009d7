"""GcpProvider against the Compute Engine fake: what it sends, and what it makes of the answers."""

from __future__ import annotations

import uuid

import pytest

from orchestrator.providers.base import (
    TAG_ID,
    TAG_POOL,
    TAG_RUNNER,
    AuthError,
    CapacityError,
    LaunchKeyUsedError,
    ProviderError,
    QuotaError,
    TransientError,
)
from orchestrator.providers.gcp import GcpProvider, label_value, request_id
from tests.gcp_azure.gcp_azure_support import GCE_IMAGE, ORCH_ID, USER_DATA, ZONE, gcp_candidate, make_spec


def _query(call, key):
    return (call.query.get(key) or [None])[0]


def test_spot_launch_sends_spot_scheduling_gpu_labels_and_user_data(gcp, gce):
    spec = make_spec(gcp_candidate(spot=True), max_lifetime="6h", disk_gb=120)
    inst = gcp.launch(spec)

    assert gce.violations == []
    body = gce.inserts[-1]
    sched = body["scheduling"]
    assert sched["provisioningModel"] == "SPOT"
    assert sched["instanceTerminationAction"] == "DELETE"
    assert int(sched["maxRunDuration"]["seconds"]) == 6 * 3600
    assert sched["onHostMaintenance"] == "TERMINATE"
    assert sched["automaticRestart"] is False
    assert body["guestAccelerators"] == [
        {"acceleratorType": f"zones/{ZONE}/acceleratorTypes/nvidia-tesla-t4", "acceleratorCount": 1}]
    assert body["machineType"] == f"zones/{ZONE}/machineTypes/n1-standard-4"
    assert body["labels"] == {TAG_ID: ORCH_ID, TAG_POOL: "gpu-t4", TAG_RUNNER: spec.name}
    boot = body["disks"][0]
    assert boot["autoDelete"] is True and boot["boot"] is True
    assert boot["initializeParams"]["sourceImage"] == GCE_IMAGE
    assert int(boot["initializeParams"]["diskSizeGb"]) == 120
    assert boot["initializeParams"]["labels"][TAG_ID] == ORCH_ID
    assert {"key": "user-data", "value": USER_DATA} in body["metadata"]["items"]
    assert body["name"] == spec.name

    assert inst.instance_id == spec.name and inst.name == spec.name
    assert inst.location == ZONE and inst.cloud == "gcp"
    assert inst.spot is True and inst.instance_type == "n1-standard-4"
    assert inst.state == "running"
    assert inst.tags[TAG_ID] == ORCH_ID and inst.pool == "gpu-t4"


def test_on_demand_also_gets_max_run_duration(gcp, gce):
    gcp.launch(make_spec(gcp_candidate(spot=False), max_lifetime="90m"))
    sched = gce.inserts[-1]["scheduling"]
    assert sched["provisioningModel"] == "STANDARD"
    assert int(sched["maxRunDuration"]["seconds"]) == 5400
    assert sched["instanceTerminationAction"] == "DELETE"
    assert gce.violations == []


def test_accelerator_optimized_types_carry_no_guest_accelerators(gcp, gce):
    cand = gcp_candidate(instance_type="a2-highgpu-1g", gpu=None)
    gcp.launch(make_spec(cand))
    assert "guestAccelerators" not in gce.inserts[-1] or not gce.inserts[-1]["guestAccelerators"]
    assert gcp.expected_gpus(cand) == 1
    assert gcp.expected_gpus(gcp_candidate(instance_type="a3-highgpu-8g", gpu=None)) == 8
    assert gcp.expected_gpus(gcp_candidate(instance_type="g2-standard-4", gpu=None)) == 1
    assert gcp.expected_gpus(gcp_candidate(instance_type="n1-standard-4", gpu=None)) == 0
    assert gcp.expected_gpus(gcp_candidate(gpu={"type": "nvidia-tesla-t4", "count": 2})) == 2


def test_network_and_service_account_come_from_config(make_gcp, gce):
    gcp = make_gcp(network="runners-vpc", subnetwork="runners-sub", service_account="ci@p.iam.gserviceaccount.com")
    gcp.launch(make_spec(gcp_candidate()))
    body = gce.inserts[-1]
    nic = body["networkInterfaces"][0]
    assert nic["network"] == "global/networks/runners-vpc"
    assert nic["subnetwork"] == "regions/us-central1/subnetworks/runners-sub"
    assert body["serviceAccounts"][0]["email"] == "ci@p.iam.gserviceaccount.com"


def test_label_values_are_made_valid_for_gce():
    assert label_value("Gpu.T4 Pool") == "gpu_t4_pool"
    assert len(label_value("x" * 100)) == 63


def test_request_id_is_a_deterministic_uuid_of_the_launch_key(make_gcp, gce):
    a = request_id(ORCH_ID, "1001-1-1")
    assert a == request_id(ORCH_ID, "1001-1-1")
    assert a != request_id(ORCH_ID, "1001-1-2")
    assert a != request_id("other-orch", "1001-1-1")
    uuid.UUID(a)

    # Two provider instances (e.g. after a restart) send the same requestId for one key.
    spec = make_spec(gcp_candidate(), "1001-1-1")
    make_gcp().launch(spec)
    make_gcp().launch(spec)
    inserts = [c for c in gce.calls if c.method == "POST" and c.path.endswith("/instances")]
    assert [_query(c, "requestId") for c in inserts] == [a, a]
    assert len(gce.instances) == 1


def test_relaunch_with_same_key_makes_no_second_vm(gcp, gce):
    spec = make_spec(gcp_candidate())
    first = gcp.launch(spec)
    second = gcp.launch(spec)
    assert first.instance_id == second.instance_id
    assert len(gce.instances) == 1


def test_existing_vm_of_ours_is_adopted_on_already_exists(gcp, gce):
    spec = make_spec(gcp_candidate())
    gcp.launch(spec)
    gce.request_ids.clear()  # GCE forgets requestIds after a while; the name still collides
    again = gcp.launch(spec)
    assert again.instance_id == spec.name
    assert len(gce.instances) == 1


def test_name_taken_by_a_foreign_vm_is_a_used_launch_key(gcp, gce):
    spec = make_spec(gcp_candidate())
    gce.create_foreign(ZONE, spec.name, {TAG_ID: "someone-else"})
    with pytest.raises(LaunchKeyUsedError):
        gcp.launch(spec)
    assert gce.instance(ZONE, spec.name)["labels"] == {TAG_ID: "someone-else"}


def test_reused_request_id_whose_vm_is_gone_is_a_used_launch_key(gcp, gce):
    spec = make_spec(gcp_candidate())
    inst = gcp.launch(spec)
    gce.preempt(ZONE, inst.instance_id)
    with pytest.raises(LaunchKeyUsedError):
        gcp.launch(spec)


@pytest.mark.parametrize(
    "code, status, mode, reason, message, expected",
    [
        ("ZONE_RESOURCE_POOL_EXHAUSTED", 503, "operation", None,
         "The zone does not have enough resources available to fulfill the request.", CapacityError),
        ("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", 503, "operation", None,
         "The zone does not have enough resources available to fulfill the request. '(resource type:compute)'.",
         CapacityError),
        ("UNSUPPORTED_OPERATION", 503, "operation", None,
         "A n1-standard-4 VM instance with 1 nvidia-tesla-t4 accelerator(s) is currently unavailable in the "
         "zone. Alternatively, you can try your request again with a different VM hardware configuration "
         "or at a later time. resource pool exhausted", CapacityError),
        ("ZONE_RESOURCE_POOL_EXHAUSTED", 503, "http", "ZONE_RESOURCE_POOL_EXHAUSTED",
         "stockout", CapacityError),
        ("QUOTA_EXCEEDED", 403, "operation", None,
         "Quota 'NVIDIA_T4_GPUS' exceeded.  Limit: 0.0 in region us-central1.", QuotaError),
        ("QUOTA_EXCEEDED", 403, "http", "quotaExceeded",
         "Quota 'GPUS_ALL_REGIONS' exceeded.  Limit: 0.0 globally.", QuotaError),
        ("forbidden", 403, "http", "forbidden",
         "Required 'compute.instances.create' permission for 'projects/test-project'", AuthError),
        ("authError", 401, "http", "authError", "Invalid Credentials", AuthError),
        ("rateLimitExceeded", 403, "http", "rateLimitExceeded", "Rate Limit Exceeded", TransientError),
        ("rateLimitExceeded", 429, "http", "rateLimitExceeded", "Too many requests", TransientError),
        ("rateLimitExceeded", 403, "http", "rateLimitExceeded",
         "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute'", TransientError),
        ("backendError", 503, "http", "backendError", "Backend Error", TransientError),
        ("internalError", 500, "http", "internalError", "Internal Error", TransientError),
        ("invalid", 400, "http", "invalid", "Invalid value for field 'resource.machineType'", ProviderError),
    ],
)
def test_insert_errors_map_to_provider_errors(gcp, gce, code, status, mode, reason, message, expected):
    gce.inject("insert", code, message, status, mode=mode, reason=reason)
    with pytest.raises(ProviderError) as info:
        gcp.launch(make_spec(gcp_candidate()))
    assert type(info.value) is expected
    assert gce.instances == {}


def test_capacity_error_is_reported_then_the_next_launch_works(gcp, gce):
    gce.inject_capacity_error(ZONE)
    with pytest.raises(CapacityError) as info:
        gcp.launch(make_spec(gcp_candidate(), "1-1-1"))
    assert info.value.code == "ZONE_RESOURCE_POOL_EXHAUSTED"
    assert gcp.launch(make_spec(gcp_candidate(), "1-1-2")).state == "running"


def test_inventory_is_one_filtered_aggregated_list(gcp, gce):
    a = gcp.launch(make_spec(gcp_candidate(), "1-1-1"))
    b = gcp.launch(make_spec(gcp_candidate(zone="europe-west4-a"), "2-1-1"))
    gce.create_foreign(ZONE, "other-orch-vm", {TAG_ID: "other-orch"})
    gce.create_foreign(ZONE, "untagged-vm", {})
    before = len(gce.calls)

    found = gcp.list_managed([ZONE])

    calls = gce.calls[before:]
    assert len(calls) == 1
    assert calls[0].path.endswith("/aggregated/instances")
    assert _query(calls[0], "filter") == f'labels.{TAG_ID} = "{ORCH_ID}"'
    # Every zone is covered, not only the ones asked about.
    assert {i.instance_id for i in found} == {a.instance_id, b.instance_id}
    assert {i.location for i in found} == {ZONE, "europe-west4-a"}


def test_inventory_follows_pages(gcp, gce):
    gce.list_page_size = 2
    names = {gcp.launch(make_spec(gcp_candidate(), f"{n}-1-1")).instance_id for n in range(5)}
    before = gce.count("GET", r"/aggregated/instances$")
    assert {i.instance_id for i in gcp.list_managed([ZONE])} == names
    assert gce.count("GET", r"/aggregated/instances$") - before == 3


def test_inventory_never_shows_foreign_vms_even_if_the_filter_is_ignored(gcp, gce, monkeypatch):
    gce.create_foreign(ZONE, "other-orch-vm", {TAG_ID: "other-orch"})
    monkeypatch.setattr(gce, "_match_filter", lambda inst, flt: True)
    assert gcp.list_managed([ZONE]) == []


def test_preempted_spot_vm_disappears_from_inventory(gcp, gce):
    inst = gcp.launch(make_spec(gcp_candidate()))
    gce.preempt(ZONE, inst.instance_id)
    assert gcp.list_managed([ZONE]) == []


def test_terminate_deletes_ours_and_waits_for_the_operation(gcp, gce):
    inst = gcp.launch(make_spec(gcp_candidate()))
    gcp.terminate(inst.instance_id, inst.location)
    assert gce.instance(ZONE, inst.instance_id) is None
    assert gcp.list_managed([ZONE]) == []
    # Already gone is not an error.
    gcp.terminate(inst.instance_id, inst.location)


def test_terminate_refuses_foreign_and_untagged_vms(gcp, gce):
    gce.create_foreign(ZONE, "other-orch-vm", {TAG_ID: "other-orch"})
    gce.create_foreign(ZONE, "untagged-vm", {})
    for name in ("other-orch-vm", "untagged-vm"):
        with pytest.raises(ProviderError):
            gcp.terminate(name, ZONE)
        assert gce.instance(ZONE, name) is not None
    assert gce.count("DELETE", r"/instances/") == 0


def test_delete_errors_are_mapped(gcp, gce):
    inst = gcp.launch(make_spec(gcp_candidate()))
    gce.inject("delete", "rateLimitExceeded", "slow down", 429, mode="http", reason="rateLimitExceeded")
    with pytest.raises(TransientError):
        gcp.terminate(inst.instance_id, inst.location)
    gce.inject("list", "forbidden", "no", 403, mode="http", reason="forbidden")
    with pytest.raises(AuthError):
        gcp.list_managed([ZONE])


def test_api_endpoint_is_honoured_for_every_call(gcp, gce, local_http_only):
    inst = gcp.launch(make_spec(gcp_candidate()))
    gcp.list_managed([ZONE])
    gcp.terminate(inst.instance_id, inst.location)
    assert local_http_only, "the SDK sent nothing"
    assert all(url.startswith(gce.endpoint) for url in local_http_only)
    assert len(local_http_only) == len(gce.calls)
    # Operations are polled on the same endpoint, not through ExtendedOperation's default one.
    assert gce.count("POST", r"/operations/[^/]+/wait$") >= 2


def test_polling_uses_the_injected_sleep(make_gcp, gce, clock):
    naps: list[float] = []
    gcp = make_gcp()
    gcp.poll_sleep = naps.append
    gcp.launch(make_spec(gcp_candidate()))
    assert naps and all(n == gcp.poll_interval for n in naps)


def test_missing_credentials_are_an_auth_error(clock, monkeypatch):
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    from orchestrator.config import GcpCloud

    def no_adc(*a, **k):
        raise DefaultCredentialsError("no ADC")

    monkeypatch.setattr(google.auth, "default", no_adc)
    gcp = GcpProvider(GcpCloud(project="p"), ORCH_ID, clock)  # constructing needs no credentials
    with pytest.raises(AuthError):
        gcp.list_managed([ZONE])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"spot": False},
        {"instance_type": "g2-standard-8", "gpu": None},
        {"instance_type": "a2-highgpu-1g", "gpu": None},
        {"instance_type": "a2-ultragpu-1g", "gpu": None},
        {"instance_type": "a3-highgpu-8g", "gpu": None},
        {"instance_type": "n1-standard-8", "gpu": {"type": "nvidia-tesla-t4", "count": 2}},
        {"instance_type": "mystery-type-1", "gpu": None},
    ],
)
def test_prices_are_positive(gcp, kw):
    assert gcp.price_per_hour(gcp_candidate(**kw)) > 0


def test_spot_is_cheaper_and_price_per_hour_overrides(gcp):
    spot = gcp.price_per_hour(gcp_candidate(spot=True))
    on_demand = gcp.price_per_hour(gcp_candidate(spot=False))
    assert 0 < spot < on_demand
    assert on_demand == pytest.approx(0.19 + 0.35)
    assert gcp.price_per_hour(gcp_candidate(price_per_hour=1.23)) == 1.23
    two = gcp.price_per_hour(gcp_candidate(spot=False, gpu={"type": "nvidia-tesla-t4", "count": 2}))
    assert two == pytest.approx(0.19 + 2 * 0.35)
