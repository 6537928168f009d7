"""AwsProvider.launch against a moto server: what lands in EC2 and what we send."""

from __future__ import annotations

import base64

import pytest

from orchestrator.providers.aws import client_token
from orchestrator.providers.base import (
    TAG_ID,
    TAG_POOL,
    TAG_RUNNER,
    CapacityError,
    LaunchKeyUsedError,
    ProviderError,
)
from tests.aws.aws_support import (
    AMI,
    ORCH_ID,
    REGION,
    body,
    candidate,
    capture,
    ec2_error,
    inject,
    launch_spec,
)


def _instances(ec2):
    return [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]


def _tags(raw):
    return {t["Key"]: t["Value"] for t in raw.get("Tags", [])}


def test_launch_makes_one_tagged_hardened_instance(provider, ec2, sent_run):
    spec = launch_spec(cand=candidate(max_price=0.4))
    inst = provider.launch(spec)

    raws = _instances(ec2)
    assert len(raws) == 1
    raw = raws[0]
    assert inst.instance_id == raw["InstanceId"]
    assert raw["InstanceType"] == "g4dn.xlarge"
    want = {TAG_ID: ORCH_ID, TAG_POOL: "gpu-t4", TAG_RUNNER: spec.name, "Name": spec.name}
    assert _tags(raw) == want
    assert raw["MetadataOptions"]["HttpTokens"] == "required"
    assert raw["MetadataOptions"]["HttpEndpoint"] == "enabled"
    assert raw["InstanceLifecycle"] == "spot"

    attr = ec2.describe_instance_attribute(
        InstanceId=inst.instance_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    ud = ec2.describe_instance_attribute(InstanceId=inst.instance_id, Attribute="userData")
    assert base64.b64decode(ud["UserData"]["Value"]).decode() == spec.user_data

    vols = ec2.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [inst.instance_id]}]
    )["Volumes"]
    assert len(vols) == 1
    assert _tags(vols[0]) == want
    assert vols[0]["Size"] == 120 and vols[0]["VolumeType"] == "gp3"

    assert inst.name == spec.name
    assert inst.cloud == "aws" and inst.location == REGION
    assert inst.spot is True
    assert inst.state in ("pending", "running")
    assert inst.launched_at is not None and inst.launched_at.utcoffset().total_seconds() == 0
    assert inst.pool == "gpu-t4"

    params = sent_run.last
    assert params["ClientToken"] == client_token(spec.launch_key)
    assert len(params["ClientToken"]) <= 64
    assert params["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
            "MaxPrice": "0.4",
        },
    }
    assert params["MinCount"] == params["MaxCount"] == 1
    assert params["ImageId"] == AMI
    assert params["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert params["MetadataOptions"]["HttpPutResponseHopLimit"] in (1, 2)
    kinds = {t["ResourceType"] for t in params["TagSpecifications"]}
    assert {"instance", "volume", "network-interface", "spot-instances-request"} <= kinds
    # The AMI's own root device (looked up, not the /dev/sda1 fallback) is the one resized.
    assert params["BlockDeviceMappings"] == [
        {
            "DeviceName": "/dev/xvda",
            "Ebs": {"VolumeSize": 120, "VolumeType": "gp3", "DeleteOnTermination": True},
        }
    ]


def test_on_demand_sends_no_market_options(provider, sent_run):
    provider.launch(launch_spec(cand=candidate(spot=False)))
    params = sent_run.last
    assert "InstanceMarketOptions" not in params
    assert "spot-instances-request" not in {t["ResourceType"] for t in params["TagSpecifications"]}


def test_spot_without_max_price_bids_on_demand_cap(provider, sent_run):
    provider.launch(launch_spec())
    assert "MaxPrice" not in sent_run.last["InstanceMarketOptions"]["SpotOptions"]


def test_root_device_is_looked_up_once_per_image(provider):
    provider.launch(launch_spec("1-1-1"))
    provider.launch(launch_spec("2-1-1"))
    assert provider.api_calls["describe_images"] == 1


def test_unknown_root_device_falls_back_to_sda1(provider, ec2, sent_run):
    image = ec2.register_image(Name="custom")["ImageId"]
    # moto registers it without a root device name.
    provider.launch(launch_spec(cand=candidate(image=image)))
    assert sent_run.last["BlockDeviceMappings"][0]["DeviceName"] == "/dev/sda1"


def test_same_launch_key_twice_makes_one_instance(provider, ec2, sent_run):
    spec = launch_spec("7-1-1")
    first = provider.launch(spec)
    second = provider.launch(spec)
    assert second.instance_id == first.instance_id
    assert len(_instances(ec2)) == 1
    assert provider.api_calls["run_instances"] == 1


def test_launch_key_gives_a_stable_token(make_provider, moto):
    """A retry after a crash (the lookup found nothing yet) sends the very same token."""
    tokens = []
    for _ in range(2):
        moto.reset()
        p = make_provider()
        sent = capture(p)
        p.launch(launch_spec("42-2-1"))
        tokens.append(sent.last["ClientToken"])
    assert tokens[0] == tokens[1] == client_token("42-2-1")
    assert client_token("42-2-2") != tokens[0]  # the next launch attempt gets a fresh token


def test_relaunch_of_a_terminated_key_asks_for_the_next_attempt(provider):
    spec = launch_spec("9-1-1")
    inst = provider.launch(spec)
    provider.terminate(inst.instance_id, inst.location)
    with pytest.raises(LaunchKeyUsedError):
        provider.launch(spec)
    # The next launch attempt is a new key, a new name and a new VM.
    fresh = provider.launch(launch_spec("9-1-2"))
    assert fresh.instance_id != inst.instance_id


def test_idempotent_instance_terminated_maps_to_launch_key_used(provider):
    inject(provider, "RunInstances", lambda req: ec2_error("IdempotentInstanceTerminated"))
    with pytest.raises(LaunchKeyUsedError) as err:
        provider.launch(launch_spec())
    assert err.value.code == "IdempotentInstanceTerminated"


def test_network_profile_and_subnet_rotation_on_capacity(make_provider, moto, ec2):
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    a = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone="us-east-1a")
    b = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.2.0/24", AvailabilityZone="us-east-1b")
    sub_a, sub_b = a["Subnet"]["SubnetId"], b["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="runners", Description="r", VpcId=vpc)["GroupId"]
    moto.client("iam").create_instance_profile(InstanceProfileName="runner-profile")
    provider = make_provider(
        subnet_ids=[sub_a, sub_b], security_group_ids=[sg], iam_instance_profile="runner-profile"
    )
    sent = capture(provider).calls
    # The first AZ has no capacity; the second does.
    inject(
        provider,
        "RunInstances",
        lambda req: ec2_error("InsufficientInstanceCapacity") if sub_a in body(req) else None,
    )
    spec = launch_spec()
    inst = provider.launch(spec)

    assert [p["SubnetId"] for p in sent] == [sub_a, sub_b]
    assert sent[0]["ClientToken"] != sent[1]["ClientToken"]
    assert sent[0]["ClientToken"] == client_token(spec.launch_key)
    assert all(p["SecurityGroupIds"] == [sg] for p in sent)
    assert all(p["IamInstanceProfile"] == {"Name": "runner-profile"} for p in sent)
    raw = ec2.describe_instances(InstanceIds=[inst.instance_id])["Reservations"][0]["Instances"][0]
    assert raw["SubnetId"] == sub_b


def _two_subnets(ec2) -> list[str]:
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    return [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24")["Subnet"]["SubnetId"] for i in (1, 2)]


def test_capacity_in_every_subnet_raises_capacity(make_provider, ec2):
    provider = make_provider(subnet_ids=_two_subnets(ec2))
    inject(provider, "RunInstances", lambda req: ec2_error("InsufficientInstanceCapacity"))
    with pytest.raises(CapacityError):
        provider.launch(launch_spec())
    assert provider.api_calls["run_instances"] == 2


def test_account_wide_spot_limit_does_not_rotate_subnets(make_provider, ec2):
    provider = make_provider(subnet_ids=_two_subnets(ec2))
    inject(provider, "RunInstances", lambda req: ec2_error("MaxSpotInstanceCountExceeded"))
    with pytest.raises(CapacityError):
        provider.launch(launch_spec())
    assert provider.api_calls["run_instances"] == 1


def test_instance_profile_arn_is_sent_as_arn(make_provider, moto):
    iam = moto.client("iam")
    arn = iam.create_instance_profile(InstanceProfileName="p2")["InstanceProfile"]["Arn"]
    provider = make_provider(iam_instance_profile=arn)
    sent = capture(provider)
    provider.launch(launch_spec())
    assert sent.last["IamInstanceProfile"] == {"Arn": arn}


def test_candidate_region_wins_and_clients_are_per_region(provider, moto):
    inst = provider.launch(launch_spec(cand=candidate(region="us-west-2", image=_west_ami(moto))))
    assert inst.location == "us-west-2"
    assert provider.client("us-west-2") is provider.client("us-west-2")
    assert provider.client("us-west-2") is not provider.client(REGION)
    assert provider.location_of(candidate()) == REGION
    assert provider.location_of(candidate(region="eu-west-1")) == "eu-west-1"


def _west_ami(moto):
    ec2 = moto.client("ec2", "us-west-2")
    return ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]


def test_candidate_without_image_is_a_clear_error(provider):
    with pytest.raises(ProviderError, match="no image"):
        provider.launch(launch_spec(cand=candidate(image=None)))


def test_oversized_user_data_is_refused_before_any_launch(provider):
    with pytest.raises(ProviderError, match="16384") as err:
        provider.launch(launch_spec(user_data="#cloud-config\n" + "x" * 17000))
    assert err.value.code == "UserDataTooLarge"
    assert provider.api_calls["run_instances"] == 0
