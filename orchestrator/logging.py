"""Structured JSON logs with secrets redacted."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
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
# Longest first, so a secret that contains another is hidden whole. Replaced, never mutated,
# so a log call in another thread never iterates a set that is changing.
_known_secrets: tuple[str, ...] = ()
_register_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Values from config that must never reach a log line."""
    global _known_secrets
    if value and len(value) >= 4:
        with _register_lock:
            if value not in _known_secrets:
                _known_secrets = tuple(sorted({*_known_secrets, value}, key=len, reverse=True))


def redact(text: str) -> str:
    for secret in _known_secrets:
        text = text.replace(secret, REDACTED)
    for pat in _PATTERNS:
        text = pat.sub(lambda m: m.group("keep") + REDACTED, text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Each text is redacted before JSON escapes it: a secret holding a quote, a backslash or
        # non-ASCII would not match once escaped, and a reader's json.loads would bring it back.
        out = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[redact(str(key))] = value if isinstance(value, (int, float, bool)) or value is None else redact(str(value))
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
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
