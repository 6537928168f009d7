"""Structured JSON logs with secrets redacted."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

REDACTED = "<redacted>"
# Each pattern keeps its "keep" group (the key or scheme) and hides the rest.
_PATTERNS = [
    re.compile(r"(?P<keep>)\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    re.compile(r"(?i)(?P<keep>bearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?P<keep>)\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"),  # JWTs
    re.compile(r"(?i)(?P<keep>(?:token|secret|password|jit_config|private_key)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]{6,}"),
]
_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_known_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Values from config that must never reach a log line."""
    if value and len(value) >= 4:
        _known_secrets.add(value)


def redact(text: str) -> str:
    for secret in sorted(_known_secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for pat in _PATTERNS:
        text = pat.sub(lambda m: m.group("keep") + REDACTED, text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value if isinstance(value, (int, float, bool)) or value is None else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str))


def setup_logging(level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "urllib3", "apscheduler", "uvicorn.access", "github"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def register_config_secrets(config) -> None:
    gh = config.github
    register_secret(gh.webhook_secret.get_secret_value())
    if gh.token is not None:
        register_secret(gh.token.get_secret_value())
    for t in config.server.admin_tokens:
        register_secret(t.get_secret_value())
