"""Helpers and fixtures for the cloud_init tests: a fake VM root, fake binaries and an
orchestrator stub. Test modules import the fixtures they use (no conftest.py: module
name clashes between conftest files in sibling test folders)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
from ruamel.yaml import YAML

from orchestrator.userdata import UserDataContext, render_user_data

REPO = Path(__file__).resolve().parents[2]
CLOUD_INIT_DIR = REPO / "cloud_init"
FAKES = REPO / "tests" / "fakes"
SHARED = (REPO / ".." / "shared").resolve()
NVIDIA_FIXTURES = SHARED / "fixtures" / "nvidia-smi"

BOOTSTRAP_TOKEN = "obt_5fQ2kZ8rWm1xYp3LcVn7TaHd"
INSTANCE_TOKEN = "oit_9Hs4bGq6NzRw2KeJu8PxVc1m"
JIT_CONFIG = "eyJydW5uZXIiOiJncHUtdDQtYWJjMTIzIn0-JITCONFIG-" + "QUJDREVGR0g" * 8
RUNNER_VERSION = "2.330.0"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if in_ci():
            pytest.fail(f"{name} is required in CI but is not installed")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="session")
def nvidia_fixtures() -> Path:
    if not (NVIDIA_FIXTURES / "h100-query-gpu.csv").is_file():
        pytest.fail(f"shared nvidia-smi fixtures missing: expected them in {NVIDIA_FIXTURES}")
    return NVIDIA_FIXTURES


def make_context(**overrides: Any) -> UserDataContext:
    base = UserDataContext(
        instance_name="gpu-t4-abc123",
        cloud="aws",
        orchestrator_url="https://runners.example.com",
        bootstrap_mode="callback",
        bootstrap_token=BOOTSTRAP_TOKEN,
        jit_config=None,
        max_lifetime_s=6 * 3600,
        expected_gpus=1,
        runner_version=RUNNER_VERSION,
        runner_sha256=None,
        runner_preinstalled_path=None,
        arch="x64",
    )
    return replace(base, **overrides)


def parse_cloud_config(text: str) -> dict[str, Any]:
    assert text.startswith("#cloud-config\n")
    return YAML(typ="safe").load(text)


def decode_write_file(entry: dict[str, Any]) -> bytes:
    content = entry.get("content", "")
    encoding = entry.get("encoding", "text")
    if encoding == "gz+b64":
        return gzip.decompress(base64.b64decode(content))
    if encoding == "b64":
        return base64.b64decode(content)
    return content.encode()


# --- orchestrator + metadata stub ---------------------------------------------------


@dataclass
class Stub:
    trace: Path
    instance_name: str = "gpu-t4-abc123"
    bootstrap_token: str = BOOTSTRAP_TOKEN
    instance_token: str = INSTANCE_TOKEN
    jit_config: str = JIT_CONFIG
    bootstrap_failures: list[int] = field(default_factory=list)  # answered before the real one
    bootstrap_used: bool = False
    spot: str | None = None  # aws | gcp | azure: the metadata service reports a notice
    tarball: bytes = b""
    on_spot: Callable[[], None] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        path = f"/api/v1/instances/{self.instance_name}/events"
        out = [r for r in self.requests if r["method"] == "POST" and r["path"] == path]
        return [r for r in out if name is None or r["json"].get("event") == name]

    def calls(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]

    def wait_for(self, pred: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.02)
        return pred()


def _handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, code: int, body: bytes | str = b"", ctype: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            req = {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": raw,
                "json": parsed,
            }
            with stub.lock:
                stub.requests.append(req)
                with stub.trace.open("a") as f:
                    f.write(f"http {self.command} {self.path}\n")
            return req

        def do_PUT(self) -> None:
            self._record()
            if self.path == "/latest/api/token":
                self._answer(200, "imds-v2-token", "text/plain")
            else:
                self._answer(404, "")

        def do_GET(self) -> None:
            req = self._record()
            h = req["headers"]
            if self.path == "/latest/meta-data/spot/instance-action":
                if h.get("x-aws-ec2-metadata-token") != "imds-v2-token":
                    self._answer(401, "")
                elif stub.spot == "aws":
                    self._answer(200, '{"action": "terminate", "time": "2026-11-22T21:00:00Z"}')
                else:
                    self._answer(404, "")
            elif self.path == "/computeMetadata/v1/instance/preempted":
                if h.get("metadata-flavor") != "Google":
                    self._answer(403, "")
                else:
                    self._answer(200, "TRUE" if stub.spot == "gcp" else "FALSE", "text/plain")
            elif self.path == "/metadata/scheduledevents?api-version=2020-07-01":
                if h.get("metadata") != "true":
                    self._answer(400, "")
                    return
                events = [
                    # Another VM of the availability set: must be ignored.
                    {"EventId": "other", "EventType": "Preempt", "Resources": ["someone-else"],
                     "EventStatus": "Scheduled", "NotBefore": "Mon, 23 Nov 2026 10:00:00 GMT"},
                    {"EventId": "reboot", "EventType": "Reboot", "Resources": [stub.instance_name],
                     "EventStatus": "Scheduled", "NotBefore": "Mon, 23 Nov 2026 10:00:00 GMT"},
                ]
                if stub.spot == "azure":
                    events.append(
                        {"EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": "Preempt",
                         "ResourceType": "VirtualMachine", "Resources": [stub.instance_name],
                         "EventStatus": "Scheduled", "NotBefore": "Mon, 23 Nov 2026 10:00:30 GMT"}
                    )
                self._answer(200, json.dumps({"DocumentIncarnation": 3, "Events": events}))
            elif self.path.startswith("/runner/") and self.path.endswith(".tar.gz"):
                self._answer(200, stub.tarball, "application/gzip")
            else:
                self._answer(404, "")

        def do_POST(self) -> None:
            req = self._record()
            auth = req["headers"].get("authorization", "")
            if self.path == "/api/v1/bootstrap":
                if stub.bootstrap_failures:
                    self._answer(stub.bootstrap_failures.pop(0), '{"detail": "try again"}')
                elif auth != f"Bearer {stub.bootstrap_token}" or stub.bootstrap_used:
                    self._answer(401, '{"detail": "invalid or used bootstrap token"}')
                else:
                    stub.bootstrap_used = True
                    self._answer(200, json.dumps({
                        "instance_id": "i-0123456789abcdef0",
                        "runner_name": stub.instance_name,
                        "jit_config": stub.jit_config,
                        "instance_token": stub.instance_token,
                    }))
            elif self.path == f"/api/v1/instances/{stub.instance_name}/events":
                self._answer(202, '{"ok": true}')
                if req["json"] and req["json"].get("event") == "spot-interruption" and stub.on_spot:
                    stub.on_spot()
            else:
                self._answer(404, '{"detail": "not found"}')

    return Handler


@pytest.fixture
def stub(tmp_path: Path):
    trace = tmp_path / "trace.log"
    trace.touch()
    s = Stub(trace=trace)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s))
    server.daemon_threads = True
    s.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield s
    finally:
        server.shutdown()
        server.server_close()


# --- fake VM ------------------------------------------------------------------------


def install_fake(dest: Path, fake: str) -> None:
    shutil.copyfile(FAKES / fake, dest)
    dest.chmod(0o755)


def runner_tarball() -> bytes:
    """A runner tarball holding the fake run.sh; byte-stable so its sha256 can be pinned."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = (FAKES / "fake_run.sh").read_bytes()
        info = tarfile.TarInfo("run.sh")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


@dataclass
class Result:
    rc: int
    log: str
    trace: list[str]
    runner_args: list[str] | None


@dataclass
class FakeVM:
    """A temp dir laid out like the VM after cloud-init's write_files ran."""

    tmp: Path
    stub: Stub
    nvidia_fixtures: Path
    root: Path = field(init=False)
    bin: Path = field(init=False)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.tmp / "root"
        self.bin = self.tmp / "bin"
        self.root.mkdir()
        self.bin.mkdir()
        for name in ("shutdown", "poweroff"):
            self.add_fake(name, "fake_record.sh")
        self.add_fake("nvidia-smi", "fake_nvidia_smi.sh")
        self.env = {
            "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.tmp),
            "LANG": "C.UTF-8",
            "ORCH_ROOT": str(self.root),
            "ORCH_SKIP_USERADD": "1",
            "ORCH_METADATA_URL": self.stub.url,
            "ORCH_SPOT_POLL_S": "0.05",
            "ORCH_RETRY_BASE_S": "0",
            "ORCH_PREFLIGHT_DELAY_S": "0",
            "ORCH_RUNNER_DOWNLOAD_BASE": f"{self.stub.url}/runner",
            "FAKE_TRACE": str(self.stub.trace),
            "FAKE_NVIDIA_SMI_FIXTURES": str(self.nvidia_fixtures),
            "FAKE_RUNNER_ARGS": str(self.tmp / "runner-args"),
            "FAKE_RUNNER_RELEASE": str(self.tmp / "release"),
        }
        # Never let a test reach the real power switch.
        for name in ("shutdown", "poweroff"):
            assert shutil.which(name, path=self.env["PATH"]) == str(self.bin / name)

    def add_fake(self, name: str, fake: str) -> None:
        """Puts tests/fakes/FAKE on PATH as NAME (a copy: the fakes act on their own name)."""
        install_fake(self.bin / name, fake)

    def context(self, **overrides: Any) -> UserDataContext:
        overrides.setdefault("orchestrator_url", self.stub.url)
        overrides.setdefault("runner_preinstalled_path", "/opt/baked-runner")
        return make_context(**overrides)

    def install(self, ctx: UserDataContext) -> dict[str, Any]:
        """Writes the rendered user-data's files as cloud-init would."""
        doc = parse_cloud_config(render_user_data(ctx))
        for entry in doc["write_files"]:
            dest = self.root / entry["path"].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(decode_write_file(entry))
            dest.chmod(int(entry.get("permissions", "0644"), 8))
        if ctx.runner_preinstalled_path:
            baked = self.root / ctx.runner_preinstalled_path.lstrip("/")
            baked.mkdir(parents=True, exist_ok=True)
            install_fake(baked / "run.sh", "fake_run.sh")
        else:
            self.stub.tarball = runner_tarball()
        # cloud-init's own plain copy of user-data, which the bootstrap scrubs.
        ud = self.root / "var/lib/cloud/instance/user-data.txt"
        ud.parent.mkdir(parents=True, exist_ok=True)
        ud.write_text(render_user_data(ctx))
        return doc

    def start(self, **env: str) -> subprocess.Popen[bytes]:
        script = self.root / "opt/orchestrator/bootstrap.sh"
        log = (self.tmp / "bootstrap.log").open("wb")
        # A log file, not a pipe: background children must not hold the test up.
        return subprocess.Popen(
            ["bash", str(script)], env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def finish(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> Result:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("bootstrap.sh did not finish:\n" + self.log())
        args_file = self.tmp / "runner-args"
        args = args_file.read_text().splitlines() if args_file.exists() else None
        return Result(rc, self.log(), self.stub.trace.read_text().splitlines(), args)

    def run(self, timeout: float = 30, **env: str) -> Result:
        return self.finish(self.start(**env), timeout)

    def log(self) -> str:
        path = self.tmp / "bootstrap.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def vm(tmp_path: Path, stub: Stub, nvidia_fixtures: Path) -> FakeVM:
    for tool in ("curl", "setsid"):
        require_tool(tool)
    return FakeVM(tmp_path, stub, nvidia_fixtures)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
