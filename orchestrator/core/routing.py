"""Labels -> pool, per INTERFACE.md. Pure functions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import Candidate, Config, PoolConfig

BASE_LABELS = ("self-hosted", "linux")
UNIQUE_SEPARATOR = "--"


def effective_labels(pool: PoolConfig, arch: str = "x64") -> list[str]:
    """What a pool's runners answer to: its labels plus self-hosted, linux and the architecture."""
    out = list(BASE_LABELS) + [arch]
    out += [label for label in pool.labels if label.lower() not in {o.lower() for o in out}]
    return out


def pool_archs(pool: PoolConfig) -> set[str]:
    return {c.arch for c in pool.candidates}


@dataclass(frozen=True)
class Route:
    pool: PoolConfig
    unique_label: str | None  # the full NAME--SUFFIX label, when the job used that form


def route(config: Config, job_labels: list[str] | tuple[str, ...]) -> Route | None:
    """The first pool (config order) whose effective labels cover every job label, case-insensitively.

    A job label NAME--SUFFIX matches a pool label NAME; the runner then carries the full label.
    """
    wanted = [label.strip() for label in job_labels if label and label.strip()]
    if not wanted:
        return None
    for pool in config.pools:
        for arch in sorted(pool_archs(pool)):
            offered = {label.lower() for label in effective_labels(pool, arch)}
            unique: str | None = None
            ok = True
            for label in wanted:
                low = label.lower()
                if low in offered:
                    continue
                base, sep, suffix = low.partition(UNIQUE_SEPARATOR)
                if sep and suffix and base in {pl.lower() for pl in pool.labels} and unique is None:
                    unique = label
                    continue
                ok = False
                break
            if ok:
                return Route(pool, unique)
    return None


def runner_labels(pool: PoolConfig, candidate: Candidate, unique_label: str | None) -> list[str]:
    """Labels registered for a runner. The unique form replaces the bare pool labels: no runner stealing."""
    if unique_label:
        return list(BASE_LABELS) + [candidate.arch, unique_label]
    return effective_labels(pool, candidate.arch)


def candidates_for_arch(pool: PoolConfig, job_labels: list[str]) -> list[tuple[int, Candidate]]:
    """Candidates whose architecture the job accepts (a job naming arm64 gets no x64 VM)."""
    lowered = {label.lower() for label in job_labels}
    archs = {"x64", "arm64"} & lowered
    return [(i, c) for i, c in enumerate(pool.candidates) if not archs or c.arch in archs]
