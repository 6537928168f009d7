"""The YAML config: line-numbered errors from `orchestrator check-config`, env interpolation,
the example configs, and the JSON Schema kept in configs/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from orchestrator import cli
from orchestrator.config import ConfigError, load_config, load_config_text, parse_duration, schema_text

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SCHEMA = REPO / "configs" / "orchestrator.schema.json"
ENV = {"GITHUB_TOKEN": "x", "GITHUB_WEBHOOK_SECRET": "x", "ORCHESTRATOR_ADMIN_TOKEN": "x"}

VALID = """\
github:
  token: ${GITHUB_TOKEN}
  webhook_secret: ${GITHUB_WEBHOOK_SECRET}
  allowed_repositories: ["my-org/*"]
server:
  admin_tokens: [${ORCHESTRATOR_ADMIN_TOKEN}]
pools:
  - name: demo
    labels: [gpu-sim]
    idle_timeout: 10m
    candidates:
      - {cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.25}
budgets:
  - name: monthly
    scope: pool:demo
    limit_usd: 200
"""


@pytest.fixture
def env(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def check(tmp_path, text: str, capsys, name: str = "orchestrator.yaml") -> tuple[int, list[str], Path]:
    path = tmp_path / name
    path.write_text(text)
    code = cli.main(["check-config", str(path)])
    out = capsys.readouterr().out
    return code, out.splitlines(), path


def one_error(tmp_path, text, capsys) -> tuple[int, str]:
    """Exit 2 and exactly one `FILE:LINE: message` line; returns (line, message)."""
    code, lines, path = check(tmp_path, text, capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    m = re.match(rf"^{re.escape(str(path))}:(\d+): (.+)$", lines[0])
    assert m, lines[0]
    return int(m.group(1)), m.group(2)


def test_valid_file_exit_0(tmp_path, capsys, env):
    code, lines, path = check(tmp_path, VALID, capsys)
    assert code == 0, lines
    assert lines == [f"{path}: ok"]


def test_bad_yaml(tmp_path, capsys, env):
    text = VALID.replace("    idle_timeout: 10m", "    idle_timeout: 10m: 5m")
    line, msg = one_error(tmp_path, text, capsys)
    assert line == 10 and "invalid YAML" in msg


def test_bad_yaml_unclosed_quote(tmp_path, capsys, env):
    text = VALID.replace('allowed_repositories: ["my-org/*"]', 'allowed_repositories: ["my-org/*]')
    line, msg = one_error(tmp_path, text, capsys)
    assert line == 4 and "invalid YAML" in msg


def test_bad_yaml_unclosed_list(tmp_path, capsys, env):
    line, msg = one_error(tmp_path, VALID.replace("labels: [gpu-sim]", "labels: [gpu-sim"), capsys)
    assert line == 9 and "invalid YAML" in msg


def test_unknown_key(tmp_path, capsys, env):
    text = VALID.replace("    labels: [gpu-sim]\n", "    labels: [gpu-sim]\n    colour: red\n")
    line, msg = one_error(tmp_path, text, capsys)
    assert line == 10 and "unknown key 'colour'" in msg and "pools.0.colour" in msg


def test_unknown_top_level_key(tmp_path, capsys, env):
    line, msg = one_error(tmp_path, VALID + "extra_section: {a: 1}\n", capsys)
    assert line == 17 and "unknown key 'extra_section'" in msg


def test_missing_env_var(tmp_path, capsys, monkeypatch, env):
    monkeypatch.delenv("GITHUB_TOKEN")
    line, msg = one_error(tmp_path, VALID, capsys)
    assert line == 2 and msg == "environment variable GITHUB_TOKEN is not set"


def test_missing_env_var_inside_a_flow_list(tmp_path, capsys, monkeypatch, env):
    monkeypatch.delenv("ORCHESTRATOR_ADMIN_TOKEN")
    line, msg = one_error(tmp_path, VALID, capsys)
    assert line == 6 and "ORCHESTRATOR_ADMIN_TOKEN" in msg


def test_bad_duration(tmp_path, capsys, env):
    line, msg = one_error(tmp_path, VALID.replace("idle_timeout: 10m", "idle_timeout: 10 minutes"), capsys)
    assert line == 10 and "idle_timeout" in msg and "bad duration" in msg


def test_pool_with_no_candidates(tmp_path, capsys, env):
    text = VALID.replace(
        "    candidates:\n      - {cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.25}\n",
        "    candidates: []\n",
    )
    line, msg = one_error(tmp_path, text, capsys)
    assert line == 11 and "pools.0.candidates" in msg and "at least one candidate" in msg


def test_pool_without_candidates_key(tmp_path, capsys, env):
    text = VALID.replace(
        "    candidates:\n      - {cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.25}\n", ""
    )
    line, msg = one_error(tmp_path, text, capsys)
    assert line == 8 and "at least one candidate" in msg


def test_budget_scope_naming_unknown_pool(tmp_path, capsys, env):
    line, msg = one_error(tmp_path, VALID.replace("scope: pool:demo", "scope: pool:nope"), capsys)
    assert line == 15 and "unknown pool 'nope'" in msg


def test_several_errors_each_on_its_line(tmp_path, capsys, env):
    text = VALID.replace("idle_timeout: 10m", "idle_timeout: soon").replace("limit_usd: 200", "limit_usd: -1")
    code, lines, path = check(tmp_path, text, capsys)
    assert code == 2
    assert sorted(int(ln.split(":")[1]) for ln in lines) == [10, 16], lines


def test_cloud_candidate_without_clouds_section(tmp_path, capsys, env):
    text = VALID.replace(
        "{cloud: sandbox, instance_type: gpu-t4-sim, spot: true, price_per_hour: 0.25}",
        "{cloud: aws, instance_type: g4dn.xlarge, image: ami-0123456789abcdef0}",
    )
    line, msg = one_error(tmp_path, text, capsys)
    assert line == 12 and "clouds.aws is not configured" in msg


def test_unreadable_file(tmp_path, capsys):
    assert cli.main(["check-config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().out


def test_check_config_subprocess_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("idle_timeout: 10m", "idle_timeout: later"))
    env = {**os.environ, **ENV}
    exe = [sys.executable, "-m", "orchestrator.cli"]
    ok = subprocess.run([*exe, "check-config", str(good)], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ko = subprocess.run([*exe, "check-config", str(bad)], env=env, capture_output=True, text=True, timeout=120)
    assert ko.returncode == 2
    assert ko.stdout.startswith(f"{bad}:10: pools.0.idle_timeout: bad duration")


# --- interpolation and values ---------------------------------------------------------


def test_env_interpolation_everywhere():
    cfg = load_config_text(
        VALID.replace('["my-org/*"]', '["${ORG}/*", "x/${ORG}-${ORG}"]'),
        "<t>",
        env={**ENV, "GITHUB_TOKEN": "ghp_abc", "ORCHESTRATOR_ADMIN_TOKEN": "adm", "ORG": "acme"},
    )
    assert cfg.github.token.get_secret_value() == "ghp_abc"
    assert [t.get_secret_value() for t in cfg.server.admin_tokens] == ["adm"]
    assert cfg.github.allowed_repositories == ["acme/*", "x/acme-acme"]


def test_env_values_are_not_parsed_as_yaml():
    cfg = load_config_text(VALID, "<t>", env={**ENV, "GITHUB_WEBHOOK_SECRET": "a: b, [c] #d ${E}"})
    assert cfg.github.webhook_secret.get_secret_value() == "a: b, [c] #d ${E}"


def test_secrets_do_not_show_in_repr():
    cfg = load_config_text(VALID, "<t>", env={**ENV, "GITHUB_TOKEN": "ghp_supersecret"})
    assert "ghp_supersecret" not in repr(cfg) and "ghp_supersecret" not in str(cfg.model_dump())


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("6h", 21600), ("1d", 86400), (45, 45), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10", "10 minutes", "-5m", "", "m", True, None, -1])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_poll_interval_floor():
    with pytest.raises(ConfigError) as e:
        load_config_text(VALID.replace("  allowed_repositories", "  poll_interval: 2s\n  allowed_repositories"), "<t>", env=ENV)
    assert "at least 5s" in str(e.value)


def test_config_from_environment_variable(tmp_path, monkeypatch, capsys, env):
    path = tmp_path / "c.yaml"
    path.write_text(VALID.replace("${GITHUB_TOKEN}", "ghp_x").replace("pool:demo", "pool:nope"))
    monkeypatch.setenv("ORCHESTRATOR_CONFIG", str(path))
    with pytest.raises(SystemExit) as e:
        cli.main(["reap", "--once"])
    assert e.value.code == 2
    assert f"{path}:15:" in capsys.readouterr().err


# --- the example configs and the schema ------------------------------------------------


def test_example_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"sandbox.yaml", "aws.yaml", "gcp.yaml", "azure.yaml", "multi-cloud.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_passes_check_config(path, capsys, env):
    code = cli.main(["check-config", str(path)])
    assert code == 0, capsys.readouterr().out


def test_example_configs_use_only_the_three_secrets():
    for path in CONFIGS:
        names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", path.read_text()))
        assert names <= set(ENV), f"{path.name} needs {names - set(ENV)}"
        cfg = load_config(path, env=ENV)
        assert cfg.github.app_id is None, f"{path.name}: examples use github.token, not app auth"


def test_multi_cloud_example_is_the_documented_pool():
    cfg = load_config(REPO / "configs" / "multi-cloud.yaml", env=ENV)
    pool = cfg.pool("gpu-t4")
    assert [(c.cloud, c.spot) for c in pool.candidates] == [("aws", True), ("gcp", True), ("azure", True), ("aws", False)]
    assert {b.scope.split(":")[0] for b in cfg.budgets} == {"global", "pool", "repo", "org"}


def test_schema_file_is_current():
    assert SCHEMA.exists(), "configs/orchestrator.schema.json is missing: run `orchestrator schema > configs/orchestrator.schema.json`"
    assert SCHEMA.read_text() == schema_text(), (
        "configs/orchestrator.schema.json is stale: regenerate it with `orchestrator schema > configs/orchestrator.schema.json`"
    )


def _interpolated(path: Path) -> dict:
    text = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: ENV[m.group(1)], path.read_text())
    return json.loads(json.dumps(YAML(typ="safe").load(text)))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_validates_against_schema(path):
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    jsonschema.validate(_interpolated(path), schema)


def test_schema_rejects_what_the_loader_rejects():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    data = _interpolated(REPO / "configs" / "aws.yaml")
    data["pools"][0]["colour"] = "red"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)
    data = _interpolated(REPO / "configs" / "aws.yaml")
    data["pools"][0]["idle_timeout"] = "10 minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)


def test_schema_command_prints_the_schema(capsys):
    assert cli.main(["schema"]) == 0
    assert capsys.readouterr().out == schema_text()


def test_configs_load_from_any_directory(tmp_path, env, capsys):
    # check-config reads only the file: nothing relative to the working directory.
    dst = tmp_path / "copy.yaml"
    shutil.copy(REPO / "configs" / "multi-cloud.yaml", dst)
    assert cli.main(["check-config", str(dst)]) == 0


def test_valid_line_numbers():
    # The tests above assert lines of VALID; an edit to it must keep them.
    lines = VALID.splitlines()
    assert lines[9].strip() == "idle_timeout: 10m" and lines[14].strip() == "scope: pool:demo"
