"""The YAML runner config: pydantic models, ${ENV} interpolation, durations, and
errors reported as FILE:LINE: message."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# `${NAME}` is not a plain scalar inside a YAML flow list (`[${TOKEN}]`): it is swapped for
# this placeholder before parsing, on the same line, and for the value afterwards.
_ENV_MARK = "$__orchestrator_env_{}$"
_ENV_MARK_RE = re.compile(r"\$__orchestrator_env_([A-Za-z_][A-Za-z0-9_]*)\$")


def _unmark(text: str) -> str:
    """Error messages show what the user wrote, not the placeholder."""
    return _ENV_MARK_RE.sub(lambda m: "${" + m.group(1) + "}", text)


def parse_duration(value: Any) -> int:
    """'90s' | '10m' | '6h' | '1d' | a number of seconds -> whole seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is written like 90s, 10m, 6h or 1d")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return int(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return int(float(m.group(1)) * _UNIT_SECONDS[m.group(2)])
    raise ValueError(f"bad duration {value!r}: write it like 90s, 10m, 6h or 1d")


Duration = Annotated[
    int,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\d+(\.\d+)?(s|m|h|d)$"},
                {"type": "integer", "minimum": 0},
            ],
            "description": "seconds, or a duration like 90s, 10m, 6h, 1d",
        }
    ),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GitHubConfig(_Model):
    api_url: str = "https://api.github.com"
    app_id: int | None = None
    private_key_path: str | None = None
    token: SecretStr | None = None
    webhook_secret: SecretStr
    runner_scope: Literal["org", "repo"] = "org"
    allowed_repositories: list[str] = Field(default_factory=list)
    allow_public_repositories: bool = False
    simulated: bool = False
    poll_interval: Duration = 120
    runner_group: str | None = None

    @field_validator("poll_interval")
    @classmethod
    def _min_poll(cls, v: int) -> int:
        if v < 5:
            raise ValueError("poll_interval must be at least 5s")
        return v

    @field_validator("api_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @model_validator(mode="after")
    def _one_auth(self) -> "GitHubConfig":
        if self.simulated:
            return self
        has_app = self.app_id is not None
        if has_app and self.token is not None:
            raise ValueError("set either app_id/private_key_path or token, not both")
        if not has_app and self.token is None:
            raise ValueError("set app_id with private_key_path, or token (or simulated: true)")
        if has_app and not self.private_key_path:
            raise ValueError("app_id needs private_key_path")
        return self

    def repository_allowed(self, full_name: str) -> bool:
        name = full_name.lower()
        return any(fnmatch.fnmatchcase(name, pat.lower()) for pat in self.allowed_repositories)


class ServerConfig(_Model):
    orchestrator_id: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,30}[a-z0-9]$")
    listen: str = "0.0.0.0:8080"
    public_url: str = "http://127.0.0.1:8080"
    admin_tokens: list[SecretStr] = Field(default_factory=list)
    reaper_interval: Duration = 30
    # VMs requested at once: a matrix burst up to this size is requested in one go. Cloud APIs take
    # bursts this large (EC2's RunInstances token bucket holds 1,000); GitHub calls are capped apart.
    launch_concurrency: int = Field(default=256, ge=1, le=1024)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"listen must be HOST:PORT, got {v!r}")
        return v

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class DatabaseConfig(_Model):
    url: str = "sqlite:///orchestrator.db"


class AwsCloud(_Model):
    region: str = "us-east-1"
    endpoint_url: str | None = None
    subnet_ids: list[str] = Field(default_factory=list)
    security_group_ids: list[str] = Field(default_factory=list)
    iam_instance_profile: str | None = None


class GcpCloud(_Model):
    project: str
    api_endpoint: str | None = None
    network: str = "default"
    subnetwork: str | None = None
    service_account: str | None = None


class AzureCloud(_Model):
    subscription_id: str
    resource_group: str
    location: str = "eastus"
    subnet_id: str
    base_url: str | None = None


class SandboxCloud(_Model):
    """Knobs of the simulated cloud (demo, simulate, tests)."""

    boot_time: Duration = 40
    boot_jitter: Duration = 10
    spot_interruption_rate: float = Field(default=0.0, ge=0, le=1)
    capacity_error_rate: float = Field(default=0.0, ge=0, le=1)
    min_billing: Duration = 60
    seed: int = 0


class CloudsConfig(_Model):
    aws: AwsCloud | None = None
    gcp: GcpCloud | None = None
    azure: AzureCloud | None = None
    sandbox: SandboxCloud = Field(default_factory=SandboxCloud)


class GpuSpec(_Model):
    type: str
    count: int = Field(default=1, ge=1)


CloudName = Literal["aws", "gcp", "azure", "sandbox"]


class Candidate(_Model):
    cloud: CloudName
    instance_type: str
    region: str | None = None
    zone: str | None = None
    location: str | None = None
    image: str | None = None
    spot: bool = True
    arch: Literal["x64", "arm64"] = "x64"
    gpu: GpuSpec | None = None
    price_per_hour: float | None = Field(default=None, gt=0)
    max_price: float | None = Field(default=None, gt=0)
    # Sandbox only (demo, simulate): this candidate's boot time, instead of clouds.sandbox's.
    boot_time: Duration | None = None
    boot_jitter: Duration | None = None

    def key(self) -> str:
        """Stable identity of a capacity pool, for circuit breakers and metrics."""
        where = self.zone or self.region or self.location or "-"
        return f"{self.cloud}/{where}/{self.instance_type}/{'spot' if self.spot else 'ondemand'}"


class RunnerSpec(_Model):
    version: str = "2.330.0"
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    preinstalled_path: str | None = None


class PoolConfig(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    labels: list[str] = Field(min_length=1)
    max_runners: int = Field(default=10, ge=0)
    min_idle: int = Field(default=0, ge=0)
    idle_timeout: Duration = 600
    boot_timeout: Duration = 600
    max_lifetime: Duration = 21600
    disk_gb: int = Field(default=100, ge=8)
    on_spot_interruption: Literal["rerun", "fail"] = "rerun"
    candidates: list[Candidate] = Field(min_length=1)
    bootstrap: Literal["callback", "inline"] = "callback"
    runner: RunnerSpec = Field(default_factory=RunnerSpec)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        for label in v:
            if not label or "--" in label:
                raise ValueError(f"pool label {label!r} must be non-empty and must not contain '--'")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> "PoolConfig":
        if self.min_idle > self.max_runners:
            raise ValueError("min_idle cannot exceed max_runners")
        if self.max_lifetime <= 0:
            raise ValueError("max_lifetime must be positive")
        return self


_SCOPE_RE = r"^(global|pool:[a-z0-9][a-z0-9-]*|repo:[^/\s]+/[^/\s]+|org:[^/\s]+)$"


class BudgetConfig(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    scope: str = Field(default="global", pattern=_SCOPE_RE)
    period: Literal["daily", "weekly", "monthly"] = "monthly"
    limit_usd: float = Field(ge=0)
    alert_at: list[float] = Field(default_factory=lambda: [0.5, 0.8, 1.0])
    on_exceed: Literal["block", "alert"] = "block"
    alert_webhook_url: str | None = None

    @field_validator("alert_at")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError("alert_at fractions must be positive")
        return sorted(set(v))


class Config(_Model):
    github: GitHubConfig
    server: ServerConfig = Field(default_factory=ServerConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    clouds: CloudsConfig = Field(default_factory=CloudsConfig)
    pools: list[PoolConfig] = Field(min_length=1)
    budgets: list[BudgetConfig] = Field(default_factory=list)

    def pool(self, name: str) -> PoolConfig | None:
        return next((p for p in self.pools if p.name == name), None)

    def budget(self, name: str) -> BudgetConfig | None:
        return next((b for b in self.budgets if b.name == name), None)


class ConfigError(Exception):
    """Every problem of a config file, each as 'FILE:LINE: message'."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


# --- loading -----------------------------------------------------------------


def _node_line(node: Any, key: Any) -> int | None:
    """0-based line of `key` inside a ruamel node, if it can be told."""
    try:
        if isinstance(node, CommentedMap) and key in node:
            return node.lc.key(key)[0]
        if isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
            return node.lc.item(key)[0]
    except (KeyError, IndexError, TypeError, AttributeError):
        pass
    return None


def _line_of(root: Any, loc: tuple[Any, ...]) -> int:
    """1-based line of the deepest part of `loc` found in the tree."""
    line = 0
    node = root
    if isinstance(root, (CommentedMap, CommentedSeq)):
        line = root.lc.line
    for part in loc:
        found = _node_line(node, part)
        if found is None:
            break
        line = found
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
    return line + 1


def _interpolate(node: Any, env: dict[str, str], problems: list[tuple[int, str]], line: int) -> Any:
    if isinstance(node, CommentedMap):
        for key in list(node.keys()):
            ln = node.lc.value(key)[0] if key in node.lc.data else line
            node[key] = _interpolate(node[key], env, problems, ln)
        return node
    if isinstance(node, CommentedSeq):
        for i in range(len(node)):
            ln = node.lc.item(i)[0] if i in node.lc.data else line
            node[i] = _interpolate(node[i], env, problems, ln)
        return node
    if isinstance(node, str) and "$__orchestrator_env_" in node:

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                problems.append((line + 1, f"environment variable {name} is not set"))
                return ""
            return env[name]

        return _ENV_MARK_RE.sub(sub, str(node))
    return node


def _cross_check(cfg: Config) -> list[tuple[tuple[Any, ...], str]]:
    """Rules that span sections; each names where it applies."""
    out: list[tuple[tuple[Any, ...], str]] = []
    seen: set[str] = set()
    for i, pool in enumerate(cfg.pools):
        if pool.name in seen:
            out.append((("pools", i, "name"), f"duplicate pool name {pool.name!r}"))
        seen.add(pool.name)
        for j, cand in enumerate(pool.candidates):
            where = ("pools", i, "candidates", j, "cloud")
            if cand.cloud != "sandbox" and getattr(cfg.clouds, cand.cloud) is None:
                out.append((where, f"candidate uses cloud {cand.cloud!r} but clouds.{cand.cloud} is not configured"))
            if cand.cloud in ("aws", "gcp", "azure") and not cand.image:
                out.append((("pools", i, "candidates", j), f"a {cand.cloud} candidate needs an image"))
            if cand.cloud != "sandbox" and (cand.boot_time is not None or cand.boot_jitter is not None):
                out.append((("pools", i, "candidates", j), "boot_time and boot_jitter apply to sandbox candidates only"))
            if cand.cloud == "gcp" and not cand.zone:
                out.append((("pools", i, "candidates", j), "a gcp candidate needs a zone"))
    budget_names: set[str] = set()
    for i, budget in enumerate(cfg.budgets):
        if budget.name in budget_names:
            out.append((("budgets", i, "name"), f"duplicate budget name {budget.name!r}"))
        budget_names.add(budget.name)
        if budget.scope.startswith("pool:") and cfg.pool(budget.scope[5:]) is None:
            out.append((("budgets", i, "scope"), f"budget scope names unknown pool {budget.scope[5:]!r}"))
    return out


def _format_loc_msg(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = f"unknown key {err['loc'][-1]!r}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["loc"] and err["loc"][-1] == "candidates" and err["type"] in ("missing", "too_short"):
        msg = "a pool needs at least one candidate (cloud, instance_type, ...)"
    return _unmark(f"{loc}: {msg}" if loc else msg)


# Errors about something left open (a quote, a [ or {, a key without ':') are noticed further
# down; the line where it was opened is the one to fix.
_OPENED_AT_CONTEXT = ("while scanning a quoted scalar", "while parsing a flow", "while scanning a simple key")


def _yaml_error_line(e: MarkedYAMLError) -> int:
    mark = e.problem_mark or e.context_mark
    if e.context_mark is not None and str(e.context or "").startswith(_OPENED_AT_CONTEXT):
        mark = e.context_mark
    return mark.line + 1 if mark else 1


def load_config_text(text: str, filename: str = "<config>", env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    yaml = YAML(typ="rt")
    try:
        tree = yaml.load(_ENV_RE.sub(lambda m: _ENV_MARK.format(m.group(1)), text))
    except MarkedYAMLError as e:
        raise ConfigError([f"{filename}:{_yaml_error_line(e)}: invalid YAML: {_unmark(str(e.problem or e))}"]) from None
    except Exception as e:  # ruamel raises several families for bad input
        raise ConfigError([f"{filename}:1: invalid YAML: {_unmark(str(e))}"]) from None
    if not isinstance(tree, CommentedMap):
        raise ConfigError([f"{filename}:1: the config must be a YAML mapping"])
    problems: list[tuple[int, str]] = []
    tree = _interpolate(tree, env, problems, 0)
    if problems:
        raise ConfigError([f"{filename}:{ln}: {msg}" for ln, msg in problems])
    data = json.loads(json.dumps(tree, default=str))
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        errors = [f"{filename}:{_line_of(tree, tuple(err['loc']))}: {_format_loc_msg(err)}" for err in e.errors()]
        raise ConfigError(errors) from None
    cross = _cross_check(cfg)
    if cross:
        raise ConfigError([f"{filename}:{_line_of(tree, loc)}: {'.'.join(map(str, loc))}: {msg}" for loc, msg in cross])
    return cfg


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}:0: cannot read config: {e.strerror or e}"]) from None
    return load_config_text(text, str(path), env)


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "orchestrator runner config"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


SCHEMA_PATH = Path("configs") / "orchestrator.schema.json"
