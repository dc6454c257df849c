"""The scheduler's state store, on each backend: SQLite and PostgreSQL.

Every test that takes the ``store`` or ``new_store`` fixture runs twice, once
per backend (PostgreSQL: a database of its own on the session's server, see
``tests/conftest.py``); the tests of one backend's own machinery name it.
"""

from __future__ import annotations

import threading
import time

import pytest

from jobgate.errors import SchedulerUnavailable
from scheduler.store import Busy, SqliteStore, open_store
from scheduler.store import sqlite as sqlite_backend


@pytest.fixture(params=["sqlite", "postgres"])
def new_store(request, tmp_path):
    """Makes initialised stores of one backend, each on a new database."""
    made = []
    if request.param == "sqlite":

        def make(**kw):
            store = SqliteStore(tmp_path / f"state-{len(made)}.db", **kw)
            made.append(store)
            store.initialize()
            return store

    else:
        from scheduler.store.postgres import PostgresStore

        server = request.getfixturevalue("postgres")

        def make(**kw):
            store = PostgresStore(server.create_database(), **kw)
            made.append(store)
            store.initialize()
            return store

    yield make
    for store in made:
        store.close()
    if request.param == "postgres":
        for store in made:
            server.drop_database(store.url.rsplit("/", 1)[1])


@pytest.fixture
def store(new_store):
    return new_store()


@pytest.fixture
def index(store):
    """A store with two workers; returns it and their ids."""
    ids = [
        store.register_worker(name, "127.0.0.1:1", {}, 1, "test").id
        for name in ("a", "b")
    ]
    return store, ids


def status(job_id: str, worker_id: str, state: str, output_bytes: int = 0) -> dict:
    return {
        "job_id": job_id,
        "worker_id": worker_id,
        "state": state,
        "exit_code": None if state == "running" else 0,
        "output_bytes": output_bytes,
    }


def set_last_seen(store, worker_id: str, t: float) -> None:
    """Make a worker's last heartbeat older than a heartbeat can (the store
    never moves it back)."""
    param = ":{}" if isinstance(store, SqliteStore) else "%({})s"
    store._run(
        f"UPDATE workers SET last_seen_at = {param.format('t')} "
        f"WHERE id = {param.format('id')}",
        {"t": t, "id": worker_id},
    )


def test_a_running_job_has_no_ended_status(index):
    store, (a, _) = index
    store.record_job(status("j1", a, "running"))
    store.update_job(status("j1", a, "running", 10))
    assert store.ended_job(a, "j1") is None
    assert store.ended_job(a, "unknown") is None


def test_the_ended_status_is_kept_and_answered_for_its_worker_only(index):
    store, (a, b) = index
    store.record_job(status("j1", a, "running"))
    final = status("j1", a, "succeeded", 42)
    store.update_job(final)
    assert store.ended_job(a, "j1") == final
    assert store.ended_job(b, "j1") is None
    # A status seen earlier but written later does not bring the job back.
    store.update_job(status("j1", a, "running", 10))
    assert store.ended_job(a, "j1") == final
    assert store.worker_jobs(a)[0]["state"] == "succeeded"


def test_a_job_that_had_ended_when_it_was_recorded(index):
    store, (a, _) = index
    final = status("j2", a, "failed")
    store.record_job(final)
    assert store.ended_job(a, "j2") == final


def test_a_write_without_waiting_is_refused_at_once_while_another_writes(tmp_path):
    import sqlite3

    store = SqliteStore(tmp_path / "state.db")
    store.initialize()
    a = store.register_worker("a", "127.0.0.1:1", {}, 1, "test").id
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's write under way
    try:
        started = time.monotonic()
        with pytest.raises(Busy):
            store.without_waiting(store.record_job, status("j1", a, "running"))
        assert time.monotonic() - started < 1  # busy_timeout_s is 5 s here
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.worker_jobs(a) == []  # nothing was written
    store.without_waiting(store.record_job, status("j1", a, "running"))
    assert [j["job_id"] for j in store.worker_jobs(a)] == ["j1"]
    # The connection waits for locks again afterwards.
    timeout = store._conn().execute("PRAGMA busy_timeout").fetchone()[0]
    assert timeout == 5000


def test_a_database_locked_past_the_busy_timeout_is_a_503(tmp_path):
    import sqlite3

    store = SqliteStore(tmp_path / "state.db", busy_timeout_s=0.1)
    store.initialize()
    a = store.register_worker("a", "127.0.0.1:1", {}, 1, "test").id
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(SchedulerUnavailable, match="cannot be used now") as exc:
            store.record_job(status("j1", a, "running"))
        assert exc.value.retry_after_s == 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.record_job(status("j1", a, "running"))  # and fine again
    assert store.worker_jobs(a)[0]["job_id"] == "j1"


def test_a_worker_gets_back_its_id_from_a_scheduler_that_lost_its_state(new_store):
    first = new_store()
    had = first.register_worker("w1", "127.0.0.1:1", {}, 1, "test").id
    other = first.register_worker("w2", "127.0.0.1:2", {}, 1, "test").id

    lost = new_store()  # the state database started anew
    assert (
        lost.register_worker(
            "w1", "127.0.0.1:1", {}, 1, "test", previous_id=had.upper()
        ).id
        == had
    )
    # An id another worker has, or one that is not an id, is not taken.
    assert lost.register_worker(
        "w3", "127.0.0.1:3", {}, 1, "test", previous_id=had
    ).id not in (had, other)
    assert (
        lost.register_worker("w4", "127.0.0.1:4", {}, 1, "test", previous_id="../w1").id
        != "../w1"
    )
    # A name the database knows keeps the id on record, whatever it says.
    assert (
        first.register_worker("w1", "127.0.0.1:1", {}, 1, "test", previous_id=other).id
        == had
    )


def test_a_workers_drain_is_kept_from_registration_heartbeats_and_drain_answers(
    index,
):
    store, (a, _) = index
    assert store.get_worker(a).draining is False
    store.set_drain(a, True, "draining: asked by token ops at T", 2)
    row = store.get_worker(a)
    assert (row.draining, row.degraded, row.running_jobs) == (
        True,
        "draining: asked by token ops at T",
        2,
    )
    t0 = time.time()
    store.heartbeats(
        {a: (t0 + 300, 1, 15.0, "draining: asked by token ops at T", True)}
    )
    assert store.get_worker(a).draining is True
    # Gone, it is still known drained; back drained, it says so at registration.
    store.deregister(a)
    assert store.get_worker(a).draining is True
    store.register_worker(
        "a", "127.0.0.1:1", {}, 1, "test", degraded="draining: x", draining=True
    )
    row = store.get_worker(a)
    assert (row.state, row.draining, row.degraded) == ("online", True, "draining: x")
    store.heartbeats({a: (t0 + 400, 0, 15.0, "", False)})
    assert (store.get_worker(a).draining, store.get_worker(a).degraded) == (False, "")


def test_a_heartbeat_received_before_a_drain_answer_does_not_undo_it(index):
    # Heartbeats are buffered and written later; a drain answer at once.
    store, (a, _) = index
    before = time.time()
    time.sleep(0.01)
    store.set_drain(a, True, "draining: asked by token ops at T", 0)
    store.heartbeats({a: (before, 0, 15.0, "", False)})
    row = store.get_worker(a)
    assert (row.draining, row.degraded, row.last_seen_at) == (
        True,
        "draining: asked by token ops at T",
        before,
    )
    # A heartbeat received after the answer is the worker's word again.
    store.heartbeats({a: (time.time() + 1, 0, 15.0, "", False)})
    assert (store.get_worker(a).draining, store.get_worker(a).degraded) == (False, "")


def test_a_database_of_schema_3_gets_the_draining_column(tmp_path):
    import sqlite3

    store_module = sqlite_backend
    column = (
        ",\n    -- 1 while the worker is drained, as it last said (kept when it "
        "goes away)\n    draining      INTEGER NOT NULL DEFAULT 0"
    )
    assert column in store_module.SCHEMA
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(store_module.SCHEMA.replace(column, ""))
    conn.execute(
        "INSERT INTO workers (id, name, address, state, registered_at, last_seen_at) "
        "VALUES ('w-1', 'a', '127.0.0.1:1', 'online', 1.0, 1.0)"
    )
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    store.initialize()
    [row] = store.list_workers()
    assert (row.name, row.draining) == ("a", False)


# -- every backend alike -----------------------------------------------------------


def test_a_registered_worker_reads_back_as_it_registered(store):
    before = time.time()
    row = store.register_worker(
        "w1",
        "10.0.0.1:7444",
        {"zone": "b", "rack": "1"},
        8,
        "1.2.3",
        heartbeat_timeout_s=45.0,
        enforceable_limits=["tasks", "memory_mb"],
        degraded="disk full",
    )
    assert (row.name, row.address, row.labels, row.capacity, row.version) == (
        "w1",
        "10.0.0.1:7444",
        {"rack": "1", "zone": "b"},
        8,
        "1.2.3",
    )
    assert (row.state, row.running_jobs, row.heartbeat_timeout_s) == ("online", 0, 45.0)
    assert (row.enforceable_limits, row.degraded, row.draining) == (
        ("memory_mb", "tasks"),
        "disk full",
        False,
    )
    # Times keep their fraction of a second (a float of 4 bytes would not).
    assert before <= row.registered_at == row.last_seen_at <= time.time()
    assert store.get_worker(row.id) == row
    assert store.list_workers() == [row]


def test_a_worker_is_found_by_its_id_before_another_by_that_name(store):
    a = store.register_worker("a", "127.0.0.1:1", {}, 1, "test")
    # A name that is another worker's id (the servicer refuses such names;
    # the store still answers the id first).
    b = store.register_worker(a.id, "127.0.0.1:2", {}, 1, "test")
    assert store.find_worker(a.id).id == a.id
    assert store.find_worker("a").id == a.id
    assert store.find_worker(b.id).name == a.id
    assert store.find_worker("nobody") is None
    assert store.get_worker("nobody") is None
    assert [w.name for w in store.list_workers()] == sorted(["a", a.id])


def test_heartbeats_count_for_online_workers_only(index):
    store, (a, b) = index
    assert store.heartbeat(a, 3) is True
    assert store.get_worker(a).running_jobs == 3
    store.deregister(a)
    row = store.get_worker(a)
    assert (row.state, row.running_jobs) == ("offline", 0)
    assert store.heartbeat(a, 1) is False
    assert store.heartbeat("unknown", 1) is False
    # The beat of a worker that is offline changes nothing, and says so.
    t0 = time.time()
    gone = store.heartbeats({a: (t0 + 5, 2, 15.0), b: (t0 + 6, 4, 30.0, "why", False)})
    assert gone == {a}
    assert store.get_worker(a).last_seen_at != t0 + 5  # offline: not written
    row = store.get_worker(b)
    assert (row.last_seen_at, row.running_jobs, row.heartbeat_timeout_s) == (
        t0 + 6,
        4,
        30.0,
    )
    assert row.degraded == "why"
    # A beat older than the last (written late by a scheduler the worker has
    # left) changes nothing, and the worker is not taken for gone.
    assert store.heartbeats({b: (t0 + 5.5, 9, 30.0)}) == set()
    assert (store.get_worker(b).last_seen_at, store.get_worker(b).running_jobs) == (
        t0 + 6,
        4,
    )
    # Registering again brings it back online, with the same id.
    assert store.register_worker("a", "127.0.0.1:9", {}, 1, "test").id == a
    assert store.get_worker(a).state == "online"


def test_the_workers_heard_from_are_counted_within_their_timeouts(store):
    now = time.time()
    ids = [store.register_worker(n, "127.0.0.1:1", {}, 1, "t").id for n in "abcd"]
    store.heartbeats({ids[2]: (time.time(), 0, 60.0)})  # a longer timeout
    set_last_seen(store, ids[0], now - 1.0)  # heard from lately
    set_last_seen(store, ids[1], now - 20.0)  # silent past its timeout
    set_last_seen(store, ids[2], now - 20.0)  # within its own timeout
    store.deregister(ids[3])  # offline: never counted
    assert store.heard_from(now, 15.0) == 2
    assert store.heard_from(now, 30.0) == 3  # the configured timeout if longer


def test_the_job_index_lists_a_workers_jobs_newest_first(index):
    store, (a, b) = index
    for n in range(5):
        store.record_job(status(f"j{n}", a, "running"))
    store.record_job(status("k", b, "failed"))
    store.update_job(status("j1", a, "succeeded", 7))
    store.record_job(status("j0", a, "failed"))  # known already: kept as it was
    jobs = store.worker_jobs(a)
    assert [j["job_id"] for j in jobs] == ["j4", "j3", "j2", "j1", "j0"]
    assert [j["job_id"] for j in store.worker_jobs(a, limit=2)] == ["j4", "j3"]
    assert jobs[3]["state"] == "succeeded" and jobs[3]["output_bytes"] == 7
    assert jobs[4]["state"] == "running"
    assert all(j["recorded_at"].endswith("Z") for j in jobs)
    assert store.job_counts() == {"running": 4, "succeeded": 1, "failed": 1}


def test_a_group_keeps_its_request_errors_and_jobs(index):
    store, (a, b) = index
    assert store.get_group("g-unknown") is None
    request = {"selector": {"all": True}, "command": "bash", "path": "x.sh"}
    store.create_group("g1", request, [])
    store.record_job(status("j1", a, "running"), "g1")
    store.record_job(status("j2", b, "running"), "g1")
    store.record_job(status("j3", b, "running"))
    errors = [{"worker_id": "w9", "error": {"status": 503}}]
    store.set_group_errors("g1", errors)
    got_request, got_errors, jobs = store.get_group("g1")
    assert got_request.pop("created_at") <= time.time()
    assert got_request == request
    assert got_errors == errors
    assert [j["job_id"] for j in jobs] == ["j1", "j2"]


def test_a_second_start_changes_nothing(store):
    row = store.register_worker("a", "127.0.0.1:1", {"x": "y"}, 1, "test")
    store.initialize()
    assert store.list_workers() == [row]


def test_a_write_without_waiting_runs_when_nothing_else_writes(index):
    store, (a, _) = index
    store.without_waiting(store.record_job, status("j1", a, "running"))
    assert [j["job_id"] for j in store.worker_jobs(a)] == ["j1"]
    assert store.writable() is True
    assert store.healthy() is True


def _write_schema_version(store, version: int) -> None:
    if isinstance(store, SqliteStore):
        import sqlite3

        with sqlite3.connect(store.path) as conn:
            conn.execute(f"PRAGMA user_version = {version}")
    else:
        import psycopg

        with psycopg.connect(store.url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO schema_migrations (version) VALUES (%s)", (version,)
            )


def test_a_database_of_a_newer_jobgate_is_refused(store):
    store.register_worker("a", "127.0.0.1:1", {}, 1, "test")
    _write_schema_version(store, 99)
    with pytest.raises(OSError) as exc:
        store.initialize()
    assert str(exc.value).startswith(f"{store.location} was written by a newer ")
    assert "(schema 99, this one knows " in str(exc.value)
    assert str(exc.value).endswith("); upgrade this scheduler")
    # Nothing was changed by the refusal.
    assert [w.name for w in store.list_workers()] == ["a"]


def test_the_store_of_an_sqlite_config_is_sqlite(tmp_path):
    from scheduler.config import StateSection

    store = open_store(StateSection(path=tmp_path / "s.db"))
    assert isinstance(store, SqliteStore)
    assert store.location == str(tmp_path / "s.db")


def test_two_sqlite_stores_starting_at_once_migrate_once(tmp_path):
    # The second waits for the first's transaction, then finds nothing to do.
    stores = [SqliteStore(tmp_path / "state.db") for _ in range(4)]
    errors = []
    barrier = threading.Barrier(len(stores))

    def start(s):
        barrier.wait()
        try:
            s.initialize()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    version = stores[0]._conn().execute("PRAGMA user_version").fetchone()[0]
    assert version == sqlite_backend.SCHEMA_VERSION


def test_a_worker_and_its_jobs_ended_status_are_read_together(index):
    store, (a, b) = index
    store.record_job(status("j1", a, "running"))
    store.record_job(status("j2", a, "failed"))
    worker_a = store.get_worker(a)
    assert store.find_worker_and_ended_job("a", "j1") == (worker_a, None)
    assert store.find_worker_and_ended_job(a, "j2") == (
        worker_a,
        status("j2", a, "failed"),
    )
    assert store.find_worker_and_ended_job("b", "j2") == (store.get_worker(b), None)
    assert store.find_worker_and_ended_job("nobody", "j2") == (None, None)


def test_a_worker_registers_with_the_jobs_it_took_over_from_its_earlier_run(store):
    worker = store.register_worker("w1", "127.0.0.1:1", {}, 4, "test")
    assert worker.running_jobs == 0
    assert store.heartbeat(worker.id, 3)
    # Restarted, it says what still runs; a heartbeat need not come first.
    again = store.register_worker("w1", "127.0.0.1:1", {}, 4, "test", running_jobs=2)
    assert (again.id, again.running_jobs) == (worker.id, 2)
    # A worker that says nothing (an older one) runs nothing it knows of.
    again = store.register_worker("w1", "127.0.0.1:1", {}, 4, "test")
    assert again.running_jobs == 0
