"""Job and instance state machines: the legal transitions, and nothing else."""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    WAITING = "waiting"          # deployment approval pending; never launched while here
    QUEUED = "queued"
    LAUNCHING = "launching"      # claimed by one scaler; a VM is being requested
    ASSIGNED = "assigned"        # a VM was launched for it
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    IGNORED = "ignored"          # no pool, or repository not allowed


class InstanceState(str, enum.Enum):
    REQUESTED = "requested"      # recorded, the cloud call may or may not have happened
    BOOTING = "booting"          # the cloud has it; not yet registered
    IDLE = "idle"                # registered, no job
    BUSY = "busy"
    DRAINING = "draining"        # being deregistered / terminated
    TERMINATED = "terminated"
    FAILED = "failed"


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.WAITING: frozenset({JobState.QUEUED, JobState.IN_PROGRESS, JobState.COMPLETED, JobState.CANCELLED, JobState.IGNORED}),
    JobState.QUEUED: frozenset({JobState.LAUNCHING, JobState.IN_PROGRESS, JobState.COMPLETED, JobState.CANCELLED, JobState.IGNORED}),
    JobState.LAUNCHING: frozenset({JobState.QUEUED, JobState.ASSIGNED, JobState.IN_PROGRESS, JobState.COMPLETED, JobState.CANCELLED}),
    JobState.ASSIGNED: frozenset({JobState.QUEUED, JobState.IN_PROGRESS, JobState.COMPLETED, JobState.CANCELLED}),
    JobState.IN_PROGRESS: frozenset({JobState.COMPLETED, JobState.CANCELLED, JobState.QUEUED}),
    # A rerun brings a finished job back with a new run attempt.
    JobState.COMPLETED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
    JobState.IGNORED: frozenset(),
}

INSTANCE_TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.REQUESTED: frozenset({InstanceState.BOOTING, InstanceState.IDLE, InstanceState.BUSY, InstanceState.DRAINING, InstanceState.TERMINATED, InstanceState.FAILED}),
    InstanceState.BOOTING: frozenset({InstanceState.IDLE, InstanceState.BUSY, InstanceState.DRAINING, InstanceState.TERMINATED, InstanceState.FAILED}),
    InstanceState.IDLE: frozenset({InstanceState.BUSY, InstanceState.DRAINING, InstanceState.TERMINATED, InstanceState.FAILED}),
    InstanceState.BUSY: frozenset({InstanceState.IDLE, InstanceState.DRAINING, InstanceState.TERMINATED, InstanceState.FAILED}),
    InstanceState.DRAINING: frozenset({InstanceState.TERMINATED, InstanceState.FAILED}),
    InstanceState.TERMINATED: frozenset(),
    InstanceState.FAILED: frozenset({InstanceState.TERMINATED}),
}

JOB_FINAL = frozenset({JobState.COMPLETED, JobState.CANCELLED, JobState.IGNORED})
INSTANCE_LIVE = frozenset({InstanceState.REQUESTED, InstanceState.BOOTING, InstanceState.IDLE, InstanceState.BUSY, InstanceState.DRAINING})
INSTANCE_GONE = frozenset({InstanceState.TERMINATED, InstanceState.FAILED})


def job_sources(target: JobState) -> frozenset[JobState]:
    """States from which `target` may be entered (for conditional UPDATEs)."""
    return frozenset(s for s, nxt in JOB_TRANSITIONS.items() if target in nxt)


def instance_sources(target: InstanceState) -> frozenset[InstanceState]:
    return frozenset(s for s, nxt in INSTANCE_TRANSITIONS.items() if target in nxt)
