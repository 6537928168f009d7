"""Job traces and the simulator's own options.

A trace is JSON lines `{"t": s, "repo": "owner/name", "labels": [...], "duration_s": N}`.
Options that are not part of the orchestrator config (webhook loss, drain, per
instance type boot times, sandbox overrides) live in an optional overlay file
beside the trace: `foo.jsonl` -> `foo.yaml`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML


class TraceError(ValueError):
    pass


@dataclass(frozen=True)
class TraceJob:
    t: float
    repo: str
    labels: tuple[str, ...]
    duration_s: float


def load_trace(path: str | Path) -> list[TraceJob]:
    out: list[TraceJob] = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                row = json.loads(line)
                job = TraceJob(float(row["t"]), str(row["repo"]), tuple(str(x) for x in row["labels"]), float(row["duration_s"]))
            except (ValueError, KeyError, TypeError) as e:
                raise TraceError(f"{path}:{n}: bad trace line: {e}") from None
            if job.t < 0 or job.duration_s <= 0 or "/" not in job.repo:
                raise TraceError(f"{path}:{n}: t must be >= 0, duration_s > 0 and repo owner/name")
            out.append(job)
    out.sort(key=lambda j: j.t)  # stable: equal times keep file order
    return out


def write_trace(path: str | Path, jobs: list[dict]) -> None:
    with open(path, "w") as fh:
        for j in jobs:
            fh.write(json.dumps(j, separators=(",", ":")) + "\n")


@dataclass
class SimOptions:
    """What the simulated world does beyond the sandbox cloud's own knobs."""

    webhook_loss_rate: float = 0.0
    webhook_dup_rate: float = 0.0
    webhook_delay_s: float = 0.0
    scaler_tick_s: float = 5.0            # the scaler worker's retry interval (serve_forever)
    # Simulated time each call of ours to GitHub / the cloud takes; the world moves on meanwhile.
    github_api_latency_s: float = 0.25
    cloud_api_latency_s: float = 0.5
    drain_s: float = 8 * 3600.0           # after the last arrival, how long jobs may still finish
    # instance type -> {boot_time: s, boot_jitter: s}; else clouds.sandbox.boot_time/jitter
    boot_time_by_instance_type: dict[str, dict[str, float]] = field(default_factory=dict)
    # clouds.sandbox overrides for this trace (spot_interruption_rate, capacity_error_rate, ...)
    sandbox: dict[str, Any] = field(default_factory=dict)
    baselines: list[str] = field(default_factory=lambda: ["cml", "cml-spot", "tf-aws", "ideal"])

    @classmethod
    def from_dict(cls, data: dict | None) -> "SimOptions":
        data = dict(data or {})
        sim = dict(data.pop("simulator", {}) or {})
        if "sandbox" in data:
            sim["sandbox"] = data.pop("sandbox") or {}
        if data:
            raise TraceError(f"unknown overlay keys: {', '.join(sorted(data))} (expected simulator, sandbox)")
        known = {f.name for f in fields(cls)}
        bad = set(sim) - known
        if bad:
            raise TraceError(f"unknown simulator options: {', '.join(sorted(bad))}")
        opts = cls(**sim)
        for rate in ("webhook_loss_rate", "webhook_dup_rate"):
            if not 0 <= getattr(opts, rate) <= 1:
                raise TraceError(f"{rate} must be within 0..1")
        return opts

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def overlay_path(trace: str | Path) -> Path:
    p = Path(trace)
    return p.with_suffix(".yaml")


def load_options(trace: str | Path, overlay: str | Path | None = None) -> SimOptions:
    """The overlay named, else the one beside the trace, else defaults."""
    path = Path(overlay) if overlay else overlay_path(trace)
    if not path.exists():
        if overlay:
            raise TraceError(f"{path}: overlay not found")
        return SimOptions()
    data = YAML(typ="safe").load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise TraceError(f"{path}: the overlay must be a mapping")
    try:
        return SimOptions.from_dict(data)
    except TypeError as e:
        raise TraceError(f"{path}: {e}") from None
