"""list_managed and terminate: only what carries our orchestrator-id, in few calls."""

from __future__ import annotations

import math

import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

from orchestrator.providers.base import TAG_ID, TAG_RUNNER, ProviderError
from tests.aws.aws_support import AMI, ORCH_ID, REGION, candidate, launch_spec


def _run(ec2, tags: dict[str, str] | None = None, count: int = 1) -> list[str]:
    kw = {}
    if tags:
        kw["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ]
    resp = ec2.run_instances(ImageId=AMI, MinCount=count, MaxCount=count, **kw)
    return [i["InstanceId"] for i in resp["Instances"]]


def _state(ec2, instance_id: str) -> str:
    res = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return res[0]["Instances"][0]["State"]["Name"]


@pytest.fixture
def foreign(ec2):
    """An instance of another orchestrator and one with no tags at all."""
    other = _run(ec2, {TAG_ID: "someone-else", TAG_RUNNER: "theirs"})[0]
    untagged = _run(ec2)[0]
    return other, untagged


def test_list_managed_returns_only_ours(provider, foreign):
    ours = provider.launch(launch_spec("1-1-1"))
    listed = provider.list_managed([REGION])
    assert [i.instance_id for i in listed] == [ours.instance_id]
    assert listed[0].name == ours.name
    assert listed[0].tags[TAG_ID] == ORCH_ID
    assert listed[0].spot is True
    assert listed[0].state in ("pending", "running")
    assert provider.api_calls["describe_instances"] == 2  # the launch lookup + one list


def test_foreign_instances_are_never_terminated(provider, ec2, foreign):
    for instance_id in foreign:
        with pytest.raises(ProviderError) as err:
            provider.terminate(instance_id, REGION)
        assert err.value.code == "NotManaged"
        assert _state(ec2, instance_id) == "running"
    assert provider.api_calls["terminate_instances"] == 0


def test_another_orchestrator_sees_nothing_of_ours(provider, make_provider):
    provider.launch(launch_spec("1-1-1"))
    assert make_provider("other-orch").list_managed([REGION]) == []


def test_terminate_removes_from_list_and_twice_is_fine(provider, ec2):
    inst = provider.launch(launch_spec("1-1-1"))
    provider.terminate(inst.instance_id, inst.location)
    assert provider.list_managed([REGION]) == []
    assert _state(ec2, inst.instance_id) == "terminated"
    provider.terminate(inst.instance_id, inst.location)
    assert provider.api_calls["terminate_instances"] == 1


def test_terminate_unknown_instance_is_fine(provider):
    provider.terminate("i-0123456789abcdef0", REGION)
    assert provider.api_calls["terminate_instances"] == 0


def test_list_managed_one_call_per_region(provider, moto):
    west_ami = moto.client("ec2", "us-west-2").describe_images(Owners=["amazon"])["Images"][0]
    east = provider.launch(launch_spec("1-1-1"))
    west = provider.launch(
        launch_spec("2-1-1", cand=candidate(region="us-west-2", image=west_ami["ImageId"]))
    )
    provider.api_calls.clear()
    listed = provider.list_managed([REGION, "us-west-2", REGION, "eu-west-1"])
    assert {(i.instance_id, i.location) for i in listed} == {
        (east.instance_id, REGION),
        (west.instance_id, "us-west-2"),
    }
    assert provider.api_calls["describe_instances"] == 3  # duplicates asked once


def test_list_managed_sends_server_side_filters(provider):
    seen = []
    provider.client(REGION).meta.events.register(
        "provide-client-params.ec2.DescribeInstances", lambda params, **_: seen.append(params)
    )
    provider.list_managed([REGION])
    filters = {f["Name"]: f["Values"] for f in seen[0]["Filters"]}
    assert filters[f"tag:{TAG_ID}"] == [ORCH_ID]
    assert "terminated" not in filters["instance-state-name"]
    assert {"pending", "running", "stopping", "stopped", "shutting-down"} <= set(
        filters["instance-state-name"]
    )


def test_list_managed_paginates_1000_instances(make_provider, moto):
    # A region with few default AMIs, seeded in the server's own backend: moto scans
    # every AMI per instance, and 1,000 RunInstances over HTTP take far longer.
    region = "mx-central-1"
    ec2 = moto.client("ec2", region)
    ec2.describe_images(ImageIds=[AMI])  # builds the region's backend
    backend = ec2_backends[DEFAULT_ACCOUNT_ID][region]
    for n in range(1000):
        backend.run_instances(
            AMI,
            1,
            None,
            [],
            tags={"instance": {TAG_ID: ORCH_ID, TAG_RUNNER: f"r{n}"}},
            instance_type="g4dn.xlarge",
            is_instance_type_default=False,
        )
    _run(ec2, {TAG_ID: "someone-else"}, count=20)
    page_size = 500
    provider = make_provider(list_page_size=page_size)
    listed = provider.list_managed([region])
    assert len(listed) == 1000
    assert len({i.instance_id for i in listed}) == 1000
    assert {i.location for i in listed} == {region}
    assert provider.api_calls["describe_instances"] <= math.ceil(1000 / page_size)
    assert provider.api_calls["describe_instances"] > 1  # it did paginate
