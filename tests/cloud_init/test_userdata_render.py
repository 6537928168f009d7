"""The rendered user-data: valid cloud-config, no leaked secrets, scripts intact."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from cloud_init_support import (
    BOOTSTRAP_TOKEN,
    CLOUD_INIT_DIR,
    JIT_CONFIG,
    decode_write_file,
    make_context,
    parse_cloud_config,
    require_tool,
)

from orchestrator.userdata import SCRIPTS, SECRET_PLACEHOLDER, render_user_data, strip_comments

GITHUB_TOKEN_RE = re.compile(r"ghp_|gho_|ghu_|ghs_|ghr_|github_pat_")
SHA = "a" * 64

CONTEXTS = {
    "callback-aws-1gpu-download": make_context(),
    "callback-gcp-8gpu-preinstalled": make_context(
        cloud="gcp", expected_gpus=8, runner_preinstalled_path="/opt/actions-runner"
    ),
    "callback-azure-0gpu-sha": make_context(cloud="azure", expected_gpus=0, runner_sha256=SHA),
    "callback-sandbox-arm64": make_context(cloud="sandbox", expected_gpus=0, arch="arm64"),
    "inline-aws-8gpu-sha": make_context(
        bootstrap_mode="inline", jit_config=JIT_CONFIG, expected_gpus=8, runner_sha256=SHA
    ),
    "inline-gcp-1gpu-preinstalled": make_context(
        cloud="gcp", bootstrap_mode="inline", jit_config=JIT_CONFIG,
        runner_preinstalled_path="/home/runner/actions-runner",
    ),
    "inline-azure-0gpu": make_context(cloud="azure", bootstrap_mode="inline", jit_config=JIT_CONFIG, expected_gpus=0),
    "inline-sandbox-no-token": make_context(
        cloud="sandbox", bootstrap_mode="inline", jit_config=JIT_CONFIG, bootstrap_token=None, expected_gpus=0
    ),
}


@pytest.fixture(scope="module")
def cloud_init_bin() -> str:
    return require_tool("cloud-init")


@pytest.mark.parametrize("name", sorted(CONTEXTS))
@pytest.mark.parametrize("redact", [False, True])
def test_schema_accepts_rendered_user_data(name: str, redact: bool, cloud_init_bin: str, tmp_path: Path) -> None:
    text = render_user_data(CONTEXTS[name], redact=redact)
    path = tmp_path / "user-data.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [cloud_init_bin, "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "valid" in out.lower(), out
    # Deprecated keys pass the schema with a warning; they must not be used either.
    for line in out.splitlines():
        if "deprecations:" in line.lower():
            assert not line.split(":", 1)[1].strip(), out


@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_one_cloud_config_document(name: str) -> None:
    text = render_user_data(CONTEXTS[name])
    assert text.startswith("#cloud-config\n")
    assert "\n---" not in text
    doc = parse_cloud_config(text)
    assert doc["runcmd"] == [["/bin/bash", "/opt/orchestrator/bootstrap.sh"]]
    paths = [e["path"] for e in doc["write_files"]]
    for script in SCRIPTS:
        assert f"/opt/orchestrator/{script}" in paths


@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_redacted_output_has_no_secrets(name: str) -> None:
    ctx = CONTEXTS[name]
    text = render_user_data(ctx, redact=True)
    assert BOOTSTRAP_TOKEN not in text
    assert JIT_CONFIG not in text
    assert SECRET_PLACEHOLDER in text
    secrets = parse_cloud_config(text)["write_files"][-1]
    assert secrets["path"] == "/etc/orchestrator/bootstrap.secret"
    for line in secrets["content"].splitlines():
        if not line.startswith("#"):
            assert line.split("=", 1)[1] == f"'{SECRET_PLACEHOLDER}'"


def test_secrets_only_in_the_root_only_file() -> None:
    ctx = make_context(bootstrap_mode="inline", jit_config=JIT_CONFIG)
    doc = parse_cloud_config(render_user_data(ctx))
    holders = [e for e in doc["write_files"] if JIT_CONFIG.encode() in decode_write_file(e)]
    assert [e["path"] for e in holders] == ["/etc/orchestrator/bootstrap.secret"]
    assert holders[0]["permissions"] == "0600"
    assert BOOTSTRAP_TOKEN in holders[0]["content"]


def test_callback_mode_never_renders_a_jit_config() -> None:
    # Even a caller that passes one by mistake must not put it into cloud metadata.
    ctx = make_context(jit_config=JIT_CONFIG)
    text = render_user_data(ctx)
    assert JIT_CONFIG not in text
    assert "ORCH_JIT_CONFIG" not in text
    assert BOOTSTRAP_TOKEN in text


@pytest.mark.parametrize("name", sorted(CONTEXTS))
@pytest.mark.parametrize("redact", [False, True])
def test_no_github_token_shapes(name: str, redact: bool) -> None:
    assert not GITHUB_TOKEN_RE.search(render_user_data(CONTEXTS[name], redact=redact))


@pytest.mark.parametrize("field", ["bootstrap_token", "jit_config"])
@pytest.mark.parametrize("prefix", ["ghp_", "ghs_", "github_pat_"])
def test_github_tokens_are_refused(field: str, prefix: str) -> None:
    values = {"jit_config": JIT_CONFIG, field: prefix + "A" * 36}
    ctx = make_context(bootstrap_mode="inline", **values)
    with pytest.raises(ValueError, match="GitHub token"):
        render_user_data(ctx)


@pytest.mark.parametrize(
    "overrides",
    [
        {"cloud": "ibm"},
        {"bootstrap_mode": "pull"},
        {"bootstrap_token": None},
        {"bootstrap_mode": "inline", "jit_config": None},
        {"instance_name": "bad name; rm -rf /"},
        {"orchestrator_url": "ftp://x"},
        {"max_lifetime_s": 0},
        {"expected_gpus": -1},
        {"runner_version": "latest"},
        {"runner_sha256": "abc"},
        {"runner_preinstalled_path": "relative/path"},
        {"arch": "ppc64le"},
        {"bootstrap_token": "has space"},
    ],
)
def test_invalid_contexts_are_refused(overrides: dict) -> None:
    with pytest.raises(ValueError):
        render_user_data(make_context(**overrides))


def test_settings_reach_the_config_file() -> None:
    ctx = make_context(
        cloud="gcp", max_lifetime_s=3601, expected_gpus=8, runner_sha256=SHA.upper(),
        orchestrator_url="https://runners.example.com/", arch="arm64",
    )
    doc = parse_cloud_config(render_user_data(ctx))
    conf = next(e for e in doc["write_files"] if e["path"] == "/etc/orchestrator/bootstrap.env")
    lines = dict(line.split("=", 1) for line in conf["content"].splitlines() if not line.startswith("#"))
    assert lines["ORCH_INSTANCE_NAME"] == "gpu-t4-abc123"
    assert lines["ORCH_CLOUD"] == "gcp"
    assert lines["ORCH_URL"] == "https://runners.example.com"
    assert lines["ORCH_MAX_LIFETIME_S"] == "3601"
    assert lines["ORCH_EXPECTED_GPUS"] == "8"
    assert lines["ORCH_RUNNER_SHA256"] == SHA
    assert lines["ORCH_ARCH"] == "arm64"
    assert BOOTSTRAP_TOKEN not in conf["content"]


@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_shipped_scripts_are_the_repository_scripts(name: str) -> None:
    doc = parse_cloud_config(render_user_data(CONTEXTS[name]))
    for entry in doc["write_files"]:
        if entry["path"].startswith("/opt/orchestrator/"):
            source = (CLOUD_INIT_DIR / Path(entry["path"]).name).read_text()
            shipped = decode_write_file(entry).decode()
            assert shipped == strip_comments(source)
            assert entry["permissions"] == "0755"
            # Only comments went: every code line of the source is there, in order.
            code = [ln for ln in source.splitlines() if ln.strip() and not ln.strip().startswith("#")]
            assert [ln for ln in shipped.splitlines() if not ln.strip().startswith("#")] == code
            assert shipped.startswith("#!/usr/bin/env bash\n")
            subprocess.run(["bash", "-n"], input=shipped, text=True, check=True, timeout=30)


def test_strip_comments_keeps_heredocs() -> None:
    script = "#!/usr/bin/env bash\n# why\n\ncat <<'PY'\n# kept\n\nPY\n  # gone\necho 1 # stays\n"
    assert strip_comments(script) == "#!/usr/bin/env bash\ncat <<'PY'\n# kept\n\nPY\necho 1 # stays\n"


def test_render_is_deterministic() -> None:
    ctx = CONTEXTS["inline-aws-8gpu-sha"]
    assert render_user_data(ctx) == render_user_data(ctx)


def test_fits_the_aws_user_data_limit() -> None:
    # EC2 refuses user-data over 16 KiB; keep headroom for longer names and tokens.
    ctx = make_context(
        instance_name="n" * 128, bootstrap_mode="inline", jit_config="J" * 4096,
        bootstrap_token="T" * 64, runner_sha256=SHA, runner_preinstalled_path="/opt/" + "p" * 60,
    )
    assert len(render_user_data(ctx).encode()) < 16 * 1024


@pytest.mark.parametrize("mode", ["callback", "inline"])
def test_redacted_render_needs_no_real_secrets(mode: str) -> None:
    # render-cloud-init has no token to hand: the placeholders stand in for them.
    ctx = make_context(bootstrap_mode=mode, bootstrap_token=None, jit_config=None)
    text = render_user_data(ctx, redact=True)
    expected = {"callback": ["ORCH_BOOTSTRAP_TOKEN"], "inline": ["ORCH_JIT_CONFIG"]}[mode]
    secrets = parse_cloud_config(text)["write_files"][-1]["content"]
    assert [line.split("=")[0] for line in secrets.splitlines() if not line.startswith("#")] == expected
    assert SECRET_PLACEHOLDER in secrets
    with pytest.raises(ValueError):
        render_user_data(ctx)


def test_github_token_shapes_anywhere_are_refused() -> None:
    with pytest.raises(ValueError, match="GitHub token"):
        render_user_data(make_context(instance_name="pool-ghp_abc"))
