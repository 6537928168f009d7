"""The store on SQLite and Postgres: migrations, schema drift, atomic claims and transitions, identity."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import inspect, select, text

from orchestrator.core.clock import FakeClock
from orchestrator.core.states import InstanceState, JobState
from orchestrator.store.models import Base, Instance, Job, Meta
from orchestrator.store.store import Store, normalize_url


@pytest.fixture
def store(any_db_url, clock):
    s = Store(any_db_url, clock)
    yield s
    s.close()


def add_job(store: Store, job_id: int, state: JobState = JobState.QUEUED, **fields) -> None:
    now = store.clock.now()
    with store.session() as s:
        s.add(Job(
            id=job_id, run_id=1000 + job_id, run_attempt=1, repository="octo-org/models", labels=["self-hosted", "gpu-t4"],
            pool="gpu-t4", state=state.value, created_at=now, updated_at=now, queued_at=now, **fields,
        ))


def add_instance(store: Store, name: str, state: InstanceState = InstanceState.BOOTING, job_id: int | None = None) -> None:
    with store.session() as s:
        s.add(Instance(
            id=name, pool="gpu-t4", cloud="sandbox", location="sandbox-1", instance_type="gpu-t4-sim", spot=True,
            price_per_hour=0.25, state=state.value, job_id=job_id, launch_key=f"key-{name}", labels=["self-hosted"],
            created_at=store.clock.now(),
        ))


def run_together(n: int, fn):
    """n threads released at the same moment by a barrier; their results in order."""
    barrier = threading.Barrier(n)

    def go(i):
        barrier.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


# --- migrations --------------------------------------------------------------------


def test_migrations_apply_at_start(store):
    tables = set(inspect(store.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == _head()


def test_migrations_are_idempotent(any_db_url, clock):
    first = Store(any_db_url, clock)
    add_job(first, 1)
    second = Store(any_db_url, clock)  # migrates again: a no-op at head
    try:
        assert second.get_job(1).state == "queued"
        with second.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        first.close()
        second.close()


def test_concurrent_first_starts_migrate_once(any_db_url, clock):
    stores = run_together(3, lambda _: Store(any_db_url, clock))
    try:
        assert len({s.orchestrator_id() for s in stores}) == 1
    finally:
        for s in stores:
            s.close()


def _head() -> str:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "orchestrator.store:migrations")
    return ScriptDirectory.from_config(cfg).get_current_head()


def test_alembic_head_matches_models(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models and migrations differ; add a migration: {diff}"


# --- atomic claims and transitions ---------------------------------------------------


def test_claim_job_has_exactly_one_winner(store):
    add_job(store, 7)
    wins = run_together(12, lambda i: store.claim_job(7, f"worker-{i}"))
    assert wins.count(True) == 1
    job = store.get_job(7)
    assert job.state == "launching" and job.claimed_by == f"worker-{wins.index(True)}"


def test_claim_job_many_jobs_many_workers(store):
    for job_id in range(1, 21):
        add_job(store, job_id)

    def worker(i):
        return [job_id for job_id in range(1, 21) if store.claim_job(job_id, f"w{i}")]

    claimed = run_together(6, worker)
    flat = sorted(j for got in claimed for j in got)
    assert flat == list(range(1, 21))  # every job claimed, none twice


def test_claim_respects_state_and_not_before(store, clock):
    add_job(store, 1, JobState.WAITING)
    assert not store.claim_job(1, "w")
    add_job(store, 2, not_before=clock.now() + timedelta(seconds=60))
    assert not store.claim_job(2, "w")
    clock.advance(61)
    assert store.claim_job(2, "w")
    assert not store.claim_job(2, "w")


def test_transition_job_is_conditional(store):
    add_job(store, 3)
    with store.session() as s:
        assert not store.transition_job(s, 3, JobState.ASSIGNED, from_states=[JobState.LAUNCHING])
    assert store.get_job(3).state == "queued"
    with store.session() as s:
        assert store.transition_job(s, 3, JobState.IN_PROGRESS, runner_name="r1")
    job = store.get_job(3)
    assert (job.state, job.runner_name) == ("in_progress", "r1")
    # The default sources are the state machine's: nothing leaves `ignored`.
    add_job(store, 4, JobState.IGNORED)
    with store.session() as s:
        assert not store.transition_job(s, 4, JobState.QUEUED)
    with store.session() as s:
        assert not store.transition_job(s, 999, JobState.QUEUED)


def test_transition_job_races_have_one_winner(store):
    add_job(store, 5, JobState.LAUNCHING)

    def finish(i):
        with store.session() as s:
            return store.transition_job(s, 5, JobState.ASSIGNED, from_states=[JobState.LAUNCHING], claimed_by=f"w{i}")

    assert run_together(8, finish).count(True) == 1


def test_transition_instance_is_conditional(store):
    add_instance(store, "vm-1", InstanceState.BOOTING)
    with store.session() as s:
        assert not store.transition_instance(s, "vm-1", InstanceState.BUSY, from_states=[InstanceState.IDLE])
    with store.session() as s:
        assert store.transition_instance(s, "vm-1", InstanceState.IDLE)
    with store.session() as s:
        assert store.transition_instance(s, "vm-1", InstanceState.TERMINATED, reason="test")
    with store.session() as s:
        assert not store.transition_instance(s, "vm-1", InstanceState.IDLE)  # terminated is final
    assert store.get_instance("vm-1").state == "terminated"


def test_session_rolls_back_on_error(store):
    with pytest.raises(RuntimeError):
        with store.session() as s:
            s.add(Meta(key="k", value="v"))
            s.flush()
            raise RuntimeError("boom")
    with store.session() as s:
        assert s.get(Meta, "k") is None


def test_deliveries_are_recorded_once(store):
    with store.session() as s:
        assert store.record_delivery(s, "g-1", "workflow_job", "queued", "accepted")
        assert not store.record_delivery(s, "g-1", "workflow_job", "queued", "accepted")
    with store.session() as s:
        fresh = store.insert_deliveries(s, {"g-1": ("workflow_job", "queued"), "g-2": ("workflow_job", "queued")}, "accepted")
    assert fresh == {"g-2"}


def test_concurrent_delivery_records_have_one_winner(store):
    def record(i):
        with store.session() as s:
            return store.record_delivery(s, "same-guid", "workflow_job", "queued", "accepted")

    assert run_together(8, record).count(True) == 1


def test_many_writers_do_not_fail(store):
    """SQLite allows one writer: threads queue rather than fail with 'database is locked'."""

    def write(i):
        for k in range(10):
            add_job(store, 10_000 + i * 100 + k)
        return True

    assert all(run_together(8, write))
    assert len(store.jobs()) == 80


# --- identity ------------------------------------------------------------------------


def test_orchestrator_id_generated_once_and_kept(any_db_url, clock):
    first = Store(any_db_url, clock)
    oid = first.orchestrator_id()
    assert oid.startswith("orch-") and oid == first.orchestrator_id()
    second = Store(any_db_url, clock)
    try:
        assert second.orchestrator_id() == oid
    finally:
        first.close()
        second.close()


def test_configured_orchestrator_id_wins_and_is_stored(store):
    generated = store.orchestrator_id()
    assert store.orchestrator_id("prod-east") == "prod-east"
    assert store.orchestrator_id() == "prod-east" != generated


def test_two_stores_racing_get_the_same_id(any_db_url, clock):
    stores = [Store(any_db_url, clock) for _ in range(2)]
    try:
        for _ in range(5):
            with stores[0].session() as s:
                s.query(Meta).filter(Meta.key == "orchestrator_id").delete()
            ids = run_together(2, lambda i: stores[i].orchestrator_id())
            assert ids[0] == ids[1], ids
            with stores[0].session() as s:
                assert s.scalars(select(Meta.value).where(Meta.key == "orchestrator_id")).all() == [ids[0]]
    finally:
        for s in stores:
            s.close()


# --- misc --------------------------------------------------------------------------------


def test_url_spellings():
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_sqlite_uses_wal(sqlite_url):
    store = Store(sqlite_url, FakeClock())
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        store.close()


def test_ping(store):
    assert store.ping()


def test_replicas_starting_together_with_a_configured_id(postgres_url):
    """Two replicas on a fresh database both write the configured id: neither may crash."""
    import threading

    from orchestrator.core.clock import FakeClock
    from orchestrator.store.store import Store

    stores = [Store(postgres_url, FakeClock()) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    results, errors = [], []

    def start(store):
        barrier.wait()
        try:
            results.append(store.orchestrator_id("orch-fixed"))
        except Exception as e:  # the bug was an IntegrityError escaping here
            errors.append(e)

    threads = [threading.Thread(target=start, args=(st,)) for st in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for st in stores:
        st.close()
    assert not errors and results == ["orch-fixed"] * 4


def test_reaper_distinct_reads_match_select_distinct(store):
    """The reaper reads pools and runner scopes by a loose index scan; it must find what DISTINCT finds."""
    from orchestrator.core.reaper import _POOLS_SEEN, _RUNNER_SCOPES

    for name, pool, scope in [("a", "gpu-t4", None), ("b", "cpu", "org:octo-org"), ("c", "gpu-t4", "repo:octo-org/models"),
                              ("d", "cpu", "org:octo-org"), ("e", "gpu-a100", None)]:
        add_instance(store, name)
        store.update_instance(name, pool=pool, runner_scope=scope)
    with store.reading() as s:
        assert set(s.execute(_POOLS_SEEN).scalars()) == {"gpu-t4", "cpu", "gpu-a100"}
        assert set(s.execute(_RUNNER_SCOPES).scalars()) == {"org:octo-org", "repo:octo-org/models"}


def test_reading_runs_while_a_writer_holds_the_lock(sqlite_url, clock):
    """A read snapshot neither takes nor waits for SQLite's write lock (WAL readers never block)."""
    store = Store(sqlite_url, clock)
    add_job(store, 1)
    writer_in, reader_done = threading.Event(), threading.Event()

    def write():
        with store.session() as s:
            store.transition_job(s, 1, JobState.LAUNCHING)
            writer_in.set()
            reader_done.wait(10)

    t = threading.Thread(target=write)
    t.start()
    try:
        assert writer_in.wait(10)
        with store.reading() as s:
            assert s.get(Job, 1).state == JobState.QUEUED.value  # the writer has not committed
        reader_done.set()
        t.join(10)
        assert store.get_job(1).state == JobState.LAUNCHING.value
    finally:
        reader_done.set()
        t.join(10)
        store.close()


def test_runner_config_is_kept_only_for_a_live_vm(store):
    """A runner registered for a VM that ended meanwhile leaves no config behind (the reaper deletes the ghost)."""
    add_instance(store, "live")
    add_instance(store, "ended", InstanceState.TERMINATED)
    assert store.set_runner("live", 7, "encoded-jit")
    assert not store.set_runner("ended", 8, "encoded-jit")
    assert (store.get_instance("live").runner_id, store.get_instance("live").jit_config) == (7, "encoded-jit")
    assert (store.get_instance("ended").runner_id, store.get_instance("ended").jit_config) == (None, None)
