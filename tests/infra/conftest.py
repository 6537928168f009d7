"""Fixtures for the deployment artifact checks.

The linters live in their own virtualenv (.ci/infra-tools.sh) so that checkov's
pinned dependencies never meet the application's. A missing tool skips its test
on a developer machine and fails it in CI (CI=true), where it must be installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("INFRA_VENV", REPO / ".venv-infra"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing(what: str) -> None:
    msg = f"{what} not found; run: bash .ci/infra-tools.sh"
    if IN_CI:
        pytest.fail(msg)  # CI must never pass by not checking
    pytest.skip(msg)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def infra_tool() -> Callable[[str], str]:
    """infra_tool("checkov") -> path in the infra venv, or skip/fail."""

    def find(name: str) -> str:
        path = VENV / "bin" / name
        if not path.exists():
            _missing(str(path))
        return str(path)

    return find


@pytest.fixture(scope="session")
def kustomize_cmd() -> list[str] | None:
    """kubectl's built-in kustomize, or a standalone one; None when neither exists."""
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None
