"""shellcheck on every script a VM runs, as shipped and as rendered."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cloud_init_support import (
    CLOUD_INIT_DIR,
    FAKES,
    JIT_CONFIG,
    decode_write_file,
    make_context,
    parse_cloud_config,
    require_tool,
)

from orchestrator.userdata import SCRIPTS, render_user_data

SCRIPT_FILES = sorted(CLOUD_INIT_DIR.glob("*.sh"))
FAKE_SCRIPTS = sorted(FAKES.glob("fake_*.sh"))


@pytest.fixture(scope="module")
def shellcheck() -> str:
    return require_tool("shellcheck")


def run_shellcheck(shellcheck: str, *paths: Path, shell: str | None = None) -> None:
    cmd = [shellcheck, "--severity=style", "--external-sources"]
    if shell:
        # Settings files only assign what bootstrap.sh reads after sourcing them.
        cmd += [f"--shell={shell}", "--exclude=SC2034"]
    proc = subprocess.run([*cmd, *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_shipped_script_is_in_the_user_data() -> None:
    assert sorted(p.name for p in SCRIPT_FILES) == sorted(SCRIPTS)


@pytest.mark.parametrize("path", SCRIPT_FILES + FAKE_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(shellcheck: str, path: Path) -> None:
    run_shellcheck(shellcheck, path)


@pytest.mark.parametrize("mode", ["callback", "inline"])
def test_shellcheck_clean_as_rendered(shellcheck: str, mode: str, tmp_path: Path) -> None:
    ctx = make_context(bootstrap_mode=mode, jit_config=JIT_CONFIG if mode == "inline" else None)
    doc = parse_cloud_config(render_user_data(ctx))
    written = []
    for entry in doc["write_files"]:
        dest = tmp_path / Path(entry["path"]).name
        dest.write_bytes(decode_write_file(entry))
        written.append(dest)
    scripts = [p for p in written if p.suffix == ".sh"]
    run_shellcheck(shellcheck, *scripts)
    # The settings files are sourced by bash, so they must be clean bash too.
    run_shellcheck(shellcheck, *[p for p in written if p.suffix != ".sh"], shell="bash")
