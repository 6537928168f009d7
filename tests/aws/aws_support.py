"""Helpers for the AWS provider tests: specs, captured requests, injected EC2 answers."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from botocore.awsrequest import AWSResponse

from orchestrator.config import Candidate, PoolConfig
from orchestrator.providers.aws import AwsProvider
from orchestrator.providers.base import LaunchSpec, managed_tags, vm_name

ORCH_ID = "orch-test"
REGION = "us-east-1"
# A moto default Amazon Linux AMI whose root device is /dev/xvda, not the fallback.
AMI = "ami-760aaa0f"


def candidate(**kw: Any) -> Candidate:
    kw.setdefault("cloud", "aws")
    kw.setdefault("instance_type", "g4dn.xlarge")
    kw.setdefault("image", AMI)
    kw.setdefault("spot", True)
    return Candidate(**kw)


def launch_spec(
    launch_key: str = "1001-1-1",
    *,
    cand: Candidate | None = None,
    user_data: str = "#cloud-config\nruncmd: [echo hi]\n",
    orchestrator_id: str = ORCH_ID,
    disk_gb: int = 120,
) -> LaunchSpec:
    cand = cand or candidate()
    pool = PoolConfig(name="gpu-t4", labels=["gpu-t4"], candidates=[cand], disk_gb=disk_gb)
    name = vm_name(orchestrator_id, pool.name, launch_key)
    return LaunchSpec(
        name=name,
        launch_key=launch_key,
        candidate=cand,
        pool=pool,
        user_data=user_data,
        tags=managed_tags(orchestrator_id, pool.name, name),
    )


class Sent:
    """Every parameter dict a client sent for one operation, after validation."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, params: dict[str, Any], **_: Any) -> None:
        self.calls.append(dict(params))

    @property
    def last(self) -> dict[str, Any]:
        return self.calls[-1]


class _Raw:
    def __init__(self, body: bytes):
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def ec2_error(code: str, status: int = 400, message: str = "injected") -> AWSResponse:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error></Errors><RequestID>r-1</RequestID></Response>"
    ).encode()
    return AWSResponse("http://fake", status, {"Content-Type": "text/xml"}, _Raw(body))


def ec2_ok(xml_body: str) -> AWSResponse:
    return AWSResponse("http://fake", 200, {"Content-Type": "text/xml"}, _Raw(xml_body.encode()))


def inject(
    provider: AwsProvider,
    operation: str,
    respond: Callable[[Any], AWSResponse | None],
    region: str = REGION,
) -> None:
    """Answer `operation` with respond(request) instead of the server, when it returns one."""

    def handler(request: Any, **_: Any) -> AWSResponse | None:
        return respond(request)

    provider.client(region).meta.events.register(f"before-send.ec2.{operation}", handler)


def capture(provider: AwsProvider, operation: str = "RunInstances", region: str = REGION) -> Sent:
    sent = Sent()
    provider.client(region).meta.events.register(f"provide-client-params.ec2.{operation}", sent)
    return sent


def body(request: Any) -> str:
    """The form-encoded body of an outgoing EC2 request."""
    raw = request.body or ""
    return raw.decode() if isinstance(raw, bytes) else str(raw)
