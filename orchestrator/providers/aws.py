"""AWS EC2: one-time spot or on-demand instances via RunInstances.

boto3 is imported here and nowhere else. Every call goes through `_call`, which
counts it and maps the cloud's errors onto the provider error classes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from datetime import timezone
from typing import Any, Iterable, Iterator

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from orchestrator.config import AwsCloud, Candidate
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
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "Unsupported",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
}
# Account-wide: another subnet (AZ) will not help.
_NO_ROTATE_CODES = {"MaxSpotInstanceCountExceeded"}
_QUOTA_CODES = {"VcpuLimitExceeded", "InstanceLimitExceeded"}
_TRANSIENT_CODES = {
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
}
_AUTH_CODES = {
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "ExpiredToken",
    "RequestExpired",
    "SignatureDoesNotMatch",
    "OptInRequired",
}
_LAUNCH_KEY_CODES = {"IdempotentInstanceTerminated", "IdempotentParameterMismatch"}

_LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
_STATE = {
    "pending": "pending",
    "running": "running",
    "stopping": "stopping",
    "stopped": "stopping",
    "shutting-down": "stopping",
    "terminated": "terminated",
}

_FALLBACK_ROOT_DEVICE = "/dev/sda1"
_SPOT_PRICE_TTL_S = 600.0
# Containers in a job are one network hop further from IMDS than the host.
_IMDS_HOP_LIMIT = 2
_LIST_PAGE_SIZE = 1000  # the EC2 maximum
_USER_DATA_MAX = 16384  # bytes before base64

# Linux on-demand list prices, us-east-1, USD/hour. They bound budget
# reservations, so a stale entry should err high; price_per_hour overrides.
ON_DEMAND_USD: dict[str, float] = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204,
    "g4dn.8xlarge": 2.176, "g4dn.12xlarge": 3.912, "g4dn.16xlarge": 4.352,
    "g4dn.metal": 7.824,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.8xlarge": 2.448,
    "g5.12xlarge": 5.672, "g5.16xlarge": 4.096, "g5.24xlarge": 8.144, "g5.48xlarge": 16.288,
    "g5g.xlarge": 0.42, "g5g.2xlarge": 0.556, "g5g.4xlarge": 0.828, "g5g.8xlarge": 1.372,
    "g5g.16xlarge": 2.744, "g5g.metal": 2.744,
    "g6.xlarge": 0.8048, "g6.2xlarge": 0.9776, "g6.4xlarge": 1.3232, "g6.8xlarge": 2.0144,
    "g6.12xlarge": 4.6016, "g6.16xlarge": 3.3968, "g6.24xlarge": 6.6752, "g6.48xlarge": 13.3504,
    "g6e.xlarge": 1.861, "g6e.2xlarge": 2.24208, "g6e.4xlarge": 3.00424,
    "g6e.8xlarge": 4.52856, "g6e.12xlarge": 10.49264, "g6e.16xlarge": 7.57719,
    "g6e.24xlarge": 15.06559, "g6e.48xlarge": 30.13118,
    "p3.2xlarge": 3.06, "p3.8xlarge": 12.24, "p3.16xlarge": 24.48, "p3dn.24xlarge": 31.212,
    "p4d.24xlarge": 32.7726, "p4de.24xlarge": 40.9657,
    "p5.48xlarge": 98.32,
}

GPU_COUNT: dict[str, int] = {
    "g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g4dn.4xlarge": 1, "g4dn.8xlarge": 1,
    "g4dn.12xlarge": 4, "g4dn.16xlarge": 1, "g4dn.metal": 8,
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1,
    "g5.12xlarge": 4, "g5.16xlarge": 1, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "g5g.xlarge": 1, "g5g.2xlarge": 1, "g5g.4xlarge": 1, "g5g.8xlarge": 1,
    "g5g.16xlarge": 2, "g5g.metal": 2,
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6.4xlarge": 1, "g6.8xlarge": 1,
    "g6.12xlarge": 4, "g6.16xlarge": 1, "g6.24xlarge": 4, "g6.48xlarge": 8,
    "g6e.xlarge": 1, "g6e.2xlarge": 1, "g6e.4xlarge": 1, "g6e.8xlarge": 1,
    "g6e.12xlarge": 4, "g6e.16xlarge": 1, "g6e.24xlarge": 4, "g6e.48xlarge": 8,
    "p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8, "p3dn.24xlarge": 8,
    "p4d.24xlarge": 8, "p4de.24xlarge": 8,
    "p5.48xlarge": 8,
}


def client_token(launch_key: str, salt: str = "") -> str:
    """RunInstances idempotency token (at most 64 ASCII chars) for a launch key."""
    return hashlib.sha256(f"{launch_key}{salt}".encode()).hexdigest()[:64]


def map_error(exc: Exception, action: str) -> ProviderError:
    """Translate a botocore failure into the provider error the scaler acts on."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return AuthError(
            f"AWS {action}: no usable credentials found (set AWS_PROFILE, AWS_ACCESS_KEY_ID/"
            f"AWS_SECRET_ACCESS_KEY or an instance role)",
            code=type(exc).__name__,
        )
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "Unknown")
        message = str(err.get("Message") or exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        text = f"AWS {action}: {code}: {message}"
        if code in _LAUNCH_KEY_CODES:
            return LaunchKeyUsedError(text, code=code)
        if code in _CAPACITY_CODES:
            return CapacityError(text, code=code)
        if code in _QUOTA_CODES:
            return QuotaError(text, code=code)
        if code in _AUTH_CODES:
            return AuthError(
                f"{text} (check the credentials and the IAM policy of the orchestrator)", code=code
            )
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientError(text, code=code)
        return ProviderError(text, code=code)
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return TransientError(f"AWS {action}: {exc}", code=type(exc).__name__)
    if isinstance(exc, BotoCoreError):
        return ProviderError(f"AWS {action}: {exc}", code=type(exc).__name__)
    return ProviderError(f"AWS {action}: {exc}")


def _tags(raw: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw or []}


class AwsProvider(Provider):
    cloud = "aws"
    min_billing_seconds = 60

    def __init__(
        self,
        cloud: AwsCloud,
        orchestrator_id: str,
        clock: Clock,
        *,
        session: boto3.Session | None = None,
        max_attempts: int = 4,
        list_page_size: int = _LIST_PAGE_SIZE,
        max_connections: int = 64,
    ):
        self.config = cloud
        self.orchestrator_id = orchestrator_id
        self.clock = clock
        # EC2 accepts MaxResults from 5 to 1000.
        self.list_page_size = max(5, min(1000, list_page_size))
        self.api_calls: Counter[str] = Counter()
        self._session = session or boto3.Session()
        # max_attempts counts every try, the first included (0 is taken as 1).
        self._boto_config = BotoConfig(
            retries={"mode": "standard", "total_max_attempts": max(1, max_attempts)},
            connect_timeout=10,
            read_timeout=60,
            # one per launch worker, so a burst reuses connections instead of dropping them
            max_pool_connections=max(10, max_connections),
        )
        self._clients: dict[str, Any] = {}
        self._root_devices: dict[tuple[str, str], str] = {}
        self._spot_prices: dict[tuple[str, str], tuple[float, float | None]] = {}
        # boto3 sessions are not thread-safe for client creation; the scaler and reaper share us.
        self._lock = threading.Lock()

    # --- plumbing -------------------------------------------------------------

    def client(self, region: str | None = None) -> Any:
        """The EC2 client of a region (cached); tests hook its events."""
        region = region or self.config.region
        with self._lock:
            c = self._clients.get(region)
            if c is None:
                c = self._session.client(
                    "ec2",
                    region_name=region,
                    endpoint_url=self.config.endpoint_url,
                    config=self._boto_config,
                )
                self._clients[region] = c
            return c

    def _count(self, op: str) -> None:
        with self._lock:
            self.api_calls[op] += 1

    def _call(self, region: str, op: str, **params: Any) -> dict[str, Any]:
        self._count(op)
        try:
            return getattr(self.client(region), op)(**params)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a ProviderError
            raise map_error(exc, op) from exc

    def _pages(self, region: str, op: str, **params: Any) -> Iterator[dict[str, Any]]:
        pages = iter(self.client(region).get_paginator(op).paginate(**params))
        while True:
            try:
                page = next(pages)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001
                self._count(op)
                raise map_error(exc, op) from exc
            self._count(op)  # one request per page
            yield page

    def region_of(self, candidate: Candidate) -> str:
        return candidate.region or self.config.region

    def location_of(self, candidate: Candidate) -> str:
        return self.region_of(candidate)

    def _to_instance(self, raw: dict[str, Any], region: str) -> CloudInstance:
        tags = _tags(raw.get("Tags"))
        launched = raw.get("LaunchTime")
        return CloudInstance(
            instance_id=raw["InstanceId"],
            name=tags.get(TAG_RUNNER) or tags.get("Name") or raw["InstanceId"],
            cloud=self.cloud,
            location=region,
            instance_type=raw.get("InstanceType", ""),
            spot=raw.get("InstanceLifecycle") == "spot",
            state=_STATE.get(raw.get("State", {}).get("Name", ""), "pending"),
            launched_at=launched.astimezone(timezone.utc) if launched else None,
            tags=tags,
        )

    def _describe(self, region: str, filters: list[dict[str, Any]]) -> list[CloudInstance]:
        found: list[CloudInstance] = []
        params: dict[str, Any] = {
            "Filters": filters,
            "PaginationConfig": {"PageSize": self.list_page_size},
        }
        for page in self._pages(region, "describe_instances", **params):
            for reservation in page.get("Reservations", []):
                for raw in reservation.get("Instances", []):
                    found.append(self._to_instance(raw, region))
        return found

    # --- launch ---------------------------------------------------------------

    def _root_device(self, region: str, image: str) -> str:
        """Root device of the AMI, so disk_gb resizes the root volume rather than adding one."""
        if image.startswith("resolve:ssm:"):
            return _FALLBACK_ROOT_DEVICE  # resolved by EC2 at launch; nothing to describe
        key = (region, image)
        with self._lock:
            cached = self._root_devices.get(key)
        if cached:
            return cached
        try:
            images = self._call(region, "describe_images", ImageIds=[image]).get("Images", [])
        except ProviderError as exc:
            if exc.code and exc.code.startswith("InvalidAMIID"):
                raise ProviderError(
                    f"AWS image {image} does not exist in {region} "
                    f"or is not shared with this account",
                    code=exc.code,
                ) from exc
            raise
        device = (images[0].get("RootDeviceName") if images else None) or _FALLBACK_ROOT_DEVICE
        with self._lock:
            self._root_devices[key] = device
        return device

    def _find_by_name(self, region: str, name: str) -> list[CloudInstance]:
        return self._describe(
            region,
            [
                {"Name": f"tag:{TAG_ID}", "Values": [self.orchestrator_id]},
                {"Name": f"tag:{TAG_RUNNER}", "Values": [name]},
                {"Name": "instance-state-name", "Values": _LIVE_STATES + ["terminated"]},
            ],
        )

    def _run_params(self, spec: LaunchSpec, region: str) -> dict[str, Any]:
        cand = spec.candidate
        if not cand.image:
            raise ProviderError(
                f"AWS candidate {cand.key()} has no image: set `image` to an AMI id "
                f"or resolve:ssm:PARAMETER"
            )
        if len(spec.user_data.encode()) > _USER_DATA_MAX:
            raise ProviderError(
                f"AWS user-data for {spec.name} is {len(spec.user_data.encode())} bytes; "
                f"EC2 takes at most {_USER_DATA_MAX} (use bootstrap: callback)",
                code="UserDataTooLarge",
            )
        # The launch lookup and list_managed find VMs by these two tags.
        tags = {**spec.tags, TAG_ID: self.orchestrator_id, TAG_RUNNER: spec.name, "Name": spec.name}
        tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
        kinds = ["instance", "volume", "network-interface"]
        if cand.spot:
            kinds.append("spot-instances-request")
        params: dict[str, Any] = {
            "ImageId": cand.image,
            "InstanceType": cand.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": spec.user_data,
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                "HttpPutResponseHopLimit": _IMDS_HOP_LIMIT,
            },
            "TagSpecifications": [{"ResourceType": k, "Tags": tag_list} for k in kinds],
            "BlockDeviceMappings": [
                {
                    "DeviceName": self._root_device(region, cand.image),
                    "Ebs": {
                        "VolumeSize": spec.pool.disk_gb,
                        "VolumeType": "gp3",
                        "DeleteOnTermination": True,
                    },
                }
            ],
        }
        if cand.spot:
            spot: dict[str, Any] = {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            }
            if cand.max_price is not None:
                spot["MaxPrice"] = str(cand.max_price)
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        # Subnets and security groups are regional: they apply in the configured region only.
        if region == self.config.region and self.config.security_group_ids:
            params["SecurityGroupIds"] = list(self.config.security_group_ids)
        profile = self.config.iam_instance_profile
        if profile:
            key = "Arn" if profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: profile}
        return params

    def launch(self, spec: LaunchSpec) -> CloudInstance:
        region = self.region_of(spec.candidate)
        # A retried launch gets back the VM it made, also where ClientToken is not honoured.
        previous = self._find_by_name(region, spec.name)
        live = [i for i in previous if i.state != "terminated"]
        if live:
            return live[0]
        if previous:
            raise LaunchKeyUsedError(
                f"AWS launch key {spec.launch_key!r} already made {previous[0].instance_id}, "
                f"which is gone",
                code="IdempotentInstanceTerminated",
            )

        params = self._run_params(spec, region)
        subnets: list[str | None] = (
            list(self.config.subnet_ids) if region == self.config.region and self.config.subnet_ids
            else [None]
        )
        last: ProviderError | None = None
        for i, subnet in enumerate(subnets):
            attempt = dict(params)
            if subnet:
                attempt["SubnetId"] = subnet
            # Changing the subnet under one token is an IdempotentParameterMismatch.
            attempt["ClientToken"] = client_token(spec.launch_key, f"#{subnet}" if i else "")
            try:
                resp = self._call(region, "run_instances", **attempt)
            except CapacityError as exc:
                last = exc
                if exc.code in _NO_ROTATE_CODES:
                    raise
                log.info("AWS %s: %s in subnet %s, trying the next", spec.name, exc.code, subnet)
                continue
            return self._to_instance(resp["Instances"][0], region)
        raise last or ProviderError("AWS launch: no subnet was tried")

    # --- terminate / list -----------------------------------------------------

    def terminate(self, instance_id: str, location: str) -> None:
        region = location or self.config.region
        try:
            resp = self._call(region, "describe_instances", InstanceIds=[instance_id])
        except ProviderError as exc:
            if exc.code and exc.code.startswith("InvalidInstanceID"):
                return  # already gone (or never was)
            raise
        raws = [r for res in resp.get("Reservations", []) for r in res.get("Instances", [])]
        if not raws:
            return
        raw = raws[0]
        if _tags(raw.get("Tags")).get(TAG_ID) != self.orchestrator_id:
            raise ProviderError(
                f"AWS instance {instance_id} in {region} does not carry {TAG_ID}="
                f"{self.orchestrator_id}; refusing to terminate it",
                code="NotManaged",
            )
        if raw.get("State", {}).get("Name") == "terminated":
            return
        try:
            self._call(region, "terminate_instances", InstanceIds=[instance_id])
        except ProviderError as exc:
            if exc.code == "InvalidInstanceID.NotFound":
                return
            raise

    def list_managed(self, locations: Iterable[str]) -> list[CloudInstance]:
        regions = list(dict.fromkeys(loc or self.config.region for loc in locations))
        found: list[CloudInstance] = []
        for region in regions:
            found.extend(
                self._describe(
                    region,
                    [
                        {"Name": f"tag:{TAG_ID}", "Values": [self.orchestrator_id]},
                        {"Name": "instance-state-name", "Values": _LIVE_STATES},
                    ],
                )
            )
        return found

    # --- prices / GPUs --------------------------------------------------------

    def _on_demand(self, candidate: Candidate) -> float | None:
        return ON_DEMAND_USD.get(candidate.instance_type)

    def _spot_price(self, region: str, instance_type: str) -> float | None:
        key = (region, instance_type)
        now = self.clock.time()
        with self._lock:
            hit = self._spot_prices.get(key)
        if hit and now - hit[0] < _SPOT_PRICE_TTL_S:
            return hit[1]
        resp = self._call(
            region,
            "describe_spot_price_history",
            InstanceTypes=[instance_type],
            ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            StartTime=self.clock.now(),
        )
        latest: dict[str, tuple[Any, float]] = {}
        for row in resp.get("SpotPriceHistory", []):
            az, ts = row.get("AvailabilityZone", ""), row.get("Timestamp")
            try:
                price = float(row["SpotPrice"])
            except (KeyError, ValueError):
                continue
            if az not in latest or (ts is not None and ts > latest[az][0]):
                latest[az] = (ts, price)
        # We may land in any AZ: the dearest current one bounds what we pay.
        value = max((p for _, p in latest.values()), default=None)
        with self._lock:
            self._spot_prices[key] = (now, value)
        return value

    def price_per_hour(self, candidate: Candidate) -> float:
        if candidate.price_per_hour is not None:
            return float(candidate.price_per_hour)
        on_demand = self._on_demand(candidate)
        if candidate.spot:
            try:
                spot = self._spot_price(self.region_of(candidate), candidate.instance_type)
            except ProviderError as exc:
                if on_demand is None:
                    raise
                log.warning("AWS spot price of %s unavailable (%s); using the on-demand price",
                            candidate.instance_type, exc)
                spot = None
            if spot is not None:
                return spot
        if on_demand is None:
            raise ProviderError(
                f"AWS has no built-in price for {candidate.instance_type}"
                f"{' and no spot price history' if candidate.spot else ''}: "
                f"set price_per_hour on candidate {candidate.key()}",
                code="UnknownPrice",
            )
        return on_demand

    def expected_gpus(self, candidate: Candidate) -> int:
        if candidate.gpu:
            return candidate.gpu.count
        return GPU_COUNT.get(candidate.instance_type, 0)


