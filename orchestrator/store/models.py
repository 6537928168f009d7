"""Tables. The Alembic migrations in store/migrations are the source of truth for
the schema; these mappings must match them (a test compares the two)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON, list[str]: JSON}


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Delivery(Base):
    __tablename__ = "deliveries"
    guid: Mapped[str] = mapped_column(String(100), primary_key=True)
    event: Mapped[str] = mapped_column(String(64))
    action: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime]
    result: Mapped[str] = mapped_column(String(64))


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    run_id: Mapped[int] = mapped_column(BigInteger)
    run_attempt: Mapped[int] = mapped_column(Integer, default=1)
    repository: Mapped[str] = mapped_column(String(200))
    labels: Mapped[list[str]]
    pool: Mapped[str | None] = mapped_column(String(64))
    unique_label: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(String(200))
    conclusion: Mapped[str | None] = mapped_column(String(32))
    runner_name: Mapped[str | None] = mapped_column(String(200))
    installation_id: Mapped[int | None] = mapped_column(BigInteger)
    private: Mapped[bool] = mapped_column(Boolean, default=True)
    launch_attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None]
    on_demand_only: Mapped[bool] = mapped_column(Boolean, default=False)
    source: Mapped[str] = mapped_column(String(16), default="webhook")
    created_at: Mapped[datetime]
    queued_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    launched_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(64))

    # Finished jobs by conclusion and time: the reaper's look at recent failures.
    __table_args__ = (Index("ix_jobs_state", "state"), Index("ix_jobs_run", "run_id"), Index("ix_jobs_finished", "state", "conclusion", "completed_at"))


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # VM name == runner name
    pool: Mapped[str] = mapped_column(String(64))
    cloud: Mapped[str] = mapped_column(String(16))
    location: Mapped[str] = mapped_column(String(64))
    instance_type: Mapped[str] = mapped_column(String(64))
    spot: Mapped[bool] = mapped_column(Boolean)
    candidate_index: Mapped[int] = mapped_column(Integer, default=0)
    price_per_hour: Mapped[float] = mapped_column(Float)
    min_billing_s: Mapped[int] = mapped_column(Integer, default=60)
    instance_id: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(20))
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    launch_key: Mapped[str] = mapped_column(String(128), unique=True)
    labels: Mapped[list[str]]
    runner_scope: Mapped[str | None] = mapped_column(String(200))
    runner_id: Mapped[int | None] = mapped_column(BigInteger)
    installation_id: Mapped[int | None] = mapped_column(BigInteger)
    warm: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]
    launched_at: Mapped[datetime | None]
    bootstrapped_at: Mapped[datetime | None]
    idle_since: Mapped[datetime | None]
    busy_since: Mapped[datetime | None]
    last_event_at: Mapped[datetime | None]
    terminated_at: Mapped[datetime | None]
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    bootstrap_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    bootstrap_expires_at: Mapped[datetime | None]
    bootstrap_used: Mapped[bool] = mapped_column(Boolean, default=False)
    instance_token_hash: Mapped[str | None] = mapped_column(String(64))
    jit_config: Mapped[str | None] = mapped_column(Text)  # cleared once served to the VM
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False)
    idle_checks: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        Index("ix_instances_state", "state"),
        Index("ix_instances_job", "job_id"),
        Index("ix_instances_pool_state", "pool", "state"),
        Index("ix_instances_scope", "runner_scope"),
    )

    @property
    def labels_unique(self) -> bool:
        """Registered with a NAME--SUFFIX label: only its own job can ever take it."""
        return any("--" in label for label in self.labels or [])


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime]
    detail: Mapped[dict[str, Any]]

    __table_args__ = (Index("ix_events_instance", "instance_id", "kind"),)  # a VM's history, without scanning everyone's


class PoolState(Base):
    __tablename__ = "pool_state"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime]


class BudgetSetting(Base):
    """Admin API changes to a budget; they win over the YAML until cleared."""

    __tablename__ = "budget_settings"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    limit_usd: Mapped[float | None] = mapped_column(Float)
    alert_at: Mapped[list[str] | None]
    on_exceed: Mapped[str | None] = mapped_column(String(16))
    updated_at: Mapped[datetime]


class Reservation(Base):
    """price x max_lifetime held against one budget for one VM, settled to actual cost at its end."""

    __tablename__ = "reservations"
    instance_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    budget: Mapped[str] = mapped_column(String(100), primary_key=True)
    amount_usd: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]
    settled_at: Mapped[datetime | None]
    cost_usd: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index("ix_reservations_budget", "budget", "settled_at"),
        Index("ix_reservations_ledger", "budget", "settled_at", "cost_usd"),  # the ledger sums read the index alone
        Index("ix_reservations_open", "settled_at", "instance_id"),
    )


class AlertSent(Base):
    __tablename__ = "budget_alerts"
    budget: Mapped[str] = mapped_column(String(100), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    threshold: Mapped[float] = mapped_column(Float, primary_key=True)
    sent_at: Mapped[datetime]
