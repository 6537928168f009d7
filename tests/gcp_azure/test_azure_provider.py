"""AzureProvider against the ARM fake: what it sends, and what it makes of the answers."""

from __future__ import annotations

import base64

import pytest

from orchestrator.providers.azure import image_reference
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
from tests.gcp_azure.gcp_azure_support import ORCH_ID, USER_DATA, azure_candidate, make_spec

VMS = r"/providers/Microsoft.Compute/virtualMachines"


def test_spot_launch_body(azure, az):
    spec = make_spec(azure_candidate(spot=True), disk_gb=150)
    inst = azure.launch(spec)

    assert az.violations == []
    body = az.puts[-1]
    props = body["properties"]
    assert body["location"] == "eastus"
    assert body["tags"] == {TAG_ID: ORCH_ID, TAG_POOL: "gpu-t4", TAG_RUNNER: spec.name}
    assert props["priority"] == "Spot"
    assert props["evictionPolicy"] == "Delete"
    assert props["billingProfile"] == {"maxPrice": -1}
    assert props["hardwareProfile"]["vmSize"] == "Standard_NC4as_T4_v3"
    os_disk = props["storageProfile"]["osDisk"]
    assert os_disk["deleteOption"] == "Delete" and os_disk["diskSizeGB"] == 150
    assert props["storageProfile"]["imageReference"] == {
        "publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest"}
    net = props["networkProfile"]
    assert net["networkApiVersion"] >= "2020-11-01"
    (nic,) = net["networkInterfaceConfigurations"]
    assert nic["properties"]["deleteOption"] == "Delete"
    assert nic["tags"][TAG_ID] == ORCH_ID
    assert nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"] == az.subnet_id
    assert base64.b64decode(props["osProfile"]["customData"]).decode() == USER_DATA
    assert props["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"] is True

    assert inst.instance_id == spec.name and inst.name == spec.name
    assert inst.cloud == "azure" and inst.location == "eastus"
    assert inst.spot is True and inst.state == "running"
    assert inst.instance_type == "Standard_NC4as_T4_v3"
    assert inst.tags[TAG_ID] == ORCH_ID


def test_max_price_and_on_demand(azure, az):
    azure.launch(make_spec(azure_candidate(max_price=0.3), "1-1-1"))
    assert az.puts[-1]["properties"]["billingProfile"] == {"maxPrice": 0.3}
    azure.launch(make_spec(azure_candidate(spot=False), "2-1-1"))
    props = az.puts[-1]["properties"]
    assert "priority" not in props and "evictionPolicy" not in props
    assert az.violations == []


def test_zone_and_image_ids(azure, az):
    image_id = "/subscriptions/s/resourceGroups/img/providers/Microsoft.Compute/images/runner-gpu"
    azure.launch(make_spec(azure_candidate(zone="2", image=image_id)))
    body = az.puts[-1]
    assert body["zones"] == ["2"]
    assert body["properties"]["storageProfile"]["imageReference"] == {"id": image_id}
    gallery = "/CommunityGalleries/gallery-1/Images/runner/Versions/latest"
    assert image_reference(gallery).community_gallery_image_id == gallery
    with pytest.raises(ProviderError):
        image_reference("ubuntu")


def test_delete_leaves_no_nic_or_disk(azure, az):
    inst = azure.launch(make_spec(azure_candidate()))
    assert len(az.nics) == 1 and len(az.disks) == 1
    azure.terminate(inst.instance_id, inst.location)
    assert az.vms == {} and az.nics == {} and az.disks == {}
    delete = next(c for c in az.calls if c.method == "DELETE")
    assert delete.query["forceDeletion"] == ["true"]


def test_the_fake_keeps_nic_and_disk_without_delete_option(az):
    # Without this, "no NIC or disk left" would prove nothing.
    az.create_foreign("someone-elses", {})
    az.evict("someone-elses")
    assert "someone-elses-nic" in az.nics and "someone-elses-disk" in az.disks


def test_os_disk_is_tagged_too(azure, az):
    spec = make_spec(azure_candidate())
    azure.launch(spec)
    (disk,) = az.disks.values()
    assert disk["tags"] == {TAG_ID: ORCH_ID, TAG_POOL: "gpu-t4", TAG_RUNNER: spec.name}


def test_relaunch_with_same_key_makes_no_second_vm(azure, az):
    spec = make_spec(azure_candidate())
    first = azure.launch(spec)
    second = azure.launch(spec)
    assert first.instance_id == second.instance_id
    assert len(az.vms) == 1 and len(az.puts) == 1


def test_name_taken_by_a_foreign_vm_is_a_used_launch_key(azure, az):
    spec = make_spec(azure_candidate())
    az.create_foreign(spec.name, {TAG_ID: "someone-else"})
    with pytest.raises(LaunchKeyUsedError):
        azure.launch(spec)
    assert az.puts == []


@pytest.mark.parametrize(
    "code, status, mode, message, expected",
    [
        ("SkuNotAvailable", 409, "sync",
         "The requested size for resource is currently not available in location 'eastus'.", CapacityError),
        ("AllocationFailed", 200, "async", "Allocation failed.", CapacityError),
        ("OverconstrainedAllocationRequest", 200, "async",
         "Allocation failed. VM(s) with the following constraints cannot be allocated.", CapacityError),
        ("ZonalAllocationFailed", 200, "async", "Allocation failed in zone 2.", CapacityError),
        ("QuotaExceeded", 409, "sync", "Quota exceeded for resources.", QuotaError),
        ("OperationNotAllowed", 409, "sync",
         "Operation could not be completed as it results in exceeding approved standardNCASv3_T4 Family "
         "Cores quota.", QuotaError),
        ("OperationNotAllowed", 409, "sync", "The operation is not allowed on a deallocated VM.", ProviderError),
        ("InvalidAuthenticationToken", 401, "sync", "The access token is invalid.", AuthError),
        ("AuthorizationFailed", 403, "sync",
         "The client does not have authorization to perform action "
         "'Microsoft.Compute/virtualMachines/write'.", AuthError),
        ("TooManyRequests", 429, "sync", "Too many requests.", TransientError),
        ("InternalServerError", 500, "sync", "Internal error.", TransientError),
        ("ServiceUnavailable", 503, "sync", "Service unavailable.", TransientError),
        ("InvalidParameter", 400, "sync", "Invalid parameter.", ProviderError),
    ],
)
def test_create_errors_map_to_provider_errors(azure, az, code, status, mode, message, expected):
    az.inject("put", code, message, status, mode=mode)
    with pytest.raises(ProviderError) as info:
        azure.launch(make_spec(azure_candidate()))
    assert type(info.value) is expected
    assert info.value.code == code


def test_failed_allocation_starts_deleting_the_failed_vm(azure, az):
    spec = make_spec(azure_candidate())
    az.inject_capacity_error("AllocationFailed")
    with pytest.raises(CapacityError):
        azure.launch(spec)
    deletes = [c for c in az.calls if c.method == "DELETE"]
    assert [c.path.rsplit("/", 1)[-1] for c in deletes] == [spec.name]
    # The same key now names a failed VM: the scaler must move to the next attempt.
    with pytest.raises(LaunchKeyUsedError):
        azure.launch(spec)
    azure.list_managed(["eastus"])  # ARM finishes the delete meanwhile
    assert az.vms == {} and az.nics == {} and az.disks == {}


def test_retry_after_is_kept_on_throttling(azure, az):
    az.inject("list", "TooManyRequests", "slow down", 429)
    with pytest.raises(TransientError) as info:
        azure.list_managed(["eastus"])
    assert info.value.retry_after == 7


def test_inventory_filters_by_tag_and_follows_pages(azure, az):
    az.list_page_size = 2
    ours = {azure.launch(make_spec(azure_candidate(), f"{n}-1-1")).instance_id for n in range(3)}
    az.create_foreign("other-orch-vm", {TAG_ID: "other-orch"})
    az.create_foreign("untagged-vm", {})
    before = sum(1 for c in az.calls if c.method == "GET" and c.path.endswith(VMS))

    found = azure.list_managed(["eastus"])

    lists = sum(1 for c in az.calls if c.method == "GET" and c.path.endswith(VMS)) - before
    assert {i.instance_id for i in found} == ours
    assert lists == 3  # 5 VMs, 2 a page
    assert azure.api_calls["virtual_machines.list"] == 3


def test_evicted_spot_vm_disappears_from_inventory(azure, az):
    inst = azure.launch(make_spec(azure_candidate()))
    az.evict(inst.instance_id)
    assert azure.list_managed(["eastus"]) == []
    assert az.nics == {} and az.disks == {}


def test_terminate_refuses_foreign_and_untagged_vms(azure, az):
    az.create_foreign("other-orch-vm", {TAG_ID: "other-orch"})
    az.create_foreign("untagged-vm", {})
    for name in ("other-orch-vm", "untagged-vm"):
        with pytest.raises(ProviderError):
            azure.terminate(name, "eastus")
        assert name in az.vms
    assert not [c for c in az.calls if c.method == "DELETE"]
    azure.terminate("never-existed", "eastus")  # gone is not an error


def test_base_url_is_honoured_for_every_call(azure, az, local_http_only):
    inst = azure.launch(make_spec(azure_candidate()))
    azure.list_managed(["eastus"])
    azure.terminate(inst.instance_id, inst.location)
    assert local_http_only, "the SDK sent nothing"
    assert all(url.startswith(az.endpoint) for url in local_http_only)
    assert len(local_http_only) == len(az.calls)
    assert az.violations == []  # includes: every call carried a bearer token


def test_tags_are_matched_case_insensitively_on_keys(azure, az):
    az.create_foreign("mixed-case", {"Orchestrator-Id": ORCH_ID})
    assert [i.instance_id for i in azure.list_managed(["eastus"])] == ["mixed-case"]


@pytest.mark.parametrize(
    "size, spot",
    [
        ("Standard_NC4as_T4_v3", True), ("Standard_NC4as_T4_v3", False),
        ("Standard_NV36ads_A10_v5", True), ("Standard_NC24ads_A100_v4", False),
        ("Standard_NC40ads_H100_v5", True), ("Standard_Mystery_v9", True),
    ],
)
def test_prices_are_positive(azure, size, spot):
    assert azure.price_per_hour(azure_candidate(instance_type=size, spot=spot)) > 0


def test_price_table_and_overrides(azure):
    spot = azure.price_per_hour(azure_candidate(spot=True))
    on_demand = azure.price_per_hour(azure_candidate(spot=False))
    assert 0 < spot < on_demand
    assert azure.price_per_hour(azure_candidate(price_per_hour=2.5)) == 2.5
    assert azure.price_per_hour(azure_candidate(max_price=0.05)) == 0.05
    assert azure.price_per_hour(azure_candidate(instance_type="standard_nc4as_t4_v3", spot=False)) == on_demand


def test_expected_gpus(azure):
    assert azure.expected_gpus(azure_candidate()) == 1
    assert azure.expected_gpus(azure_candidate(instance_type="Standard_NC96ads_A100_v4")) == 4
    assert azure.expected_gpus(azure_candidate(instance_type="Standard_D4s_v5")) == 0
    assert azure.expected_gpus(azure_candidate(gpu={"type": "a10", "count": 2})) == 2
