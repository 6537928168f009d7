"""JSON log lines, and secrets that never reach them."""

from __future__ import annotations

import io
import json
import logging

import pytest

from orchestrator.config import load_config_text
from orchestrator.core.lifecycle import new_token
from orchestrator.logging import REDACTED, JsonFormatter, redact, register_config_secrets, register_secret, setup_logging

GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0" * 2
WEBHOOK_SECRET = "whsec-Quote\"Back\\slash-ünïcode-7731"
ADMIN_TOKEN = "admin-token-5f1e2d"

CONFIG = """
github:
  token: ${GITHUB_TOKEN}
  webhook_secret: ${GITHUB_WEBHOOK_SECRET}
  allowed_repositories: ["my-org/*"]
server:
  admin_tokens: [${ORCHESTRATOR_ADMIN_TOKEN}]
pools:
  - name: demo
    labels: [gpu-sim]
    candidates:
      - {cloud: sandbox, instance_type: gpu-t4-sim}
"""


@pytest.fixture
def capture():
    """A logger whose records go, formatted by JsonFormatter, into a buffer."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("orchestrator.test-logging")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, buf
    logger.removeHandler(handler)


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(ln) for ln in buf.getvalue().splitlines()]


def test_one_json_object_per_line(capture):
    logger, buf = capture
    logger.info("runner launched", extra={"job": 42, "instance": "orch-x-gpu-1", "spot": True, "price": 0.25, "none": None})
    logger.warning("two\nlines")
    first, second = lines(buf)
    assert first["msg"] == "runner launched" and first["level"] == "info" and first["logger"] == "orchestrator.test-logging"
    assert (first["job"], first["instance"], first["spot"], first["price"], first["none"]) == (42, "orch-x-gpu-1", True, 0.25, None)
    assert first["ts"].endswith("+00:00")
    assert second["msg"] == "two\nlines" and second["level"] == "warning"


def test_exceptions_are_one_line_too(capture):
    logger, buf = capture
    try:
        raise ValueError("bad thing")
    except ValueError:
        logger.exception("it failed")
    [rec] = lines(buf)
    assert rec["level"] == "error" and "ValueError: bad thing" in rec["exc"]


def test_registered_secrets_never_appear(capture):
    logger, buf = capture
    config = load_config_text(
        CONFIG, "<t>", env={"GITHUB_TOKEN": GITHUB_TOKEN, "GITHUB_WEBHOOK_SECRET": WEBHOOK_SECRET, "ORCHESTRATOR_ADMIN_TOKEN": ADMIN_TOKEN}
    )
    register_config_secrets(config)
    bootstrap = new_token()
    register_secret(bootstrap)
    secrets = [GITHUB_TOKEN, WEBHOOK_SECRET, ADMIN_TOKEN, bootstrap]
    for secret in secrets:
        logger.info("value is %s", secret)
        logger.info(f"inline {secret} here")
        logger.info("in extra", extra={"detail": secret, "nested": {"k": [secret]}, "header": f"Bearer {secret}"})
        try:
            raise RuntimeError(f"call failed with {secret}")
        except RuntimeError:
            logger.exception("failure", extra={"error": f"token={secret}"})
    text = buf.getvalue()
    parsed = json.dumps(lines(buf), ensure_ascii=False)  # what a log reader sees after decoding
    for secret in secrets:
        assert secret not in text, secret
        assert secret not in parsed, secret
        assert json.dumps(secret)[1:-1] not in text, secret  # nor its JSON-escaped form
    assert text.count(REDACTED) >= 4 * len(secrets)


def test_secret_looking_values_are_redacted_unregistered(capture):
    logger, buf = capture
    unregistered = "ghp_" + "Z9y8X7w6V5u4T3s2R1q0" * 2
    logger.info("github said no", extra={"error": f"401 for {unregistered}", "auth": "Authorization: Bearer abcdefgh12345678"})
    logger.info("config", extra={"jit_config": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4eXoifQ.c2lnbmF0dXJl"})
    logger.info('payload {"token": "s3cr3tvalue99", "password": "hunter2hunter2"}')
    text = buf.getvalue()
    for leaked in (unregistered, "abcdefgh12345678", "eyJhbGciOiJIUzI1NiJ9", "s3cr3tvalue99", "hunter2hunter2"):
        assert leaked not in text, leaked


def test_short_values_are_not_registered():
    register_secret("ab")
    assert redact("ab cd") == "ab cd"


def test_longest_secret_wins():
    register_secret("overlap-secret-value")
    register_secret("overlap-secret-value-longer")
    assert redact("x overlap-secret-value-longer y") == f"x {REDACTED} y"


def test_setup_logging_writes_json(capsys):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", stream=stream)
        logging.getLogger("orchestrator.somewhere").info("hello", extra={"pool": "gpu-t4"})
        logging.getLogger("orchestrator.somewhere").debug("hidden")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    [rec] = [json.loads(ln) for ln in stream.getvalue().splitlines()]
    assert rec["msg"] == "hello" and rec["pool"] == "gpu-t4"
