"""The state in SQLite (WAL): the embedded default, for one scheduler.

Every process of the scheduler opens the same database file; each thread
uses its own connection. All the SQL of this backend is in this module:
the schema, its migrations and :data:`STATEMENTS`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jobgate.errors import SchedulerUnavailable
from scheduler.store.base import Busy, Statements, Store, T, newer_schema

SCHEMA = """
CREATE TABLE IF NOT EXISTS workers (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    address       TEXT NOT NULL,
    labels        TEXT NOT NULL DEFAULT '{}',
    capacity      INTEGER NOT NULL DEFAULT 0,
    version       TEXT NOT NULL DEFAULT '',
    state         TEXT NOT NULL CHECK (state IN ('online', 'offline')),
    registered_at REAL NOT NULL,
    last_seen_at  REAL NOT NULL,
    running_jobs  INTEGER NOT NULL DEFAULT 0,
    -- silence after which this worker is unreachable, for the heartbeat
    -- interval it was last given; 0: [workers].heartbeat_timeout_s
    heartbeat_timeout_s REAL NOT NULL DEFAULT 0,
    -- why the worker starts no jobs now, as its last heartbeat said; '' if none
    degraded      TEXT NOT NULL DEFAULT '',
    -- the per-job limits it can enforce, as a JSON list of names
    enforceable_limits TEXT NOT NULL DEFAULT '[]',
    -- 1 while the worker is drained, as it last said (kept when it goes away)
    draining      INTEGER NOT NULL DEFAULT 0,
    -- when a drain or undrain answer was recorded: a heartbeat received
    -- before then (written later, from the buffer) leaves both fields alone
    drain_set_at  REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id     TEXT PRIMARY KEY,
    worker_id  TEXT NOT NULL REFERENCES workers(id),
    group_id   TEXT REFERENCES groups(group_id),
    created_at REAL NOT NULL,
    state      TEXT NOT NULL,
    status     TEXT NOT NULL,  -- the last status seen, as the API renders it
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_worker ON jobs (worker_id, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_group ON jobs (group_id);
CREATE TABLE IF NOT EXISTS groups (
    group_id   TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    request    TEXT NOT NULL,  -- selector and job spec, as JSON
    errors     TEXT NOT NULL DEFAULT '[]'  -- workers the job could not start on
);
"""

# Versions 1 to 4 came before the migrations were listed one by one: the
# baseline brings a database of any of them, or of version 0 (from before
# versioning), to version 4. It runs for a database at 4 too, since columns
# were once added there without a new version; it only adds what is missing.
BASELINE_VERSION = 4
# Columns added to a table after version 1, with their definitions: a database
# written before gets them on start, with their defaults.
ADDED_COLUMNS = {
    "workers": {
        "heartbeat_timeout_s": "REAL NOT NULL DEFAULT 0",
        "degraded": "TEXT NOT NULL DEFAULT ''",
        "enforceable_limits": "TEXT NOT NULL DEFAULT '[]'",
        "draining": "INTEGER NOT NULL DEFAULT 0",
        "drain_set_at": "REAL NOT NULL DEFAULT 0",
    },
}
# What each version after the baseline changes, in order: the first entry
# makes version 5. A migration is appended, never edited once released.
MIGRATIONS: tuple[str, ...] = ()
SCHEMA_VERSION = BASELINE_VERSION + len(MIGRATIONS)

STATEMENTS = Statements(
    # BEGIN IMMEDIATE already keeps every other writer out.
    lock_registrations="",
    worker_id_by_name="SELECT id FROM workers WHERE name = :name",
    worker_id_taken="SELECT 1 FROM workers WHERE id = :id",
    upsert_worker="""
        INSERT INTO workers (id, name, address, labels, capacity, version, state,
                             registered_at, last_seen_at, running_jobs,
                             heartbeat_timeout_s, enforceable_limits, degraded,
                             draining)
        VALUES (:id, :name, :address, :labels, :capacity, :version, 'online',
                :now, :now, :running_jobs, :heartbeat_timeout_s, :enforceable_limits,
                :degraded, :draining)
        ON CONFLICT(id) DO UPDATE SET
            address = excluded.address, labels = excluded.labels,
            capacity = excluded.capacity, version = excluded.version,
            state = 'online', registered_at = excluded.registered_at,
            last_seen_at = excluded.last_seen_at,
            running_jobs = excluded.running_jobs,
            heartbeat_timeout_s = excluded.heartbeat_timeout_s,
            degraded = excluded.degraded,
            enforceable_limits = excluded.enforceable_limits,
            draining = excluded.draining, drain_set_at = 0""",
    heartbeat="UPDATE workers SET last_seen_at = :now, running_jobs = :running_jobs "
    "WHERE id = :id AND state = 'online'",
    heartbeats="UPDATE workers SET last_seen_at = :now, "
    "running_jobs = :running_jobs, heartbeat_timeout_s = :timeout, "
    "degraded = CASE WHEN drain_set_at > :now THEN degraded ELSE :degraded END, "
    "draining = CASE WHEN drain_set_at > :now THEN draining ELSE :draining END "
    "WHERE id = :id AND state = 'online' AND last_seen_at <= :now",
    set_drain="UPDATE workers SET draining = :draining, degraded = :degraded, "
    "running_jobs = :running_jobs, drain_set_at = :now "
    "WHERE id = :id AND state = 'online'",
    deregister="UPDATE workers SET state = 'offline', running_jobs = 0, "
    "last_seen_at = :now WHERE id = :id",
    get_worker="SELECT * FROM workers WHERE id = :id",
    find_worker="SELECT * FROM workers WHERE id = :ref OR name = :ref "
    "ORDER BY id = :ref DESC LIMIT 1",
    find_worker_ended_job="SELECT w.*, j.status AS ended FROM workers w "
    "LEFT JOIN jobs j ON j.job_id = :job_id AND j.worker_id = w.id "
    "AND j.state != 'running' "
    "WHERE w.id = :ref OR w.name = :ref ORDER BY w.id = :ref DESC LIMIT 1",
    list_workers="SELECT * FROM workers ORDER BY name",
    heard_from="SELECT COUNT(*) AS n FROM workers WHERE state = 'online' "
    "AND last_seen_at + MAX(heartbeat_timeout_s, :timeout) > :now",
    record_job="INSERT OR IGNORE INTO jobs (job_id, worker_id, group_id, "
    "created_at, state, status, updated_at) "
    "VALUES (:job_id, :worker_id, :group_id, :now, :state, :status, :now)",
    update_job="UPDATE jobs SET state = :state, status = :status, updated_at = :now "
    "WHERE job_id = :job_id AND state = 'running'",
    ended_job="SELECT status FROM jobs WHERE job_id = :job_id "
    "AND worker_id = :worker_id AND state != 'running'",
    worker_jobs="SELECT status, updated_at FROM jobs WHERE worker_id = :worker_id "
    "ORDER BY created_at DESC LIMIT :limit",
    job_counts="SELECT state, COUNT(*) AS n FROM jobs GROUP BY state",
    create_group="INSERT INTO groups (group_id, created_at, request, errors) "
    "VALUES (:group_id, :now, :request, :errors)",
    set_group_errors="UPDATE groups SET errors = :errors WHERE group_id = :group_id",
    get_group="SELECT request, errors, created_at FROM groups "
    "WHERE group_id = :group_id",
    group_jobs="SELECT status, updated_at FROM jobs WHERE group_id = :group_id "
    "ORDER BY created_at",
)


class _Borrowed:
    """The thread's connection as a context manager that leaves it open."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc) -> None:
        return None


class SqliteStore(Store):
    """The state in the SQLite database at ``path`` (WAL mode)."""

    sql = STATEMENTS

    def __init__(self, path: Path, busy_timeout_s: float = 5.0):
        self.path = Path(path)
        self.location = str(self.path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()

    def initialize(self) -> None:
        """Create the database, or bring it to :data:`SCHEMA_VERSION`.

        It happens in one write transaction: a second process starting at
        the same time waits for it (``busy_timeout_s``), then finds the
        database migrated.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        self._use_wal(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise newer_schema(self.location, version, SCHEMA_VERSION)
            if version <= BASELINE_VERSION:
                _baseline(conn, version)
            for number, script in enumerate(MIGRATIONS, BASELINE_VERSION + 1):
                if version < number:
                    for statement in _statements(script):
                        conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the database to WAL mode (once; it stays so).

        The switch needs the database to itself, and SQLite refuses it at
        once, without waiting, while another process starting meanwhile holds
        a lock: it is tried again for up to ``busy_timeout_s``.
        """
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,
                check_same_thread=True,
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            self._local.borrowed = _Borrowed(conn)
        return conn

    def _connection(self) -> _Borrowed:
        borrowed = getattr(self._local, "borrowed", None)
        if borrowed is None:
            self._conn()
            borrowed = self._local.borrowed
        return borrowed

    def _transaction(self):
        return _write_transaction(self._conn())

    def without_waiting(self, fn: Callable, *args):
        """``fn(*args)`` on this thread's connection, refusing to wait for a lock.

        Raises :class:`Busy` at once where ``fn`` would have waited for
        another process's write; nothing was written then. The job index
        insert of a start took 0.17 ms on the loop against 0.50 ms through a
        thread (bench scenario 1).
        """
        conn = self._conn()
        conn.execute("PRAGMA busy_timeout = 0")
        self._local.no_wait = True
        try:
            return fn(*args)
        finally:
            self._local.no_wait = False
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")

    def _retrying(self, fn: Callable[[Any], T], transaction: bool = False) -> T:
        """``fn(conn)``; a database that stays locked past ``busy_timeout_s``
        (or cannot be written: a full disk) is
        :class:`~jobgate.errors.SchedulerUnavailable`, 503 over HTTP, and
        :class:`Busy` at once in :meth:`without_waiting`."""
        try:
            return super()._retrying(fn, transaction)
        except sqlite3.OperationalError as exc:
            if getattr(self._local, "no_wait", False) and _locked(exc):
                raise Busy(str(exc)) from None
            raise SchedulerUnavailable(
                f"the state database {self.path} cannot be used now: {exc}",
                retry_after_s=1,
            ) from None

    def writable(self) -> bool:
        """True if a write transaction can be taken now (for readiness)."""
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.Error:
            return False

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = self._local.borrowed = None


class _write_transaction:  # noqa: N801 - used like a function
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on an exception."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.conn.execute("ROLLBACK")
            return
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise


def _baseline(conn: sqlite3.Connection, version: int) -> None:
    if version == 0:
        # Databases from before versioning kept a narrower job index; it
        # is only an index, rebuilt as jobs are seen again.
        conn.execute("DROP TABLE IF EXISTS jobs")
    for statement in _statements(SCHEMA):
        conn.execute(statement)
    for table, columns in ADDED_COLUMNS.items():
        have = {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}
        for column, definition in columns.items():
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one by one (``executescript`` would
    commit the transaction they must run in)."""
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):  # not a ; in a comment
            if pending.strip(" \n;"):
                yield pending
            pending = ""


def _locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)
