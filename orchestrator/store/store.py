"""The state store: engine setup, migrations at start, and atomic transitions.

Every claim is a conditional UPDATE (`... WHERE state IN (...)`) whose row
count says who won, so two workers or two replicas never both act.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import zlib
from typing import Any, Iterable, Iterator

from sqlalchemy import bindparam, create_engine, event, func, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.core.clock import Clock
from orchestrator.core.states import (
    INSTANCE_LIVE,
    InstanceState,
    JobState,
    instance_sources,
    job_sources,
)
from orchestrator.store.models import Delivery, Event, Instance, Job, Meta, PoolState


def normalize_url(url: str) -> str:
    """Accept the common spellings of a Postgres URL and use the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


READ_ONLY = "orchestrator_read_only"


def _make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):  # pragma: no cover - driver hook
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            if ":memory:" not in url:
                _set_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # pragma: no cover - driver hook
            # IMMEDIATE takes the write lock up front: no deadlock when a reader upgrades.
            # A read-only snapshot (Store.reading) needs no lock: WAL readers never block the writer.
            # Straight to the driver: this runs for every transaction, and needs no result handling.
            conn.connection.driver_connection.execute("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _set_wal(cur) -> None:
    """Switching a new file to WAL needs it to itself, and SQLite answers 'locked' at once rather
    than waiting; the mode is kept in the file, so whoever wins, everyone then finds it set."""
    import sqlite3
    import time

    for attempt in range(100):
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 99:
                raise
            time.sleep(0.02)


def migrate(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "orchestrator.store:migrations")
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Two replicas starting at once must not both migrate.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key("migrate")})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _dialect_insert(dialect: str):
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _hot_statements(dialect: str) -> dict[str, Any]:
    """Statements run for every delivery, job or VM, built once so SQLAlchemy's compiled cache serves every call."""
    jobs, deliveries, instances = Job.__table__, Delivery.__table__, Instance.__table__
    out: dict[str, Any] = {
        "launchable_jobs": select(Job)
        .where(Job.state == JobState.QUEUED.value, Job.pool.is_not(None))
        .where(Job.not_before.is_(None) | (Job.not_before <= bindparam("now")))
        .order_by(Job.queued_at, Job.id)
        .limit(bindparam("limit")),
        "paused_pools": select(PoolState.name).where(PoolState.paused.is_(True)),
        "count_live": select(func.count())
        .select_from(instances)
        .where(instances.c.pool == bindparam("pool"), instances.c.state.in_([st.value for st in INSTANCE_LIVE])),
        "instance_for_job": select(Instance)
        .where(Instance.job_id == bindparam("job_id"), Instance.state.in_([st.value for st in INSTANCE_LIVE]))
        .order_by(Instance.created_at.desc()),
        "awaiting_jit": select(instances.c.id)
        .where(
            instances.c.state.in_([InstanceState.REQUESTED.value, InstanceState.BOOTING.value]),
            instances.c.runner_id.is_(None),
            instances.c.bootstrap_used.is_(False),
            instances.c.instance_id.is_not(None),
        )
        .order_by(instances.c.created_at, instances.c.id),
        "claim_job": update(jobs)
        .where(jobs.c.id == bindparam("job_id"), jobs.c.state == JobState.QUEUED.value)
        .where(jobs.c.not_before.is_(None) | (jobs.c.not_before <= bindparam("now")))
        .values(state=JobState.LAUNCHING.value, claimed_by=bindparam("claimer"), updated_at=bindparam("now")),
        "job_ids": select(jobs.c.id).where(jobs.c.id.in_(bindparam("ids", expanding=True))),
        "job_insert": jobs.insert(),
        "event_insert": Event.__table__.insert(),
        "on_demand_runs": select(jobs.c.run_id)
        .where(jobs.c.run_id.in_(bindparam("ids", expanding=True)), jobs.c.on_demand_only.is_(True))
        .distinct(),
    }
    if dialect in ("sqlite", "postgresql"):
        out["delivery_insert"] = (
            _dialect_insert(dialect)(deliveries).on_conflict_do_nothing(index_elements=["guid"]).returning(deliveries.c.guid)
        )
    return out


def _lock_key(name: str) -> int:
    return zlib.crc32(f"orchestrator:{name}".encode())


class Store:
    def __init__(self, url: str, clock: Clock, *, run_migrations: bool = True):
        self.url = normalize_url(url)
        self.clock = clock
        self.engine = _make_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Postgres gives each statement its own snapshot unless asked for one per transaction.
        snapshot = {"isolation_level": "REPEATABLE READ"} if self.engine.dialect.name == "postgresql" else {}
        self._read_sessions = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}, **snapshot), expire_on_commit=False)
        # Every SQLite transaction takes the write lock (BEGIN IMMEDIATE), and SQLite's busy
        # handler waits by sleeping in growing steps: threads queue here instead, in order.
        self._write_lock = threading.RLock() if self.engine.dialect.name == "sqlite" else None
        self._stmts = _hot_statements(self.engine.dialect.name)
        self._updates: dict[tuple, Any] = {}
        if run_migrations:
            migrate(self.engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        if self._write_lock is None:
            with self._sessions() as s, s.begin():
                yield s
            return
        # Bounded, so a stuck holder degrades to SQLite's own busy timeout, never a hang.
        locked = self._write_lock.acquire(timeout=30)
        try:
            with self._sessions() as s, s.begin():
                yield s
        finally:
            if locked:
                self._write_lock.release()

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """One consistent snapshot for reads only; on SQLite it neither takes nor waits for the write lock."""
        with self._read_sessions() as s, s.begin():
            yield s

    @contextlib.contextmanager
    def _reading(self, s: Session | None) -> Iterator[Session]:
        """The caller's transaction when it has one, else a snapshot of our own."""
        if s is not None:
            yield s
            return
        with self.reading() as s:
            yield s

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    # --- identity ----------------------------------------------------------

    def orchestrator_id(self, configured: str | None = None) -> str:
        """The id every tag and runner name carries: from config, or generated once and kept."""
        if configured:
            for _ in range(2):  # a replica starting at the same moment may insert first
                try:
                    with self.session() as s:
                        row = s.get(Meta, "orchestrator_id")
                        if row is None:
                            s.add(Meta(key="orchestrator_id", value=configured))
                        elif row.value != configured:
                            row.value = configured
                    break
                except IntegrityError:
                    continue
            return configured
        with self.session() as s:
            row = s.get(Meta, "orchestrator_id")
            if row is not None:
                return row.value
        candidate = "orch-" + secrets.token_hex(3)
        try:
            with self.session() as s:
                s.add(Meta(key="orchestrator_id", value=candidate))
        except IntegrityError:
            pass  # another replica won the race; use its id
        with self.session() as s:
            return s.get(Meta, "orchestrator_id").value

    # --- deliveries --------------------------------------------------------
    # The webhook path's statements run on the session's connection: plain rows need no ORM.

    def record_delivery(self, s: Session, guid: str, event_name: str, action: str | None, result: str) -> bool:
        """False when this delivery id was seen before (GitHub redelivers).

        One INSERT ... ON CONFLICT DO NOTHING: no savepoint, and on Postgres a concurrent
        insert of the same id waits for the first and then reports the conflict.
        """
        values = dict(guid=guid, event=event_name, action=action, received_at=self.clock.now(), result=result)
        if "delivery_insert" in self._stmts:
            return s.execute(self._stmts["delivery_insert"], values).first() is not None
        try:
            with s.begin_nested():
                s.add(Delivery(**values))
                s.flush()
        except IntegrityError:
            return False
        return True

    def insert_deliveries(self, s: Session, deliveries: dict[str, tuple[str, str | None]], result: str) -> set[str]:
        """Record many delivery ids ({guid: (event, action)}) in one statement; returns the new ones."""
        if self.dialect not in ("sqlite", "postgresql"):
            return {g for g, (ev, action) in deliveries.items() if self.record_delivery(s, g, ev, action, result)}
        now = self.clock.now()
        rows = [dict(guid=g, event=ev, action=action, received_at=now, result=result) for g, (ev, action) in deliveries.items()]
        # executemany with RETURNING: SQLAlchemy sends it as one multi-row INSERT, compiled once.
        return set(s.connection().execute(self._stmts["delivery_insert"], rows).scalars())

    # --- jobs --------------------------------------------------------------

    def existing_job_ids(self, s: Session, ids: Iterable[int]) -> set[int]:
        return set(s.connection().execute(self._stmts["job_ids"], {"ids": list(ids)}).scalars())

    def insert_jobs(self, s: Session, rows: list[dict[str, Any]]) -> None:
        """New job rows (every row with the same keys) in one executemany; the ORM is not involved."""
        s.connection().execute(self._stmts["job_insert"], rows)

    def on_demand_runs(self, s: Session, run_ids: Iterable[int]) -> set[int]:
        """Runs with a job marked on-demand only (a spot interruption happened in the run)."""
        ids = [r for r in run_ids if r]
        if not ids:
            return set()
        return set(s.connection().execute(self._stmts["on_demand_runs"], {"ids": ids}).scalars())

    def transition_job(
        self,
        s: Session,
        job_id: int,
        to: JobState,
        *,
        from_states: Iterable[JobState] | None = None,
        **fields: Any,
    ) -> bool:
        sources = tuple(st.value for st in (from_states if from_states is not None else job_sources(to)))
        return self._conditional_update(s, Job.__table__, job_id, sources, {"state": to.value, "updated_at": self.clock.now(), **fields})

    def claim_job(self, job_id: int, claimer: str) -> bool:
        """queued -> launching, once: the winner launches, everyone else moves on."""
        with self.session() as s:
            params = {"job_id": job_id, "now": self.clock.now(), "claimer": claimer}
            return s.connection().execute(self._stmts["claim_job"], params).rowcount == 1

    def update_job(self, job_id: int, **fields: Any) -> None:
        with self.session() as s:
            self._conditional_update(s, Job.__table__, job_id, None, {"updated_at": self.clock.now(), **fields})

    def _conditional_update(self, s: Session, table, row_id: Any, sources: tuple[str, ...] | None, values: dict[str, Any]) -> bool:
        """UPDATE table SET values WHERE id = row_id [AND state IN sources]; True if the row changed.

        A Core statement, kept per shape: transitions run for every job and VM, and building an
        ORM statement each time costs several times what SQLite takes to run it. Pending ORM
        changes are flushed first, as the ORM's own UPDATE would. Objects already loaded in the
        session are not refreshed: read the row again after a transition rather than trust them.
        """
        key = (table.name, sources, tuple(values))
        stmt = self._updates.get(key)
        if stmt is None:
            stmt = update(table).where(table.c.id == bindparam("row_id"))
            if sources is not None:
                stmt = stmt.where(table.c.state.in_(sources))
            stmt = self._updates[key] = stmt.values({name: bindparam("new_" + name) for name in values})
        s.flush()
        params = {"new_" + name: value for name, value in values.items()}
        params["row_id"] = row_id
        return s.connection().execute(stmt, params).rowcount == 1

    def get_job(self, job_id: int) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def jobs(self, states: Iterable[JobState] | None = None, limit: int | None = None) -> list[Job]:
        with self.session() as s:
            q = select(Job).order_by(Job.created_at, Job.id)
            if states is not None:
                q = q.where(Job.state.in_([st.value for st in states]))
            if limit:
                q = q.limit(limit)
            return list(s.scalars(q))

    def launchable_jobs(self, limit: int = 100, s: Session | None = None) -> list[Job]:
        with self._reading(s) as s:
            return list(s.scalars(self._stmts["launchable_jobs"], {"now": self.clock.now(), "limit": limit}))

    def count_jobs_by_state(self) -> dict[str, int]:
        with self.session() as s:
            return dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())

    def count_instances_by_state_and_pool(self) -> list[tuple[str, str, int]]:
        with self.session() as s:
            return [tuple(r) for r in s.execute(select(Instance.state, Instance.pool, func.count()).group_by(Instance.state, Instance.pool))]

    # --- instances ---------------------------------------------------------

    def add_instance(self, inst: Instance) -> None:
        with self.session() as s:
            s.add(inst)

    def transition_instance(
        self,
        s: Session,
        name: str,
        to: InstanceState,
        *,
        from_states: Iterable[InstanceState] | None = None,
        **fields: Any,
    ) -> bool:
        sources = tuple(st.value for st in (from_states if from_states is not None else instance_sources(to)))
        return self._conditional_update(s, Instance.__table__, name, sources, {"state": to.value, **fields})

    def update_instance(self, name: str, **fields: Any) -> None:
        with self.session() as s:
            self._conditional_update(s, Instance.__table__, name, None, fields)

    def set_runner(self, name: str, runner_id: int, jit_config: str | None) -> bool:
        """The runner GitHub registered for a VM; False, and nothing kept, if the VM ended meanwhile
        (its registration is then a ghost the reaper deletes)."""
        with self.session() as s:
            live = tuple(st.value for st in INSTANCE_LIVE)
            return self._conditional_update(s, Instance.__table__, name, live, {"runner_id": runner_id, "jit_config": jit_config})

    def get_instance(self, name: str) -> Instance | None:
        with self.session() as s:
            return s.get(Instance, name)

    def instance_by_bootstrap_hash(self, token_hash: str) -> Instance | None:
        with self.session() as s:
            return s.scalars(select(Instance).where(Instance.bootstrap_token_hash == token_hash)).first()

    def instances(self, states: Iterable[InstanceState] | None = None, pool: str | None = None) -> list[Instance]:
        with self.session() as s:
            q = select(Instance).order_by(Instance.created_at, Instance.id)
            if states is not None:
                q = q.where(Instance.state.in_([st.value for st in states]))
            if pool is not None:
                q = q.where(Instance.pool == pool)
            return list(s.scalars(q))

    def live_instances(self, pool: str | None = None) -> list[Instance]:
        return self.instances(INSTANCE_LIVE, pool)

    def count_live(self, s: Session, pool: str) -> int:
        return s.connection().execute(self._stmts["count_live"], {"pool": pool}).scalar_one()

    def instance_for_job(self, s: Session, job_id: int) -> Instance | None:
        return s.scalars(self._stmts["instance_for_job"], {"job_id": job_id}).first()

    # --- events ------------------------------------------------------------

    def add_event(self, s: Session, kind: str, *, instance_id: str | None = None, job_id: int | None = None, **detail: Any) -> None:
        """Written at once, in the caller's transaction: a Core INSERT spares the ORM's unit of work."""
        values = {"instance_id": instance_id, "job_id": job_id, "kind": kind, "at": self.clock.now(), "detail": detail}
        s.connection().execute(self._stmts["event_insert"], values)

    def events(self, instance_id: str | None = None, kind: str | None = None) -> list[Event]:
        with self.session() as s:
            q = select(Event).order_by(Event.id)
            if instance_id is not None:
                q = q.where(Event.instance_id == instance_id)
            if kind is not None:
                q = q.where(Event.kind == kind)
            return list(s.scalars(q))

    # --- pools -------------------------------------------------------------

    def paused_pools(self, s: Session | None = None) -> set[str]:
        with self._reading(s) as s:
            return set(s.scalars(self._stmts["paused_pools"]))

    def instances_awaiting_jit(self, s: Session | None = None) -> list[str]:
        """Launched VMs whose runner config was never made (GitHub failed right after the launch)."""
        with self._reading(s) as s:
            return list(s.scalars(self._stmts["awaiting_jit"]))

    def set_paused(self, pool: str, paused: bool) -> None:
        with self.session() as s:
            row = s.get(PoolState, pool)
            if row is None:
                s.add(PoolState(name=pool, paused=paused, updated_at=self.clock.now()))
            else:
                row.paused = paused
                row.updated_at = self.clock.now()

    # --- leader election ---------------------------------------------------

    @contextlib.contextmanager
    def try_lock(self, name: str) -> Iterator[bool]:
        """A session-level Postgres advisory lock; SQLite has one process, so it always wins."""
        if self.dialect != "postgresql":
            yield True
            return
        with self.engine.connect() as conn:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _lock_key(name)}).scalar()
            conn.commit()
            try:
                yield bool(got)
            finally:
                if got:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(name)})
                    conn.commit()

    def xact_lock(self, s: Session, name: str) -> None:
        """Serialize a transaction against others taking the same lock (budget checks)."""
        if self.dialect == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(name)})

