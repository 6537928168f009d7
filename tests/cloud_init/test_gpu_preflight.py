"""GPU preflight against output captured from a real driver."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cloud_init_support import CLOUD_INIT_DIR, install_fake
from cloud_init_support import nvidia_fixtures  # noqa: F401  (fixtures)

PREFLIGHT = CLOUD_INIT_DIR / "gpu-preflight.sh"


def parse(mode: str, text: str) -> int:
    proc = subprocess.run(
        ["bash", str(PREFLIGHT), mode], input=text, capture_output=True, text=True, timeout=30, check=True
    )
    return int(proc.stdout.strip())


def test_parses_the_captured_query_csv(nvidia_fixtures: Path) -> None:
    assert parse("--parse-csv", (nvidia_fixtures / "h100-query-gpu.csv").read_text()) == 1


def test_parses_the_captured_device_list(nvidia_fixtures: Path) -> None:
    assert parse("--parse-list", (nvidia_fixtures / "h100-nvidia-smi-L.txt").read_text()) == 1


def test_driver_errors_are_not_gpus() -> None:
    assert parse("--parse-csv", "No devices were found\n") == 0
    assert parse("--parse-list", "No devices were found\n") == 0
    assert parse("--parse-csv", "") == 0
    # A GPU that fell off the bus shows up as an error line, not as a GPU.
    assert parse("--parse-list", "Unable to determine the device handle for GPU0000:00:06.0: Unknown Error\n") == 0


def test_mig_slices_are_not_extra_gpus(nvidia_fixtures: Path) -> None:
    listing = (nvidia_fixtures / "h100-nvidia-smi-L.txt").read_text()
    listing += "  MIG 1g.10gb     Device  0: (UUID: MIG-0e1b9b2a-6c8f-5d7e-9a3b-1c2d3e4f5a6b)\n"
    assert parse("--parse-list", listing) == 1


@pytest.fixture
def smi_env(tmp_path: Path, nvidia_fixtures: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    install_fake(bin_dir / "nvidia-smi", "fake_nvidia_smi.sh")
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_NVIDIA_SMI_FIXTURES": str(nvidia_fixtures),
    }


def preflight(env: dict[str, str], expected: int, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(PREFLIGHT), str(expected)], env={**env, **extra}, capture_output=True, text=True, timeout=30
    )


def test_fake_replays_the_capture_verbatim(smi_env: dict[str, str], nvidia_fixtures: Path) -> None:
    for args, name in [
        (["--query-gpu=index,name,uuid,memory.total,driver_version,pci.bus_id", "--format=csv,noheader"],
         "h100-query-gpu.csv"),
        (["-L"], "h100-nvidia-smi-L.txt"),
        ([], "h100-nvidia-smi.txt"),
    ]:
        out = subprocess.run(["nvidia-smi", *args], env=smi_env, capture_output=True, timeout=30, check=True).stdout
        assert out == (nvidia_fixtures / name).read_bytes()


@pytest.mark.parametrize(
    "mode, expected, ok, found",
    [
        ("ok", 1, True, 1),
        ("gpus=8", 8, True, 8),
        ("gpus=8", 4, True, 8),
        ("ok", 8, False, 1),
        ("none", 1, False, 0),
        ("fail", 1, False, 0),
    ],
)
def test_preflight_counts(smi_env: dict[str, str], mode: str, expected: int, ok: bool, found: int) -> None:
    proc = preflight(smi_env, expected, FAKE_NVIDIA_SMI_MODE=mode)
    assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
    assert proc.stdout.split()[0] == str(found)
    if not ok:
        assert len(proc.stdout.split(None, 1)[1]) > 5  # a reason follows the count


def test_missing_nvidia_smi(smi_env: dict[str, str]) -> None:
    proc = preflight(smi_env, 1, ORCH_NVIDIA_SMI="/nonexistent/nvidia-smi")
    assert proc.returncode == 1
    assert proc.stdout.strip() == "0 nvidia-smi not found"
