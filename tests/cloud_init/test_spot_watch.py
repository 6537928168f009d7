"""spot-watch.sh on its own against each cloud's metadata service."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from cloud_init_support import BOOTSTRAP_TOKEN, CLOUD_INIT_DIR, FakeVM
from cloud_init_support import nvidia_fixtures, stub, vm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(60)

WATCH = CLOUD_INIT_DIR / "spot-watch.sh"


def watch_env(vm: FakeVM) -> dict[str, str]:
    token = vm.tmp / "token"
    token.write_text(BOOTSTRAP_TOKEN)
    return {
        **vm.env,
        "ORCH_URL": vm.stub.url,
        "ORCH_INSTANCE_NAME": vm.stub.instance_name,
        "ORCH_TOKEN_FILE": str(token),
    }


def watch(vm: FakeVM, cloud: str) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", str(WATCH), cloud]
    return subprocess.run(cmd, env=watch_env(vm), capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_notice_is_posted_once_then_exits(vm: FakeVM, cloud: str) -> None:
    vm.stub.spot = cloud
    proc = watch(vm, cloud)
    assert proc.returncode == 0, proc.stderr
    assert len(vm.stub.events()) == 1, proc.stderr
    [ev] = vm.stub.events()
    assert ev["json"]["event"] == "spot-interruption"
    assert ev["json"]["detail"]["cloud"] == cloud
    assert ev["headers"]["authorization"] == f"Bearer {BOOTSTRAP_TOKEN}"


def test_aws_uses_imdsv2(vm: FakeVM) -> None:
    vm.stub.spot = "aws"
    assert watch(vm, "aws").returncode == 0
    [put] = vm.stub.calls("PUT", "/latest/api/token")
    assert put["headers"]["x-aws-ec2-metadata-token-ttl-seconds"] == "300"
    [get] = vm.stub.calls("GET", "/latest/meta-data/spot/instance-action")
    assert get["headers"]["x-aws-ec2-metadata-token"] == "imds-v2-token"
    assert "terminate" in vm.stub.events()[0]["json"]["detail"]["notice"]


def test_azure_only_counts_our_preempt(vm: FakeVM) -> None:
    vm.stub.spot = "azure"
    assert watch(vm, "azure").returncode == 0
    detail = vm.stub.events()[0]["json"]["detail"]
    assert detail["event_id"] == "602d9444-d2cd-49c7-8624-8643e7171297"
    assert detail["not_before"] == "Mon, 23 Nov 2026 10:00:30 GMT"


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_no_notice_keeps_polling(vm: FakeVM, cloud: str) -> None:
    # Another VM's Preempt (azure) or no notice at all: nothing is posted.
    proc = subprocess.Popen(
        ["bash", str(WATCH), cloud], env=watch_env(vm), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        polled = vm.stub.wait_for(lambda: len(vm.stub.requests) >= 6, timeout=15)
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert polled
    assert not vm.stub.events()


def test_sandbox_has_nothing_to_watch(vm: FakeVM) -> None:
    proc = watch(vm, "sandbox")
    assert proc.returncode == 0
    assert not vm.stub.requests
