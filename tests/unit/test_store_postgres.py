"""What only the PostgreSQL store does: migrations under a lock shared by
every scheduler, its connection pool, the password from a file.

The server is the test session's (``postgres`` in ``tests/conftest.py``);
each test has databases of its own. The store's behaviour shared with SQLite
is tested on both in ``test_store.py``.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import psycopg
import pytest

from jobgate.errors import SchedulerUnavailable
from scheduler.config import StateSection
from scheduler.http import errors as http_errors
from scheduler.store import Busy, open_store
from scheduler.store import postgres as backend
from scheduler.store.postgres import PostgresStore


@pytest.fixture
def database(postgres):
    """A new, empty database; its URL (over the unix socket)."""
    with postgres.database() as url:
        yield url


@pytest.fixture
def stores():
    """Stores made by a test, closed after it."""
    made: list[PostgresStore] = []
    yield made
    for store in made:
        store.close()


def versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT version FROM schema_migrations ORDER BY version"
        ).fetchall()
    return [r[0] for r in rows]


def test_schedulers_starting_at_once_migrate_the_database_once(database, stores):
    stores += [PostgresStore(database) for _ in range(4)]
    errors = []
    barrier = threading.Barrier(len(stores))

    def start(store):
        barrier.wait()
        try:
            store.initialize()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Without the lock, all but one would fail to create the tables (or the
    # table of versions) that another had just created.
    assert errors == []
    assert versions(database) == list(range(1, backend.SCHEMA_VERSION + 1))
    row = stores[0].register_worker("a", "127.0.0.1:1", {}, 1, "test")
    assert stores[3].get_worker(row.id) == row


def test_a_migration_waits_for_the_lock_another_scheduler_holds(database, stores):
    store = PostgresStore(database)
    stores.append(store)
    with psycopg.connect(database) as other, other.transaction():
        other.execute(backend.LOCK_MIGRATIONS)  # another scheduler migrating
        done = threading.Event()
        thread = threading.Thread(target=lambda: (store.initialize(), done.set()))
        thread.start()
        assert not done.wait(0.5)
    thread.join(10)
    assert done.is_set()
    assert versions(database) == list(range(1, backend.SCHEMA_VERSION + 1))


def test_registrations_through_two_schedulers_never_share_an_id(database, stores):
    stores += [PostgresStore(database) for _ in range(2)]
    stores[0].initialize()
    claimed = str(uuid.uuid4())
    ids = {}
    barrier = threading.Barrier(8)

    def register(n):
        barrier.wait()
        store = stores[n % 2]
        # Every worker claims the same previous id: one gets it.
        ids[n] = store.register_worker(
            f"w{n}", "127.0.0.1:1", {}, 1, "test", previous_id=claimed
        ).id

    threads = [threading.Thread(target=register, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids.values())) == 8
    assert claimed in ids.values()
    assert {w.name for w in stores[0].list_workers()} == {f"w{n}" for n in range(8)}


def test_a_write_without_waiting_is_refused_at_once_while_no_connection_is_free(
    database, stores
):
    store = PostgresStore(database, pool_min=1, pool_max=1, pool_timeout_s=5.0)
    stores.append(store)
    store.initialize()
    worker = store.register_worker("a", "127.0.0.1:1", {}, 1, "test").id
    job = {"job_id": "j1", "worker_id": worker, "state": "running"}
    with store.pool.connection():  # another thread's statement under way
        started = time.monotonic()
        with pytest.raises(Busy):
            store.without_waiting(store.record_job, job)
        assert time.monotonic() - started < 1  # pool_timeout_s is 5 s here
    assert store.worker_jobs(worker) == []  # nothing was written
    store.without_waiting(store.record_job, job)
    assert [j["job_id"] for j in store.worker_jobs(worker)] == ["j1"]
    # The connection went back to the pool.
    assert store.pool.get_stats()["pool_available"] == 1


def test_the_password_comes_from_the_password_file(
    postgres, database, tmp_path, stores
):
    # Over TCP the server asks for the password (over its socket it does not).
    tcp_url = postgres.url(database.rsplit("/", 1)[1], tcp=True)
    secret = tmp_path / "password"
    secret.write_text(postgres.password + "\n")
    state = StateSection(url=tcp_url, password_file=secret)
    store = open_store(state)
    stores.append(store)
    assert isinstance(store, PostgresStore)
    store.initialize()
    assert store.writable() is True

    secret.write_text("not-the-password\n")
    wrong = open_store(state)
    stores.append(wrong)
    with pytest.raises(OSError) as exc:
        wrong.initialize()
    message = str(exc.value)
    assert message.startswith(f"cannot connect to the state database {tcp_url}: ")
    assert "password authentication failed" in message
    assert "not-the-password" not in message
    assert wrong.writable() is False


def test_an_empty_password_file_is_refused(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("\n")
    state = StateSection(
        url="postgresql://jobgate@127.0.0.1:1/jobgate", password_file=secret
    )
    with pytest.raises(OSError, match="password_file: .* holds no password"):
        open_store(state)


def test_a_database_that_cannot_be_reached_is_named_at_start(tmp_path, stores):
    url = f"postgresql://jobgate@{str(tmp_path).replace('/', '%2F')}:5432/x"
    store = PostgresStore(url, connect_timeout_s=2, pool_timeout_s=0.2)
    stores.append(store)
    with pytest.raises(OSError, match="^cannot connect to the state database "):
        store.initialize()
    # Not ready, but nothing a restart of the scheduler would mend.
    assert store.writable() is False
    assert store.healthy() is True


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://jobgate@db.example:5432/jobgate?sslmode=verify-full",
        "postgresql://jobgate@db.example/jobgate?sslmode=require",
        "postgresql://jobgate@10.0.0.5/jobgate?sslmode=verify-ca",
        "postgresql://jobgate@127.0.0.1:5432/jobgate",
        "postgresql://jobgate@localhost/jobgate?sslmode=disable",
        "postgresql://jobgate@[::1]:5432/jobgate?sslmode=prefer",
        "postgresql://jobgate@%2Frun%2Fpostgresql/jobgate",
        "postgresql:///jobgate",
        "postgres://jobgate@/jobgate?host=/run/postgresql",
    ],
)
def test_a_url_that_is_encrypted_or_stays_on_this_host_is_accepted(url):
    backend.check_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "postgresql://jobgate:s3cret@db.example/jobgate?sslmode=verify-full",
            "the URL holds a password, which the config file must not: remove it "
            "and put it in a file named by [state].password_file",
        ),
        (
            "postgresql://jobgate@db.example/jobgate?password=s3cret&sslmode=require",
            "the URL holds a password",
        ),
        (
            "postgresql://jobgate@db.example/jobgate",
            "no sslmode could send the connection to db.example unencrypted; add "
            "sslmode=verify-full&sslrootcert=<CA file> to the URL",
        ),
        (
            "postgresql://jobgate@db.example/jobgate?sslmode=prefer",
            "sslmode=prefer could send the connection to db.example unencrypted",
        ),
        (
            "postgresql://jobgate@127.0.0.1,db.example/jobgate?sslmode=allow",
            "sslmode=allow could send the connection to db.example unencrypted",
        ),
        (
            "postgresql://jobgate@localhost/jobgate?hostaddr=10.1.1.1",
            "no sslmode could send the connection to 10.1.1.1 unencrypted",
        ),
        ("host=db.example password=s3cret", "not a PostgreSQL URL"),
        ("postgresql:///jobgate?service=prod", "service= is not supported"),
        ("postgresql://jobgate@db.example/jobgate?nonsense=1", "not a valid"),
    ],
)
def test_a_url_with_a_password_or_that_may_go_unencrypted_is_refused(url, message):
    with pytest.raises(ValueError) as exc:
        backend.check_url(url)
    assert message in str(exc.value)
    assert "s3cret" not in str(exc.value)


def test_tls_to_the_database_is_set_in_the_url(postgres, database, tmp_path, stores):
    name = database.rsplit("/", 1)[1]
    secret = tmp_path / "password"
    secret.write_text(postgres.password + "\n")
    url = postgres.url(name, tls=True)  # sslmode=verify-full&sslrootcert=...
    store = open_store(StateSection(url=url, password_file=secret))
    stores.append(store)
    store.initialize()
    with store.pool.connection() as conn:
        row = conn.execute(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row["ssl"] is True, row

    # A certificate from another CA is refused, and the error says so.
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_text((postgres.dir / "tls" / "scheduler.pem").read_text())
    wrong = open_store(
        StateSection(
            url=url.split("&sslrootcert=")[0] + f"&sslrootcert={other_ca}",
            password_file=secret,
        )
    )
    stores.append(wrong)
    with pytest.raises(OSError, match="certificate verify failed"):
        wrong.initialize()


def _terminate_backends(url: str, application_name: str) -> int:
    """End the server processes of every connection of ``application_name``,
    as a restart of the database does (SQLSTATE 57P01 on their next use)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (application_name,),
        ).fetchall()
    return len(rows)


def _pooled_store(database: str, stores: list, connections: int, name: str):
    """A store holding ``connections`` open connections named ``name``, and
    a worker registered in it."""
    store = PostgresStore(
        database, pool_min=connections, pool_max=connections, application_name=name
    )
    stores.append(store)
    store.initialize()
    store.pool.wait(timeout=10)
    return store, store.register_worker("w1", "127.0.0.1:9", {}, 1, "test")


def test_connections_the_database_dropped_are_replaced_without_a_failed_call(
    database, stores
):
    store, worker = _pooled_store(database, stores, 4, "drop")
    assert _terminate_backends(database, "drop") == 4
    # Every pooled connection is broken now; no call fails for it.
    for n in range(12):
        assert store.find_worker("w1").id == worker.id
        assert store.heartbeats({worker.id: (time.time(), n, 15.0)}) == set()
    assert store.writable()


def test_a_write_on_the_loop_whose_connection_was_dropped_goes_to_a_thread(
    database, stores
):
    store, worker = _pooled_store(database, stores, 1, "loop")
    _terminate_backends(database, "loop")
    with pytest.raises(Busy, match="connection lost"):
        store.without_waiting(store.heartbeat, worker.id, 3)
    # Done again as the caller does on a thread: on a new connection.
    assert store.heartbeat(worker.id, 3) is True
    assert store.get_worker(worker.id).running_jobs == 3


def test_a_database_that_does_not_answer_is_a_503_not_a_hang(stores):
    # Nothing listens on this port (it was free a moment ago).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = PostgresStore(
        f"postgresql://jobgate@127.0.0.1:{port}/jobgate",
        pool_min=0,
        pool_timeout_s=0.5,
        connect_timeout_s=2,
    )
    stores.append(store)
    t0 = time.monotonic()
    with pytest.raises(SchedulerUnavailable, match="does not answer this scheduler"):
        store.find_worker("w1")
    assert time.monotonic() - t0 < 3.0
    assert store.writable() is False
    assert store.healthy() is True  # no reason to restart the scheduler
    problem = http_errors.problem(SchedulerUnavailable("x", retry_after_s=1))
    assert (problem.status, problem.title, problem.retry_after_s) == (
        503,
        "Scheduler unavailable",
        1,
    )


def test_connections_are_given_keepalives_and_a_user_timeout(stores):
    store = PostgresStore(
        "postgresql://jobgate@127.0.0.1:1/jobgate?keepalives_idle=7",
        pool_min=0,
        network_timeout_s=12,
    )
    stores.append(store)
    kwargs = store._kwargs
    assert (kwargs["keepalives"], kwargs["tcp_user_timeout"]) == (1, 12000)
    assert "keepalives_idle" not in kwargs  # the URL's own stays
    assert kwargs["keepalives_interval"] * kwargs["keepalives_count"] <= 12
