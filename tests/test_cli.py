"""The `orchestrator` command as users run it: a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from orchestrator.app import Orchestrator
from orchestrator.config import load_config
from orchestrator.core.clock import FakeClock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "GITHUB_TOKEN": "ghp_clitesttoken0000000000000000", "GITHUB_WEBHOOK_SECRET": "cli-secret",
       "ORCHESTRATOR_ADMIN_TOKEN": "cli-admin", "COLUMNS": "200"}


def orchestrator(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("orchestrator")
    cmd = [exe] if exe else [sys.executable, "-m", "orchestrator.cli"]
    return subprocess.run([*cmd, *args], env=ENV, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_help_lists_every_command():
    r = orchestrator("--help")
    assert r.returncode == 0, r.stderr
    for command in ("serve", "check-config", "demo", "render-cloud-init", "reap", "simulate"):
        assert command in r.stdout, command


def test_no_command_is_a_usage_error():
    r = orchestrator()
    assert r.returncode == 2 and "usage:" in r.stderr


def test_demo_completes_every_routed_job():
    # The one real-time test: the whole system on loopback for up to 30 s.
    r = orchestrator("demo", "--duration", "30", timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = [ln for ln in r.stdout.splitlines() if "demo finished" in ln]
    assert summary and "8/8 routed jobs completed" in summary[-1], r.stdout[-2000:]
    assert "0 still live" in summary[-1]


def _sandbox_config(tmp_path: Path) -> Path:
    text = (REPO / "configs" / "sandbox.yaml").read_text()
    assert "sqlite:///orchestrator-sandbox.db" in text
    path = tmp_path / "sandbox.yaml"
    path.write_text(text.replace("sqlite:///orchestrator-sandbox.db", f"sqlite:///{tmp_path}/orchestrator.db"))
    return path


def test_reap_once_prints_its_actions(tmp_path, monkeypatch):
    config_path = _sandbox_config(tmp_path)
    for k in ("GITHUB_WEBHOOK_SECRET", "ORCHESTRATOR_ADMIN_TOKEN"):
        monkeypatch.setenv(k, ENV[k])
    # Another process launched a VM two hours ago and is gone; its sandbox cloud went with it.
    config = load_config(config_path)
    orch = Orchestrator(config, clock=FakeClock(datetime.now(timezone.utc) - timedelta(hours=2)))
    orch.github.enqueue_job("demo-org/models", ["self-hosted", "gpu-sim"], duration_s=60)
    [outcome] = orch.scaler.run_once()
    assert outcome.result == "launched"
    orch.store.close()

    r = orchestrator("reap", "--once", "--config", str(config_path))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(outcome.instance in ln for ln in lines[:-1]), r.stdout
    assert lines[-1] == "1 action(s), 0 error(s)"

    again = orchestrator("reap", "--once", "--config", str(config_path))
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == "0 action(s), 0 error(s)"


def test_reap_config_from_environment(tmp_path):
    config_path = _sandbox_config(tmp_path)
    exe = shutil.which("orchestrator")
    cmd = [exe] if exe else [sys.executable, "-m", "orchestrator.cli"]
    r = subprocess.run([*cmd, "reap", "--once"], env={**ENV, "ORCHESTRATOR_CONFIG": str(config_path)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "0 action(s), 0 error(s)"


def test_reap_without_config_says_so():
    env = {k: v for k, v in ENV.items() if k != "ORCHESTRATOR_CONFIG"}
    exe = shutil.which("orchestrator")
    cmd = [exe] if exe else [sys.executable, "-m", "orchestrator.cli"]
    r = subprocess.run([*cmd, "reap", "--once"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--config" in r.stderr


def test_render_cloud_init_redacts(tmp_path):
    r = orchestrator("render-cloud-init", "--config", str(REPO / "configs" / "aws.yaml"), "--pool", "gpu-t4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#cloud-config")
    assert ENV["GITHUB_TOKEN"] not in r.stdout and ENV["GITHUB_WEBHOOK_SECRET"] not in r.stdout
