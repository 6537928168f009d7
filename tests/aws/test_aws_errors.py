"""EC2 errors become the provider errors the scaler acts on, keeping the cloud's code."""

from __future__ import annotations

import pytest
from botocore.exceptions import NoCredentialsError

from orchestrator.config import AwsCloud
from orchestrator.providers.aws import AwsProvider
from orchestrator.providers.base import (
    AuthError,
    CapacityError,
    LaunchKeyUsedError,
    ProviderError,
    QuotaError,
    TransientError,
)
from tests.aws.aws_support import REGION, candidate, ec2_error, inject, launch_spec
from tests.fakes.moto import free_port

CASES = [
    ("InsufficientInstanceCapacity", 500, CapacityError),
    ("InsufficientInstanceCapacity", 400, CapacityError),
    ("SpotMaxPriceTooLow", 400, CapacityError),
    ("MaxSpotInstanceCountExceeded", 400, CapacityError),
    ("Unsupported", 400, CapacityError),
    ("InsufficientCapacity", 400, CapacityError),
    ("VcpuLimitExceeded", 400, QuotaError),
    ("InstanceLimitExceeded", 400, QuotaError),
    ("RequestLimitExceeded", 503, TransientError),
    ("Throttling", 400, TransientError),
    ("InternalError", 500, TransientError),
    ("SomethingNew", 502, TransientError),
    ("AuthFailure", 401, AuthError),
    ("UnauthorizedOperation", 403, AuthError),
    ("InvalidClientTokenId", 403, AuthError),
    ("ExpiredToken", 400, AuthError),
    ("IdempotentInstanceTerminated", 400, LaunchKeyUsedError),
    ("InvalidParameterValue", 400, ProviderError),
]


@pytest.mark.parametrize("code,status,kind", CASES)
def test_run_instances_errors_are_mapped(provider, code, status, kind):
    inject(provider, "RunInstances", lambda req: ec2_error(code, status, "nope"))
    with pytest.raises(kind) as err:
        provider.launch(launch_spec())
    assert type(err.value) is kind
    assert err.value.code == code
    assert code in str(err.value)


def test_auth_error_says_what_to_check(provider):
    inject(provider, "RunInstances", lambda req: ec2_error("UnauthorizedOperation", 403))
    with pytest.raises(AuthError, match="IAM policy"):
        provider.launch(launch_spec())


def test_missing_credentials_is_an_auth_error(provider):
    def no_creds(**_):
        raise NoCredentialsError()

    provider.client(REGION).meta.events.register("before-sign.ec2.DescribeInstances", no_creds)
    with pytest.raises(AuthError, match="credentials") as err:
        provider.list_managed([REGION])
    assert err.value.code == "NoCredentialsError"


def test_unreachable_endpoint_is_transient(moto, clock):
    provider = AwsProvider(
        AwsCloud(region=REGION, endpoint_url=f"http://127.0.0.1:{free_port()}"),
        "orch-test",
        clock,
        session=moto.session(),
        max_attempts=1,
    )
    with pytest.raises(TransientError):
        provider.list_managed([REGION])


def test_list_errors_are_mapped(provider):
    inject(provider, "DescribeInstances", lambda req: ec2_error("RequestLimitExceeded", 503))
    with pytest.raises(TransientError):
        provider.list_managed([REGION])


def test_terminate_errors_are_mapped(provider):
    inst = provider.launch(launch_spec())
    inject(provider, "TerminateInstances", lambda req: ec2_error("UnauthorizedOperation", 403))
    with pytest.raises(AuthError):
        provider.terminate(inst.instance_id, inst.location)


def test_unknown_image_is_a_clear_error(provider):
    with pytest.raises(ProviderError, match="does not exist") as err:
        provider.launch(launch_spec(cand=candidate(image="ami-00000000000000000")))
    assert err.value.code.startswith("InvalidAMIID")


def test_one_attempt_means_one_request(provider):
    sends = []

    def fail(req):
        sends.append(req)
        return ec2_error("InternalError", 500)

    inject(provider, "RunInstances", fail)
    with pytest.raises(TransientError):
        provider.launch(launch_spec())
    assert len(sends) == 1
