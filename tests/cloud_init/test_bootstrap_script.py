"""bootstrap.sh end to end on a fake VM: fake binaries, a local orchestrator and metadata stub."""

from __future__ import annotations

import os
import signal

import pytest
from cloud_init_support import (
    BOOTSTRAP_TOKEN,
    INSTANCE_TOKEN,
    JIT_CONFIG,
    FakeVM,
    Result,
    runner_tarball,
    sha256,
)
from cloud_init_support import nvidia_fixtures, stub, vm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(90)

EVENTS_PATH = "/api/v1/instances/gpu-t4-abc123/events"


METADATA_PREFIXES = ("http PUT /latest/", "http GET /latest/", "http GET /computeMetadata/", "http GET /metadata/")


def assert_powered_off(res: Result) -> None:
    # A metadata poll already in flight may land after the power off; nothing else may.
    trace = [line for line in res.trace if not line.startswith(METADATA_PREFIXES)]
    assert trace, res.log
    assert trace[-1].startswith("poweroff"), res.trace
    assert sum(1 for line in trace if line.startswith("poweroff")) == 1, res.trace


def assert_no_secret_in_log(res: Result) -> None:
    for secret in (BOOTSTRAP_TOKEN, INSTANCE_TOKEN, JIT_CONFIG):
        assert secret not in res.log


def event_names(vm: FakeVM) -> list[str]:
    return [r["json"]["event"] for r in vm.stub.events()]


def test_watchdog_counts_to_the_launch_deadline(vm: FakeVM) -> None:
    """Boot time eats into max_lifetime: the VM powers off by launch + max_lifetime."""
    import time

    ctx = vm.context(max_lifetime_s=3600, deadline_epoch=int(time.time()) + 3600 - 600)
    vm.install(ctx)
    res = vm.run()
    assert res.trace[0].startswith("shutdown -h +49 ") or res.trace[0].startswith("shutdown -h +50 "), res.trace


def test_happy_path_callback(vm: FakeVM) -> None:
    ctx = vm.context(max_lifetime_s=6 * 3600 + 1)
    vm.install(ctx)
    res = vm.run()
    assert res.rc == 0, res.log

    # The watchdog comes before anything else the VM does, rounded down: early, never late.
    minutes = ctx.max_lifetime_s // 60
    assert res.trace[0].startswith(f"shutdown -h +{minutes} "), res.trace

    boots = vm.stub.calls("POST", "/api/v1/bootstrap")
    assert len(boots) == 1
    assert boots[0]["headers"]["authorization"] == f"Bearer {BOOTSTRAP_TOKEN}"
    assert res.runner_args == ["--jitconfig", JIT_CONFIG]

    assert event_names(vm) == ["job-started", "job-completed"]
    for ev in vm.stub.events():
        assert ev["headers"]["authorization"] == f"Bearer {INSTANCE_TOKEN}"
        assert ev["json"]["detail"]["repository"] == "octo-org/octo-repo"
        assert ev["json"]["detail"]["run_id"] == "4242"

    order = [line.split()[0] if not line.startswith("http") else line for line in res.trace]
    assert order.index("nvidia-smi") < order.index("http POST /api/v1/bootstrap") < order.index("run.sh")
    assert_powered_off(res)
    assert_no_secret_in_log(res)

    # Nothing on disk keeps the bootstrap token or the JIT config.
    assert not (vm.root / "etc/orchestrator/bootstrap.secret").exists()
    assert (vm.root / "var/lib/cloud/instance/user-data.txt").read_text() == ""
    for path in vm.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert BOOTSTRAP_TOKEN.encode() not in data, path
            assert JIT_CONFIG.encode() not in data, path
    assert (vm.root / "var/lib/orchestrator/event-token").read_text() == INSTANCE_TOKEN


def test_inline_download_verifies_sha256(vm: FakeVM) -> None:
    ctx = vm.context(
        bootstrap_mode="inline", jit_config=JIT_CONFIG, cloud="gcp", expected_gpus=0,
        runner_preinstalled_path=None, runner_sha256=sha256(runner_tarball()).upper(),
    )
    vm.install(ctx)
    res = vm.run()
    assert res.rc == 0, res.log
    assert vm.stub.calls("GET", "/runner/v2.330.0/actions-runner-linux-x64-2.330.0.tar.gz")
    assert not vm.stub.calls("POST", "/api/v1/bootstrap")
    assert not any(line.startswith("nvidia-smi") for line in res.trace)
    assert res.runner_args == ["--jitconfig", JIT_CONFIG]
    # Inline VMs have no instance token: events carry the bootstrap token.
    assert event_names(vm) == ["job-started", "job-completed"]
    assert all(e["headers"]["authorization"] == f"Bearer {BOOTSTRAP_TOKEN}" for e in vm.stub.events())
    assert (vm.root / "opt/actions-runner/run.sh").exists()
    assert_powered_off(res)
    assert_no_secret_in_log(res)


def test_tarball_with_wrong_sha256_never_runs(vm: FakeVM) -> None:
    vm.install(vm.context(runner_preinstalled_path=None, runner_sha256="0" * 64, arch="arm64"))
    res = vm.run()
    assert res.rc != 0
    assert vm.stub.calls("GET", "/runner/v2.330.0/actions-runner-linux-arm64-2.330.0.tar.gz")
    assert res.runner_args is None
    assert "sha256 mismatch" in res.log
    assert_powered_off(res)


@pytest.mark.parametrize("smi_mode", ["none", "fail"])
def test_missing_gpu_posts_preflight_failed(vm: FakeVM, smi_mode: str) -> None:
    vm.install(vm.context(expected_gpus=1))
    res = vm.run(FAKE_NVIDIA_SMI_MODE=smi_mode, ORCH_PREFLIGHT_ATTEMPTS="2")
    assert res.rc != 0
    assert res.runner_args is None
    assert not vm.stub.calls("POST", "/api/v1/bootstrap")
    [ev] = vm.stub.events("preflight-failed")
    assert ev["headers"]["authorization"] == f"Bearer {BOOTSTRAP_TOKEN}"
    detail = ev["json"]["detail"]
    assert detail["expected"] == 1 and detail["found"] == 0
    assert "nvidia-smi failed" in detail["reason"]
    assert sum(1 for line in res.trace if line.startswith("nvidia-smi --query-gpu")) == 2
    assert_powered_off(res)


def test_too_few_gpus(vm: FakeVM) -> None:
    vm.install(vm.context(expected_gpus=8))
    res = vm.run(FAKE_NVIDIA_SMI_MODE="ok", ORCH_PREFLIGHT_ATTEMPTS="1")
    assert res.rc != 0 and res.runner_args is None
    [ev] = vm.stub.events("preflight-failed")
    assert ev["json"]["detail"]["found"] == 1
    assert ev["json"]["detail"]["expected"] == 8
    assert_powered_off(res)


def test_nvidia_smi_absent(vm: FakeVM) -> None:
    vm.install(vm.context(expected_gpus=1))
    res = vm.run(ORCH_NVIDIA_SMI="/nonexistent/nvidia-smi", ORCH_PREFLIGHT_ATTEMPTS="1")
    assert res.rc != 0 and res.runner_args is None
    [ev] = vm.stub.events("preflight-failed")
    assert ev["json"]["detail"]["reason"] == "nvidia-smi not found"
    assert_powered_off(res)


def test_eight_gpus_pass(vm: FakeVM) -> None:
    vm.install(vm.context(expected_gpus=8))
    res = vm.run(FAKE_NVIDIA_SMI_MODE="gpus=8")
    assert res.rc == 0, res.log
    assert res.runner_args == ["--jitconfig", JIT_CONFIG]
    assert not vm.stub.events("preflight-failed")


def test_runner_crash_powers_off(vm: FakeVM) -> None:
    vm.install(vm.context())
    res = vm.run(FAKE_RUNNER_MODE="crash")
    assert res.rc == 1
    assert res.runner_args == ["--jitconfig", JIT_CONFIG]
    assert_powered_off(res)


def test_replayed_bootstrap_token_powers_off(vm: FakeVM) -> None:
    vm.install(vm.context())
    vm.stub.bootstrap_used = True  # someone already spent it
    res = vm.run()
    assert res.rc != 0
    assert len(vm.stub.calls("POST", "/api/v1/bootstrap")) == 1  # no retry on 401
    assert res.runner_args is None
    assert "rejected (HTTP 401)" in res.log
    assert_powered_off(res)


def test_bootstrap_retries_server_errors(vm: FakeVM) -> None:
    vm.install(vm.context())
    vm.stub.bootstrap_failures = [503, 502]
    res = vm.run()
    assert res.rc == 0, res.log
    assert len(vm.stub.calls("POST", "/api/v1/bootstrap")) == 3
    assert res.runner_args == ["--jitconfig", JIT_CONFIG]


def test_bootstrap_gives_up_after_bounded_retries(vm: FakeVM) -> None:
    vm.install(vm.context())
    vm.stub.bootstrap_failures = [500] * 10
    res = vm.run(ORCH_BOOTSTRAP_ATTEMPTS="3")
    assert res.rc != 0
    assert len(vm.stub.calls("POST", "/api/v1/bootstrap")) == 3
    assert res.runner_args is None
    assert_powered_off(res)


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_spot_notice_is_posted_once(vm: FakeVM, cloud: str) -> None:
    vm.install(vm.context(cloud=cloud))
    vm.stub.spot = cloud
    release = vm.tmp / "release"
    vm.stub.on_spot = release.touch
    res = vm.run(FAKE_RUNNER_MODE="wait")
    assert res.rc == 0, res.log
    # The watcher races the job hooks; only the counts are fixed.
    assert sorted(event_names(vm)) == ["job-completed", "job-started", "spot-interruption"]
    [ev] = vm.stub.events("spot-interruption")
    assert ev["headers"]["authorization"] == f"Bearer {INSTANCE_TOKEN}"
    assert ev["json"]["detail"]["cloud"] == cloud
    assert_powered_off(res)


def test_sigterm_powers_off(vm: FakeVM) -> None:
    vm.install(vm.context(cloud="sandbox"))
    proc = vm.start(FAKE_RUNNER_MODE="wait")
    assert vm.stub.wait_for(lambda: bool(vm.stub.events("job-started"))), vm.log()
    os.kill(proc.pid, signal.SIGTERM)
    res = vm.finish(proc)
    assert res.rc == 143
    assert_powered_off(res)


def test_runner_user_path(vm: FakeVM) -> None:
    # useradd/runuser/chown are faked: this checks the commands the root path issues.
    for name in ("useradd", "runuser", "chown", "chgrp", "id"):
        vm.add_fake(name, "fake_privileged.sh")
    vm.install(vm.context())
    res = vm.run(ORCH_SKIP_USERADD="0")
    assert res.rc == 0, res.log
    assert "useradd --create-home --shell /bin/bash --user-group runner" in res.trace
    assert "chgrp runner " + str(vm.root / "var/lib/orchestrator/event-token") in res.trace
    assert "chown -R runner: " + str(vm.root / "opt/baked-runner") in res.trace
    [run_as] = [line for line in res.trace if line.startswith("runuser ")]
    assert run_as.startswith("runuser -u runner -- env ACTIONS_RUNNER_HOOK_JOB_STARTED=")
    assert run_as.endswith(f"./run.sh --jitconfig {JIT_CONFIG}")
    order = [line.split()[0] for line in res.trace]
    assert order.index("shutdown") < order.index("useradd") < order.index("runuser")
    assert event_names(vm) == ["job-started", "job-completed"]
    assert_powered_off(res)


@pytest.mark.parametrize("mode", ["callback", "inline"])
def test_xtrace_never_shows_secrets(vm: FakeVM, mode: str) -> None:
    vm.install(vm.context(bootstrap_mode=mode, jit_config=JIT_CONFIG if mode == "inline" else None))
    res = vm.run(ORCH_DEBUG="1")
    assert res.rc == 0, res.log
    assert "+ arm_watchdog" in res.log  # xtrace was really on
    assert res.runner_args == ["--jitconfig", JIT_CONFIG]
    assert_no_secret_in_log(res)
    assert not (vm.root / "etc/orchestrator/bootstrap.secret").exists()
