"""One adapter per provider for the conformance suite.

An adapter bundles a provider wired to its fake cloud with the few things the suite
cannot do through the Provider interface: inject a capacity error, make a VM that is
not ours, and look at the cloud directly. Adding a provider is adding one adapter
class and one entry in ADAPTERS.

Providers whose module is not in the tree yet are still listed, as a skipped param
that names the missing module, so the suite's coverage is visible in every run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# A bare `pytest` does not put the repository root on sys.path; `tests.fakes` lives there.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from orchestrator.config import AzureCloud, Candidate, GcpCloud, PoolConfig  # noqa: E402
from orchestrator.core.clock import FakeClock  # noqa: E402
from orchestrator.providers.base import LaunchSpec, Provider, managed_tags, vm_name  # noqa: E402
from tests.fakes.azure_server import AzureFake  # noqa: E402
from tests.fakes.gce_server import GceFake  # noqa: E402
from tests.fakes.lro import no_real_sleep  # noqa: E402,F401  (autouse in this folder)

ORCH_ID = "orch-conf"
POOL = "conf-pool"
USER_DATA = "#cloud-config\nruncmd: [echo conformance]\n"


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class Adapter:
    """What the suite needs from one cloud besides its Provider."""

    name = ""
    provider: Provider
    candidates: list[Candidate]  # the first is launched; all are priced

    @property
    def candidate(self) -> Candidate:
        return self.candidates[0]

    def spec(self, launch_key: str, candidate: Candidate | None = None) -> LaunchSpec:
        cand = candidate or self.candidate
        pool = PoolConfig(name=POOL, labels=[POOL], candidates=[cand], max_lifetime="2h", disk_gb=50)
        name = vm_name(ORCH_ID, POOL, launch_key)
        return LaunchSpec(name=name, launch_key=launch_key, candidate=cand, pool=pool,
                          user_data=USER_DATA, tags=managed_tags(ORCH_ID, POOL, name))

    def inject_capacity_error(self) -> None:
        """Make the next launch fail for lack of capacity, the way this cloud says it."""
        raise NotImplementedError

    def create_foreign(self, tags: dict[str, str]) -> tuple[str, str]:
        """Make a VM behind the provider's back; returns (instance_id, location)."""
        raise NotImplementedError

    def exists(self, instance_id: str, location: str) -> bool:
        """Whether the cloud still has the VM (and it is not terminated)."""
        raise NotImplementedError

    def live_count(self) -> int:
        """Every live VM in the cloud, ours or not."""
        raise NotImplementedError

    def violations(self) -> list[str]:
        """Request-shape problems the fake recorded."""
        return []


# --- GCP ---------------------------------------------------------------------------


class GcpAdapter(Adapter):
    name = "gcp"
    zone = "us-central1-a"

    def __init__(self, fake: GceFake):
        from orchestrator.providers.gcp import GcpProvider

        self.fake = fake
        self.provider = GcpProvider(GcpCloud(project=fake.project, api_endpoint=fake.endpoint), ORCH_ID,
                                    FakeClock(), poll_sleep=lambda s: None)
        image = "projects/deeplearning-platform-release/global/images/family/common-cu124"
        self.candidates = [
            Candidate(cloud="gcp", zone=self.zone, instance_type="n1-standard-4", image=image,
                      gpu={"type": "nvidia-tesla-t4", "count": 1}, spot=True),
            Candidate(cloud="gcp", zone=self.zone, instance_type="n1-standard-4", image=image,
                      gpu={"type": "nvidia-tesla-t4", "count": 1}, spot=False),
            Candidate(cloud="gcp", zone=self.zone, instance_type="g2-standard-8", image=image),
            Candidate(cloud="gcp", zone=self.zone, instance_type="a2-highgpu-1g", image=image),
            Candidate(cloud="gcp", zone=self.zone, instance_type="a3-highgpu-8g", image=image, spot=False),
        ]

    def inject_capacity_error(self) -> None:
        self.fake.inject_capacity_error(self.zone)

    def create_foreign(self, tags: dict[str, str]) -> tuple[str, str]:
        name = f"foreign-{len(self.fake.instances)}"
        self.fake.create_foreign(self.zone, name, tags)
        return name, self.zone

    def exists(self, instance_id: str, location: str) -> bool:
        return self.fake.instance(location, instance_id) is not None

    def live_count(self) -> int:
        return len(self.fake.instances)

    def violations(self) -> list[str]:
        return list(self.fake.violations)


# --- Azure -------------------------------------------------------------------------


class AzureAdapter(Adapter):
    name = "azure"

    def __init__(self, fake: AzureFake):
        from orchestrator.providers.azure import AzureProvider

        self.fake = fake
        cloud = AzureCloud(subscription_id=fake.subscription_id, resource_group=fake.resource_group,
                           location=fake.location, subnet_id=fake.subnet_id, base_url=fake.endpoint)
        self.provider = AzureProvider(cloud, ORCH_ID, FakeClock(), credential=fake.credential(),
                                      client_kwargs=fake.client_kwargs())
        image = "Canonical:ubuntu-24_04-lts:server:latest"
        self.candidates = [
            Candidate(cloud="azure", location=fake.location, instance_type=size, image=image, spot=spot)
            for size, spot in [
                ("Standard_NC4as_T4_v3", True), ("Standard_NC4as_T4_v3", False),
                ("Standard_NV36ads_A10_v5", True), ("Standard_NC24ads_A100_v4", True),
                ("Standard_NC40ads_H100_v5", False),
            ]
        ]

    def inject_capacity_error(self) -> None:
        self.fake.inject_capacity_error("AllocationFailed")

    def create_foreign(self, tags: dict[str, str]) -> tuple[str, str]:
        name = f"foreign-{len(self.fake.vms)}"
        self.fake.create_foreign(name, tags)
        return name, self.fake.location

    def exists(self, instance_id: str, location: str) -> bool:
        return instance_id in self.fake.vms

    def live_count(self) -> int:
        return len(self.fake.vms)

    def violations(self) -> list[str]:
        return list(self.fake.violations)


# --- AWS (moto) --------------------------------------------------------------------


class AwsAdapter(Adapter):
    name = "aws"
    region = "us-east-1"
    ami = "ami-760aaa0f"  # one of moto's built-in AMIs

    def __init__(self, server: Any):
        from orchestrator.config import AwsCloud
        from orchestrator.providers.aws import AwsProvider

        server.reset()
        self.ec2 = server.client("ec2", self.region)
        # botocore's retries.max_attempts counts retries, not attempts: 0 means one
        # attempt, so an injected 5xx is not retried after a real backoff sleep.
        self.provider = AwsProvider(AwsCloud(region=self.region, endpoint_url=server.endpoint_url), ORCH_ID,
                                    FakeClock(), session=server.session(), max_attempts=0)
        self.candidates = [
            Candidate(cloud="aws", region=self.region, instance_type=t, image=self.ami, spot=spot)
            for t, spot in [("g4dn.xlarge", True), ("g4dn.xlarge", False), ("g5.xlarge", False),
                            ("p4d.24xlarge", False)]
        ]

    def inject_capacity_error(self) -> None:
        from botocore.awsrequest import AWSResponse

        class Raw:
            def __init__(self, body: bytes):
                self.body = body

            def stream(self, **_: Any) -> Iterator[bytes]:
                yield self.body

        fired: list[bool] = []
        xml = ('<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
               "<Code>InsufficientInstanceCapacity</Code><Message>We currently do not have sufficient "
               "capacity in the Availability Zone you requested.</Message></Error></Errors>"
               "<RequestID>r-1</RequestID></Response>").encode()

        def once(request: Any, **_: Any) -> Any:
            if fired:
                return None
            fired.append(True)
            return AWSResponse("http://moto", 500, {"Content-Type": "text/xml"}, Raw(xml))

        self.provider.client(self.region).meta.events.register("before-send.ec2.RunInstances", once)

    def create_foreign(self, tags: dict[str, str]) -> tuple[str, str]:
        params: dict[str, Any] = {"ImageId": self.ami, "MinCount": 1, "MaxCount": 1, "InstanceType": "t3.micro"}
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "instance",
                                            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
        inst = self.ec2.run_instances(**params)["Instances"][0]
        return inst["InstanceId"], self.region

    def _states(self) -> dict[str, str]:
        out = {}
        for res in self.ec2.describe_instances()["Reservations"]:
            for inst in res["Instances"]:
                out[inst["InstanceId"]] = inst["State"]["Name"]
        return out

    def exists(self, instance_id: str, location: str) -> bool:
        return self._states().get(instance_id) not in (None, "terminated", "shutting-down")

    def live_count(self) -> int:
        return sum(1 for s in self._states().values() if s not in ("terminated", "shutting-down"))


# --- sandbox -----------------------------------------------------------------------


class SandboxAdapter(Adapter):
    name = "sandbox"

    def __init__(self) -> None:
        from orchestrator.config import SandboxCloud
        from orchestrator.providers.sandbox import SandboxProvider, SandboxWorld

        self.world = SandboxWorld(FakeClock(), SandboxCloud())
        self.provider = SandboxProvider(self.world, ORCH_ID)
        self.candidates = [
            Candidate(cloud="sandbox", instance_type="gpu-t4-sim", spot=True),
            Candidate(cloud="sandbox", instance_type="gpu-t4-sim", spot=False),
            Candidate(cloud="sandbox", instance_type="gpu-t4-sim", spot=True, price_per_hour=0.25),
        ]

    def inject_capacity_error(self) -> None:
        self.world.fail_next_launches(1)

    def create_foreign(self, tags: dict[str, str]) -> tuple[str, str]:
        vm = self.world.add_foreign(tags)
        return vm.instance_id, vm.location

    def exists(self, instance_id: str, location: str) -> bool:
        vm = self.world.vms.get(instance_id)
        return vm is not None and vm.state != "terminated"

    def live_count(self) -> int:
        return len(self.world.live())


# --- registry ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def conformance_gce() -> Iterator[GceFake]:
    with GceFake(project="conformance") as fake:
        yield fake


@pytest.fixture(scope="session")
def conformance_azure() -> Iterator[AzureFake]:
    with AzureFake() as fake:
        yield fake


def _gcp(request: pytest.FixtureRequest) -> Adapter:
    fake = request.getfixturevalue("conformance_gce")
    fake.reset()
    return GcpAdapter(fake)


def _azure(request: pytest.FixtureRequest) -> Adapter:
    fake = request.getfixturevalue("conformance_azure")
    fake.reset()
    return AzureAdapter(fake)


def _aws(request: pytest.FixtureRequest) -> Adapter:
    return AwsAdapter(request.getfixturevalue("moto_server"))


def _sandbox(request: pytest.FixtureRequest) -> Adapter:
    return SandboxAdapter()


# name -> (module that must exist, factory)
ADAPTERS: dict[str, tuple[str, Callable[[pytest.FixtureRequest], Adapter]]] = {
    "gcp": ("orchestrator.providers.gcp", _gcp),
    "azure": ("orchestrator.providers.azure", _azure),
    "aws": ("orchestrator.providers.aws", _aws),
    "sandbox": ("orchestrator.providers.sandbox", _sandbox),
}


def _params() -> list[Any]:
    params = []
    for name, (module, _) in ADAPTERS.items():
        marks = [] if _have(module) else [pytest.mark.skip(reason=f"{module} is not in the tree yet")]
        params.append(pytest.param(name, id=name, marks=marks))
    return params


if _have("orchestrator.providers.aws"):
    from tests.fakes.moto import moto_server  # noqa: E402,F401  (session fixture, started only for aws)


@pytest.fixture(params=_params())
def adapter(request: pytest.FixtureRequest) -> Adapter:
    return ADAPTERS[request.param][1](request)



