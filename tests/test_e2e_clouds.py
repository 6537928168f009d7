"""End to end through POST /webhook on the real cloud SDKs: boto3 against a moto
server, google-cloud-compute and azure-mgmt-compute against their fake HTTP servers."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest

from orch_support import ADMIN_TOKEN, REPO, WEBHOOK_SECRET, job_payload, post_webhook
from orchestrator.config import load_config_text
from orchestrator.core.breaker import SpotBreaker
from orchestrator.providers.aws import AwsProvider
from orchestrator.providers.azure import AzureProvider
from orchestrator.providers.base import TAG_ID, TAG_POOL, TAG_RUNNER
from orchestrator.providers.gcp import GcpProvider
from tests.aws.aws_support import capture, ec2_error, inject
from tests.cloud_init.cloud_init_support import require_tool
from tests.fakes.azure_server import AzureFake
from tests.fakes.gce_server import GceFake
from tests.fakes.moto import start_moto_server

AMI = "ami-760aaa0f"
GCE_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu124"
AZ_IMAGE = "Canonical:ubuntu-24_04-lts:server:latest"


@pytest.fixture(scope="module")
def moto():
    with start_moto_server() as server:
        yield server


@pytest.fixture(scope="module")
def gce():
    fake = GceFake().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def azure():
    fake = AzureFake().start()
    yield fake
    fake.stop()


def _config(db: str, moto, gce, azure):
    text = f"""
github: {{simulated: true, webhook_secret: {WEBHOOK_SECRET}, allowed_repositories: ["octo-org/*"]}}
server: {{admin_tokens: [{ADMIN_TOKEN}], public_url: "https://runners.example.com", orchestrator_id: orch-e2e}}
database: {{url: "{db}"}}
clouds:
  aws: {{region: us-east-1, endpoint_url: "{moto.endpoint_url}"}}
  gcp: {{project: {gce.project}, api_endpoint: "{gce.endpoint}"}}
  azure: {{subscription_id: {azure.subscription_id}, resource_group: {azure.resource_group}, location: {azure.location}, subnet_id: "{azure.subnet_id}", base_url: "{azure.endpoint}"}}
pools:
  - name: gpu-t4
    labels: [gpu-t4]
    disk_gb: 120
    candidates:
      - {{cloud: aws, region: us-east-1, instance_type: g4dn.xlarge, image: {AMI}, spot: true}}
      - {{cloud: gcp, zone: us-central1-a, instance_type: n1-standard-4, gpu: {{type: nvidia-tesla-t4, count: 1}}, image: {GCE_IMAGE}, spot: true}}
      - {{cloud: azure, location: {azure.location}, instance_type: Standard_NC4as_T4_v3, image: "{AZ_IMAGE}", spot: true}}
      - {{cloud: aws, region: us-east-1, instance_type: g4dn.xlarge, image: {AMI}, spot: false}}
"""
    return load_config_text(text, "<e2e>")


@pytest.fixture
def env(sqlite_url, moto, gce, azure, make_orch, client_for):
    moto.reset()
    gce.reset()
    azure.reset()
    config = _config(sqlite_url, moto, gce, azure)
    from orchestrator.core.clock import FakeClock

    clock = FakeClock()
    providers = {
        "aws": AwsProvider(config.clouds.aws, "orch-e2e", clock, session=moto.session(), max_attempts=1),
        "gcp": GcpProvider(config.clouds.gcp, "orch-e2e", clock, poll_sleep=lambda s: None),
        "azure": AzureProvider(config.clouds.azure, "orch-e2e", clock, credential=azure.credential(), client_kwargs=azure.client_kwargs()),
    }
    orch = make_orch(config, clock=clock, providers=providers)
    return orch, client_for(orch), moto.client("ec2", "us-east-1"), clock


def _aws_instances(ec2) -> list[dict]:
    out = []
    for res in ec2.describe_instances(Filters=[{"Name": f"tag:{TAG_ID}", "Values": ["orch-e2e"]}])["Reservations"]:
        out += [i for i in res["Instances"] if i["State"]["Name"] != "terminated"]
    return out


def test_queued_webhook_launches_exactly_one_spot_instance(env, tmp_path):
    orch, client, ec2, _ = env
    sent = capture(orch.providers["aws"])
    assert post_webhook(client, job_payload("queued", job_id=501, labels=["self-hosted", "GPU-T4"])).status_code == 202
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    (inst,) = _aws_instances(ec2)
    assert inst["InstanceType"] == "g4dn.xlarge"
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    record = orch.store.live_instances()[0]
    assert tags[TAG_ID] == "orch-e2e" and tags[TAG_POOL] == "gpu-t4" and tags[TAG_RUNNER] == record.id
    assert inst["MetadataOptions"]["HttpTokens"] == "required"
    attr = ec2.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="instanceInitiatedShutdownBehavior")
    assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    params = sent.last
    assert params["InstanceMarketOptions"]["MarketType"] == "spot"
    assert params["InstanceMarketOptions"]["SpotOptions"]["InstanceInterruptionBehavior"] == "terminate"
    volume_tags = [ts for ts in params["TagSpecifications"] if ts["ResourceType"] == "volume"]
    assert volume_tags and {t["Key"] for t in volume_tags[0]["Tags"]} >= {TAG_ID, TAG_POOL, TAG_RUNNER}
    user_data = base64.b64decode(
        ec2.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")["UserData"]["Value"]
    ).decode()
    assert user_data.startswith("#cloud-config")
    # No JIT config and no long-lived credential in user-data: only the one-time bootstrap token.
    assert record.jit_config and record.jit_config not in user_data
    assert not re.search(r"gh[pousr]_|github_pat_|BEGIN RSA PRIVATE KEY|" + re.escape(WEBHOOK_SECRET) + "|" + re.escape(ADMIN_TOKEN), user_data)
    path = tmp_path / "user-data.yaml"
    path.write_text(user_data)
    tool = require_tool("cloud-init")
    result = subprocess.run([tool, "schema", "--config-file", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_repeated_delivery_and_retried_launch_make_one_instance(env):
    orch, client, ec2, _ = env
    payload = job_payload("queued", job_id=502)
    post_webhook(client, payload, delivery="same")
    post_webhook(client, payload, delivery="same")
    post_webhook(client, payload, delivery="other")
    orch.scaler.run_once()
    orch.scaler.run_once()
    assert len(_aws_instances(ec2)) == 1
    # A retried cloud call with the same launch key returns the same VM.
    record = orch.store.live_instances()[0]
    provider = orch.providers["aws"]
    pool = orch.config.pool("gpu-t4")
    spec_again = orch.scaler._spec(pool, pool.candidates[0], record, "retry-token", None, provider)
    again = provider.launch(spec_again)
    assert again.instance_id == record.instance_id
    assert len(_aws_instances(ec2)) == 1


def _instance_of(orch, job_id: int):
    (inst,) = [i for i in orch.store.live_instances() if i.job_id == job_id]
    return inst


def _fail_aws(orch, spot_only: bool = True):
    def respond(request):
        body = request.body.decode() if isinstance(request.body, bytes) else str(request.body or "")
        if not spot_only or "InstanceMarketOptions" in body:
            return ec2_error("InsufficientInstanceCapacity", 500)
        return None

    inject(orch.providers["aws"], "RunInstances", respond)


def test_fallback_along_the_chain_across_clouds(env, gce, azure):
    orch, client, ec2, _ = env
    _fail_aws(orch)
    post_webhook(client, job_payload("queued", job_id=601))
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    assert _instance_of(orch, 601).cloud == "gcp"

    gce.inject_capacity_error("us-central1-a", times=10)
    post_webhook(client, job_payload("queued", job_id=602))
    orch.scaler.run_once()
    assert _instance_of(orch, 602).cloud == "azure"

    azure.inject_capacity_error(times=10)
    post_webhook(client, job_payload("queued", job_id=603))
    orch.scaler.run_once()
    last = _instance_of(orch, 603)
    assert (last.cloud, last.spot) == ("aws", False)
    assert not gce.violations and not azure.violations


def test_spot_breaker_skips_a_failing_pool_then_closes(env):
    orch, client, ec2, clock = env
    breaker: SpotBreaker = orch.scaler.breaker
    _fail_aws(orch)
    sent = capture(orch.providers["aws"])
    for job_id in (701, 702, 703):
        post_webhook(client, job_payload("queued", job_id=job_id))
        orch.scaler.run_once()
    key = orch.config.pool("gpu-t4").candidates[0].key()
    assert breaker.is_open(key)
    tries = len(sent.calls)
    post_webhook(client, job_payload("queued", job_id=704))
    orch.scaler.run_once()
    assert len(sent.calls) == tries, "an open breaker must skip aws spot without calling it"
    clock.advance(breaker.cooldown_s + 1)
    assert not breaker.is_open(key)
    post_webhook(client, job_payload("queued", job_id=705))
    orch.scaler.run_once()
    assert len(sent.calls) == tries + 1


def test_render_cloud_init_for_gcp_and_azure_pools_passes_schema(tmp_path):
    tool = require_tool("cloud-init")
    env = {"GITHUB_TOKEN": "x", "GITHUB_WEBHOOK_SECRET": "x", "ORCHESTRATOR_ADMIN_TOKEN": "x"}
    import os

    for name in ("gcp", "azure"):
        cfg = REPO / "configs" / f"{name}.yaml"
        if not cfg.exists():
            pytest.fail(f"missing example config {cfg}")
        from orchestrator.config import load_config

        pool = load_config(cfg, env={**os.environ, **env}).pools[0].name
        out = subprocess.run(
            ["orchestrator", "render-cloud-init", "--config", str(cfg), "--pool", pool],
            capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("#cloud-config") and "<redacted>" in out.stdout
        path: Path = tmp_path / f"{name}.yaml"
        path.write_text(out.stdout)
        check = subprocess.run([tool, "schema", "--config-file", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
