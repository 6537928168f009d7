"""A moto server over real HTTP, for provider tests and benchmarks.

Usage in a conftest (the fixture is session-scoped; reset state per test):

    from tests.fakes.moto import moto_server  # noqa: F401  (pytest fixture)

    def test_x(moto_server):
        moto_server.reset()
        ec2 = moto_server.client("ec2", "us-east-1")
        session = moto_server.session()  # boto3.Session with dummy credentials

Outside pytest: `with start_moto_server() as server: ...`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

# moto's default account is 123456789012 for any key; these never reach AWS.
DUMMY_CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "aws_session_token": "testing",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoServer:
    endpoint_url: str
    _sessions: dict[str, boto3.Session] = field(default_factory=dict, repr=False)

    def session(self, region: str = "us-east-1", *, fresh: bool = False) -> boto3.Session:
        """A session with dummy credentials, so nothing from the environment is used.

        Shared per region unless `fresh`: each new session parses the service
        models again (about a second for EC2). Hook events on clients, not on a
        shared session, or use a fresh one.
        """
        if fresh:
            return boto3.Session(region_name=region, **DUMMY_CREDENTIALS)
        if region not in self._sessions:
            self._sessions[region] = boto3.Session(region_name=region, **DUMMY_CREDENTIALS)
        return self._sessions[region]

    def client(self, service: str, region: str = "us-east-1") -> Any:
        return self.session(region).client(service, endpoint_url=self.endpoint_url)

    def reset(self) -> None:
        """Forget every resource in every region."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()


@contextlib.contextmanager
def start_moto_server() -> Iterator[MotoServer]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield MotoServer(endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    with start_moto_server() as server:
        yield server
