"""The scheduler's job index: an ended job's recorded status is final."""

from __future__ import annotations

import time

import pytest

from scheduler.store import Store


@pytest.fixture
def index(tmp_path):
    """A store with two workers; returns it and their ids."""
    store = Store(tmp_path / "state.db")
    store.initialize()
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


def test_a_write_without_waiting_is_refused_at_once_while_another_writes(index):
    import sqlite3
    import time

    from scheduler.store import Busy

    store, (a, _) = index
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


def test_a_worker_gets_back_its_id_from_a_scheduler_that_lost_its_state(tmp_path):
    first = Store(tmp_path / "first.db")
    first.initialize()
    had = first.register_worker("w1", "127.0.0.1:1", {}, 1, "test").id
    other = first.register_worker("w2", "127.0.0.1:2", {}, 1, "test").id

    lost = Store(tmp_path / "lost.db")  # the state database started anew
    lost.initialize()
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
    store.heartbeats({a: (300.0, 1, 15.0, "draining: asked by token ops at T", True)})
    assert store.get_worker(a).draining is True
    # Gone, it is still known drained; back drained, it says so at registration.
    store.deregister(a)
    assert store.get_worker(a).draining is True
    store.register_worker(
        "a", "127.0.0.1:1", {}, 1, "test", degraded="draining: x", draining=True
    )
    row = store.get_worker(a)
    assert (row.state, row.draining, row.degraded) == ("online", True, "draining: x")
    store.heartbeats({a: (400.0, 0, 15.0, "", False)})
    assert (store.get_worker(a).draining, store.get_worker(a).degraded) == (False, "")


def test_a_heartbeat_received_before_a_drain_answer_does_not_undo_it(index):
    # Heartbeats are buffered and written later; a drain answer at once.
    store, (a, _) = index
    before = time.time() - 1
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

    from scheduler import store as store_module

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
    store = Store(path)
    store.initialize()
    [row] = store.list_workers()
    assert (row.name, row.draining) == ("a", False)


def test_a_worker_registers_with_the_jobs_it_took_over_from_its_earlier_run(
    tmp_path,
):
    store = Store(tmp_path / "state.db")
    store.initialize()
    worker = store.register_worker("w1", "127.0.0.1:1", {}, 4, "test")
    assert worker.running_jobs == 0
    assert store.heartbeat(worker.id, 3)
    # Restarted, it says what still runs; a heartbeat need not come first.
    again = store.register_worker("w1", "127.0.0.1:1", {}, 4, "test", running_jobs=2)
    assert (again.id, again.running_jobs) == (worker.id, 2)
    # A worker that says nothing (an older one) runs nothing it knows of.
    again = store.register_worker("w1", "127.0.0.1:1", {}, 4, "test")
    assert again.running_jobs == 0
