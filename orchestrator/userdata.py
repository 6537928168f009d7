"""Renders the cloud-init user-data a runner VM boots with.

The VM-side logic lives in the shell scripts of ``cloud_init/``; this module only
validates the context, fills in their settings and packs them into one
``#cloud-config`` document.
"""

from __future__ import annotations

import base64
import gzip
import importlib.resources
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

SECRET_PLACEHOLDER = "<redacted>"

CLOUDS = ("aws", "gcp", "azure", "sandbox")
BOOTSTRAP_MODES = ("callback", "inline")
ARCHES = ("x64", "arm64")

INSTALL_DIR = "/opt/orchestrator"
CONFIG_PATH = "/etc/orchestrator/bootstrap.env"
SECRET_PATH = "/etc/orchestrator/bootstrap.secret"
SCRIPTS = ("bootstrap.sh", "orch-event.sh", "gpu-preflight.sh", "spot-watch.sh", "runner-hook.sh")
TEMPLATE = "user-data.yaml.j2"

# Long-lived GitHub credentials must never reach a VM's user-data.
_GITHUB_TOKEN_RE = re.compile(r"(ghp_|gho_|ghu_|ghs_|ghr_|github_pat_)")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_URL_RE = re.compile(r"^https?://[^\s'\"\\]+$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9._/-]*$")
_SECRET_RE = re.compile(r"^[\x21-\x7e]+$")
_HEREDOC_RE = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")


@dataclass(frozen=True)
class UserDataContext:
    instance_name: str  # VM name == runner name; also the {id} in /api/v1/instances/{id}/events
    cloud: str  # aws | gcp | azure | sandbox (selects the spot-interruption watcher)
    orchestrator_url: str  # server.public_url
    bootstrap_mode: str  # "callback" | "inline"
    # Callback mode: the one-time token for /api/v1/bootstrap. Both modes: events are posted
    # with it until the VM holds an instance token, and for good in inline mode.
    bootstrap_token: str | None
    jit_config: str | None  # inline mode only; never rendered in callback mode
    max_lifetime_s: int  # watchdog: shutdown -h +floor(max_lifetime/60) when no deadline is given
    expected_gpus: int  # GPU preflight: at least this many; 0 = skip
    runner_version: str  # e.g. "2.330.0"
    runner_sha256: str | None  # pinned sha256 of the runner tarball
    runner_preinstalled_path: str | None  # runner baked into the image at this path
    arch: str = "x64"  # x64 | arm64
    deadline_epoch: int | None = None  # launch time + max_lifetime; the watchdog counts to it


def _check(ctx: UserDataContext, *, redact: bool) -> None:
    errors: list[str] = []
    if not _NAME_RE.match(ctx.instance_name or ""):
        errors.append(f"instance_name {ctx.instance_name!r} must be 1-128 of [A-Za-z0-9._-]")
    if ctx.cloud not in CLOUDS:
        errors.append(f"cloud must be one of {', '.join(CLOUDS)}, not {ctx.cloud!r}")
    if not _URL_RE.match(ctx.orchestrator_url or ""):
        errors.append(f"orchestrator_url {ctx.orchestrator_url!r} must be an http(s) URL")
    if ctx.bootstrap_mode not in BOOTSTRAP_MODES:
        errors.append(f"bootstrap_mode must be callback or inline, not {ctx.bootstrap_mode!r}")
    # A redacted render (render-cloud-init) shows the shape without holding real secrets.
    if ctx.bootstrap_mode == "callback" and not ctx.bootstrap_token and not redact:
        errors.append("callback bootstrap needs a bootstrap_token")
    if ctx.bootstrap_mode == "inline" and not ctx.jit_config and not redact:
        errors.append("inline bootstrap needs a jit_config")
    for field in ("bootstrap_token", "jit_config"):
        value = getattr(ctx, field)
        if value is None:
            continue
        if not _SECRET_RE.match(value):
            errors.append(f"{field} must be printable ASCII without spaces")
        if _GITHUB_TOKEN_RE.search(value):
            errors.append(f"{field} looks like a GitHub token; VMs get one-time tokens only")
    if not isinstance(ctx.max_lifetime_s, int) or ctx.max_lifetime_s <= 0:
        errors.append("max_lifetime_s must be a positive integer")
    if not isinstance(ctx.expected_gpus, int) or ctx.expected_gpus < 0:
        errors.append("expected_gpus must be an integer >= 0")
    if not _VERSION_RE.match(ctx.runner_version or ""):
        errors.append(f"runner_version {ctx.runner_version!r} must look like 2.330.0")
    if ctx.runner_sha256 is not None and not _SHA256_RE.match(ctx.runner_sha256):
        errors.append("runner_sha256 must be 64 hex digits")
    if ctx.runner_preinstalled_path is not None and not _PATH_RE.match(ctx.runner_preinstalled_path):
        errors.append("runner_preinstalled_path must be an absolute path of [A-Za-z0-9._/-]")
    if ctx.arch not in ARCHES:
        errors.append(f"arch must be x64 or arm64, not {ctx.arch!r}")
    if errors:
        raise ValueError("invalid user-data context: " + "; ".join(errors))


def _resources() -> Any:
    try:
        return importlib.resources.files("orchestrator.cloud_init")
    except ModuleNotFoundError:
        # Editable installs cannot import a data-only subpackage mapped from another
        # directory; the source tree holds the same files.
        return Path(__file__).resolve().parent.parent / "cloud_init"


@lru_cache(maxsize=None)
def _read(name: str) -> str:
    return (_resources() / name).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def _template() -> jinja2.Template:
    """Compiled once: a launch renders it, and compiling costs more than rendering."""
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return env.from_string(_read(TEMPLATE))


@lru_cache(maxsize=None)
def _scripts() -> tuple[dict[str, str], ...]:
    return tuple(
        {"path": f"{INSTALL_DIR}/{name}", "permissions": "0755", "content": _pack(strip_comments(_read(name)))}
        for name in SCRIPTS
    )


def strip_comments(script: str) -> str:
    """The script as shipped: comment-only and blank lines dropped, heredocs untouched.

    EC2 caps user-data at 16 KiB and an inline JIT config takes about 4 of them; the
    commented source stays in the repository. The shebang and shellcheck directives stay.
    """
    out: list[str] = []
    heredoc_end: str | None = None
    for number, line in enumerate(script.splitlines()):
        if heredoc_end is not None:
            out.append(line)
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        bare = line.strip()
        keep = (number == 0 and bare.startswith("#!")) or bare.startswith("# shellcheck ")
        if not keep and (not bare or bare.startswith("#")):
            continue
        out.append(line)
        match = _HEREDOC_RE.search(line)
        if match:
            heredoc_end = match.group(2)
    return "\n".join(out) + "\n"


def _pack(text: str) -> str:
    # mtime=0 keeps the output byte-for-byte stable for the same scripts.
    return base64.b64encode(gzip.compress(text.encode(), compresslevel=9, mtime=0)).decode()


def _env_file(header: str, values: dict[str, str]) -> str:
    lines = [f"# {header}"]
    lines += [f"{key}={shlex.quote(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def render_user_data(ctx: UserDataContext, *, redact: bool = False) -> str:
    """One ``#cloud-config`` document for the VM described by ``ctx``."""
    _check(ctx, redact=redact)

    def secret(value: str | None, required: bool) -> str | None:
        if redact and (value is not None or required):
            return SECRET_PLACEHOLDER
        return value

    config_text = _env_file(
        "Settings for bootstrap.sh (sourced by bash); no secrets here.",
        {
            "ORCH_INSTANCE_NAME": ctx.instance_name,
            "ORCH_CLOUD": ctx.cloud,
            "ORCH_URL": ctx.orchestrator_url.rstrip("/"),
            "ORCH_BOOTSTRAP_MODE": ctx.bootstrap_mode,
            "ORCH_MAX_LIFETIME_S": str(ctx.max_lifetime_s),
            "ORCH_DEADLINE_EPOCH": str(ctx.deadline_epoch) if ctx.deadline_epoch else "",
            "ORCH_EXPECTED_GPUS": str(ctx.expected_gpus),
            "ORCH_RUNNER_VERSION": ctx.runner_version,
            "ORCH_RUNNER_SHA256": (ctx.runner_sha256 or "").lower(),
            "ORCH_RUNNER_PREINSTALLED_PATH": ctx.runner_preinstalled_path or "",
            "ORCH_ARCH": ctx.arch,
        },
    )
    secrets: dict[str, str] = {}
    token = secret(ctx.bootstrap_token, ctx.bootstrap_mode == "callback")
    if token is not None:
        secrets["ORCH_BOOTSTRAP_TOKEN"] = token
    # Callback VMs fetch their JIT config; it must not sit in the cloud metadata.
    if ctx.bootstrap_mode == "inline":
        jit = secret(ctx.jit_config, True)
        if jit is not None:
            secrets["ORCH_JIT_CONFIG"] = jit
    secret_text = _env_file("Read once and deleted by bootstrap.sh.", secrets) if secrets else ""

    text = _template().render(
        instance_name=ctx.instance_name,
        cloud=ctx.cloud,
        bootstrap_mode=ctx.bootstrap_mode,
        scripts=_scripts(),
        config_path=CONFIG_PATH,
        config_text=config_text.rstrip("\n"),
        secret_path=SECRET_PATH,
        secret_text=secret_text.rstrip("\n"),
        bootstrap_path=f"{INSTALL_DIR}/bootstrap.sh",
    )
    if _GITHUB_TOKEN_RE.search(text):
        raise ValueError("rendered user-data contains something shaped like a GitHub token")
    return text
