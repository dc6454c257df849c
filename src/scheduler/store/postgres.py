"""The state in PostgreSQL: for several schedulers sharing one database.

Connections come from a :class:`psycopg_pool.ConnectionPool` per process,
each in autocommit mode (one statement, one transaction, one round trip);
writes of several statements take a transaction. All the SQL of this backend
is in this module: the migrations and :data:`STATEMENTS`.

The database is jobgate's own (a database, or at least a schema first on the
role's ``search_path``): the tables have plain names.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from jobgate.errors import SchedulerUnavailable
from scheduler.store.base import Busy, Statements, Store, T, newer_schema

log = logging.getLogger(__name__)

# What each version of the schema changes, in order: the first entry makes
# version 1. A migration is appended, never edited once released; each runs
# in the transaction that records it in schema_migrations.
MIGRATIONS: tuple[str, ...] = (
    # 1: the schema of SQLite's version 4, with PostgreSQL's types.
    """
    CREATE TABLE workers (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL UNIQUE,
        address       TEXT NOT NULL,
        labels        TEXT NOT NULL DEFAULT '{}',
        capacity      INTEGER NOT NULL DEFAULT 0,
        version       TEXT NOT NULL DEFAULT '',
        state         TEXT NOT NULL CHECK (state IN ('online', 'offline')),
        registered_at DOUBLE PRECISION NOT NULL,
        last_seen_at  DOUBLE PRECISION NOT NULL,
        running_jobs  INTEGER NOT NULL DEFAULT 0,
        -- silence after which this worker is unreachable, for the heartbeat
        -- interval it was last given; 0: [workers].heartbeat_timeout_s
        heartbeat_timeout_s DOUBLE PRECISION NOT NULL DEFAULT 0,
        -- why the worker starts no jobs now, as its last heartbeat said
        degraded      TEXT NOT NULL DEFAULT '',
        -- the per-job limits it can enforce, as a JSON list of names
        enforceable_limits TEXT NOT NULL DEFAULT '[]',
        -- while the worker is drained, as it last said (kept when it goes away)
        draining      BOOLEAN NOT NULL DEFAULT false,
        -- when a drain or undrain answer was recorded: a heartbeat received
        -- before then (written later, from the buffer) leaves both fields alone
        drain_set_at  DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE TABLE groups (
        group_id   TEXT PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        request    TEXT NOT NULL,  -- selector and job spec, as JSON
        errors     TEXT NOT NULL DEFAULT '[]'  -- workers it could not start on
    );
    CREATE TABLE jobs (
        job_id     TEXT PRIMARY KEY,
        worker_id  TEXT NOT NULL REFERENCES workers(id),
        group_id   TEXT REFERENCES groups(group_id),
        created_at DOUBLE PRECISION NOT NULL,
        state      TEXT NOT NULL,
        status     TEXT NOT NULL,  -- the last status seen, as the API renders it
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX jobs_by_worker ON jobs (worker_id, created_at);
    CREATE INDEX jobs_by_group ON jobs (group_id);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# Advisory locks of jobgate: (LOCK_CLASS, what). Locks of the two-key form
# never meet locks taken with one bigint key.
LOCK_CLASS = 0x6A6F6267  # "jobg"
LOCK_MIGRATIONS = f"SELECT pg_advisory_xact_lock({LOCK_CLASS}, 1)"
VERSIONS_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version    INTEGER PRIMARY KEY,
        applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )"""
CURRENT_VERSION = "SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations"
RECORD_VERSION = "INSERT INTO schema_migrations (version) VALUES (%(version)s)"
# A standby, or a database set read-only, takes no writes.
WRITABLE = (
    "SELECT NOT pg_is_in_recovery() "
    "AND current_setting('transaction_read_only') = 'off' AS writable"
)
SET_STATEMENT_TIMEOUT = "SELECT set_config('statement_timeout', %(ms)s, false)"

STATEMENTS = Statements(
    # Registrations across every scheduler take turns, as SQLite's write lock
    # makes them: two registrations must not give out the same id.
    lock_registrations=f"SELECT pg_advisory_xact_lock({LOCK_CLASS}, 2)",
    worker_id_by_name="SELECT id FROM workers WHERE name = %(name)s",
    worker_id_taken="SELECT 1 FROM workers WHERE id = %(id)s",
    upsert_worker="""
        INSERT INTO workers (id, name, address, labels, capacity, version, state,
                             registered_at, last_seen_at, running_jobs,
                             heartbeat_timeout_s, enforceable_limits, degraded,
                             draining)
        VALUES (%(id)s, %(name)s, %(address)s, %(labels)s, %(capacity)s,
                %(version)s, 'online', %(now)s, %(now)s, %(running_jobs)s,
                %(heartbeat_timeout_s)s, %(enforceable_limits)s, %(degraded)s,
                %(draining)s)
        ON CONFLICT (id) DO UPDATE SET
            address = excluded.address, labels = excluded.labels,
            capacity = excluded.capacity, version = excluded.version,
            state = 'online', registered_at = excluded.registered_at,
            last_seen_at = excluded.last_seen_at,
            running_jobs = excluded.running_jobs,
            heartbeat_timeout_s = excluded.heartbeat_timeout_s,
            degraded = excluded.degraded,
            enforceable_limits = excluded.enforceable_limits,
            draining = excluded.draining, drain_set_at = 0""",
    heartbeat="UPDATE workers SET last_seen_at = %(now)s, "
    "running_jobs = %(running_jobs)s WHERE id = %(id)s AND state = 'online'",
    heartbeats="UPDATE workers SET last_seen_at = %(now)s, "
    "running_jobs = %(running_jobs)s, heartbeat_timeout_s = %(timeout)s, "
    "degraded = CASE WHEN drain_set_at > %(now)s THEN degraded "
    "ELSE %(degraded)s END, "
    "draining = CASE WHEN drain_set_at > %(now)s THEN draining "
    "ELSE %(draining)s END "
    "WHERE id = %(id)s AND state = 'online' AND last_seen_at <= %(now)s RETURNING id",
    set_drain="UPDATE workers SET draining = %(draining)s, degraded = %(degraded)s, "
    "running_jobs = %(running_jobs)s, drain_set_at = %(now)s "
    "WHERE id = %(id)s AND state = 'online'",
    deregister="UPDATE workers SET state = 'offline', running_jobs = 0, "
    "last_seen_at = %(now)s WHERE id = %(id)s",
    get_worker="SELECT * FROM workers WHERE id = %(id)s",
    find_worker="SELECT * FROM workers WHERE id = %(ref)s OR name = %(ref)s "
    "ORDER BY id = %(ref)s DESC LIMIT 1",
    find_worker_ended_job="SELECT w.*, j.status AS ended FROM workers w "
    "LEFT JOIN jobs j ON j.job_id = %(job_id)s AND j.worker_id = w.id "
    "AND j.state <> 'running' "
    "WHERE w.id = %(ref)s OR w.name = %(ref)s ORDER BY w.id = %(ref)s DESC LIMIT 1",
    list_workers="SELECT * FROM workers ORDER BY name",
    heard_from="SELECT COUNT(*) AS n FROM workers WHERE state = 'online' "
    "AND last_seen_at + GREATEST(heartbeat_timeout_s, %(timeout)s) > %(now)s",
    record_job="INSERT INTO jobs (job_id, worker_id, group_id, created_at, state, "
    "status, updated_at) VALUES (%(job_id)s, %(worker_id)s, %(group_id)s, "
    "%(now)s, %(state)s, %(status)s, %(now)s) ON CONFLICT (job_id) DO NOTHING",
    update_job="UPDATE jobs SET state = %(state)s, status = %(status)s, "
    "updated_at = %(now)s WHERE job_id = %(job_id)s AND state = 'running'",
    ended_job="SELECT status FROM jobs WHERE job_id = %(job_id)s "
    "AND worker_id = %(worker_id)s AND state <> 'running'",
    worker_jobs="SELECT status, updated_at FROM jobs "
    "WHERE worker_id = %(worker_id)s ORDER BY created_at DESC LIMIT %(limit)s",
    job_counts="SELECT state, COUNT(*) AS n FROM jobs GROUP BY state",
    # The group id is new: a conflict is this very insert, done before a lost
    # connection could say so, and repeated (PostgresStore._retrying).
    create_group="INSERT INTO groups (group_id, created_at, request, errors) "
    "VALUES (%(group_id)s, %(now)s, %(request)s, %(errors)s) "
    "ON CONFLICT (group_id) DO NOTHING",
    set_group_errors="UPDATE groups SET errors = %(errors)s "
    "WHERE group_id = %(group_id)s",
    get_group="SELECT request, errors, created_at FROM groups "
    "WHERE group_id = %(group_id)s",
    group_jobs="SELECT status, updated_at FROM jobs WHERE group_id = %(group_id)s "
    "ORDER BY created_at",
)

# SQLSTATEs of a connection that is gone: class 08 (connection exceptions),
# and the server shutting down or starting (57P01-57P03). Errors raised by
# the client itself (a broken socket, a timeout) have none.
LOST_STATES = ("57P01", "57P02", "57P03")

# sslmode values that never send anything unencrypted.
SECURE_SSLMODES = ("require", "verify-ca", "verify-full")
# psycopg_pool logs every connection handed out at INFO.
logging.getLogger("psycopg.pool").setLevel(logging.WARNING)


def check_url(url: str) -> None:
    """Refuse a URL that puts a secret in the config or may go unencrypted.

    Raises ValueError saying what to change: a password in the URL (it
    belongs in ``[state].password_file``), or an ``sslmode`` weaker than
    ``require`` (or none) to a host that is not a unix socket or loopback.
    """
    if not url.startswith(("postgresql://", "postgres://")):
        # Not echoed: it may hold a password.
        raise ValueError(
            "not a PostgreSQL URL (postgresql://user@host:port/dbname"
            "?sslmode=verify-full&sslrootcert=...); empty: SQLite at [state].path"
        )
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ValueError(f"not a valid PostgreSQL URL: {exc}") from None
    if params.get("password"):
        raise ValueError(
            "the URL holds a password, which the config file must not: remove it "
            "and put it in a file named by [state].password_file"
        )
    if params.get("service"):
        # A service file could name hosts and TLS settings checked nowhere.
        raise ValueError(
            "service= is not supported: name the host, port, database and TLS "
            "settings in the URL itself"
        )
    remote = [h for h in _hosts(params) if not _is_local(h)]
    sslmode = params.get("sslmode")
    if remote and sslmode not in SECURE_SSLMODES:
        said = f"sslmode={sslmode}" if sslmode else "no sslmode"
        raise ValueError(
            f"{said} could send the connection to {remote[0]} unencrypted; add "
            "sslmode=verify-full&sslrootcert=<CA file> to the URL (or "
            "sslmode=require), or connect over a unix socket or loopback"
        )


def _hosts(params: dict[str, Any]) -> list[str]:
    """Every host the URL may connect to (libpq tries them in turn)."""
    hosts = [h for h in str(params.get("host") or "").split(",") if h]
    hosts += [h for h in str(params.get("hostaddr") or "").split(",") if h]
    return hosts


def _is_local(host: str) -> bool:
    if host.startswith(("/", "@")):  # a unix socket's directory (or abstract)
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class PostgresStore(Store):
    """The state in the PostgreSQL database of ``url``.

    ``password`` is the role's password (from ``[state].password_file``);
    the URL may name TLS settings (``sslmode``, ``sslrootcert``, ``sslcert``,
    ``sslkey``) as libpq reads them. The pool opens its connections in the
    background; :meth:`initialize` waits for the database.
    """

    sql = STATEMENTS

    def __init__(
        self,
        url: str,
        password: str | None = None,
        *,
        pool_min: int = 1,
        pool_max: int = 8,
        pool_timeout_s: float = 5.0,
        connect_timeout_s: int = 5,
        statement_timeout_s: float = 10.0,
        network_timeout_s: float = 10.0,
        application_name: str = "jobgate-scheduler",
    ):
        check_url(url)
        self.url = url
        self.location = url
        self.pool_timeout_s = pool_timeout_s
        self._statement_timeout = f"{int(statement_timeout_s * 1000)}ms"
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            "row_factory": dict_row,
            "connect_timeout": connect_timeout_s,
            "application_name": application_name,
        }
        if password is not None:
            self._kwargs["password"] = password
        # A connection whose peer stopped answering (a network cut, a host
        # gone) fails after network_timeout_s instead of waiting for ever:
        # in flight by the TCP user timeout, idle by keepalives probing a
        # third of the way in. What the URL sets itself stays.
        given = conninfo_to_dict(url)
        probe = max(1, round(network_timeout_s / 3))
        for key, value in (
            ("keepalives", 1),
            ("keepalives_idle", probe),
            ("keepalives_interval", max(1, round(network_timeout_s / 6))),
            ("keepalives_count", 2),
            ("tcp_user_timeout", int(network_timeout_s * 1000)),
        ):
            if key not in given:
                self._kwargs[key] = value
        self._local = threading.local()
        self.pool = ConnectionPool(
            url,
            kwargs=self._kwargs,
            min_size=pool_min,
            max_size=pool_max,
            timeout=pool_timeout_s,
            configure=self._configure,
            name="jobgate-state",
            open=False,
        )
        self.pool.open(wait=False)

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.execute(SET_STATEMENT_TIMEOUT, {"ms": self._statement_timeout})

    def initialize(self) -> None:
        """Bring the database to :data:`SCHEMA_VERSION`, once for everyone.

        The migrations run in one transaction under an advisory lock: a
        scheduler starting meanwhile waits for the lock and then finds them
        applied. On a connection of its own, so that an error names its
        cause (a refused password, a certificate) rather than a pool timeout,
        and with no statement timeout, since a migration may take long.
        """
        try:
            conn = psycopg.connect(self.url, **self._kwargs)
        except psycopg.OperationalError as exc:
            raise OSError(
                f"cannot connect to the state database {self.location}: "
                f"{str(exc).strip()}"
            ) from None
        try:
            with conn, conn.transaction():
                conn.execute(LOCK_MIGRATIONS)
                conn.execute(VERSIONS_TABLE)
                version = conn.execute(CURRENT_VERSION).fetchone()["version"]
                if version > SCHEMA_VERSION:
                    raise newer_schema(self.location, version, SCHEMA_VERSION)
                for number, script in enumerate(MIGRATIONS, 1):
                    if version < number:
                        conn.execute(script)
                        conn.execute(RECORD_VERSION, {"version": number})
        except psycopg.Error as exc:
            raise OSError(
                f"migrating the state database {self.location} failed: "
                f"{str(exc).strip()}"
            ) from None

    def _connection(self):
        pinned = getattr(self._local, "conn", None)
        if pinned is not None:
            return contextlib.nullcontext(pinned)
        return self.pool.connection()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        with self._connection() as conn, conn.transaction():
            yield conn

    def _retrying(self, fn: Callable[[Any], T], transaction: bool = False) -> T:
        """``fn(conn)``, again on another connection while the ones it gets
        turn out lost at once (up to ``pool_timeout_s`` in all).

        After the database restarted, every connection of the pool is
        broken, and only a statement finds out; each is discarded by the pool
        when it comes back. Every statement of the store may run twice (a
        commit whose answer was lost may have happened), so repeating it is
        safe. A database that cannot be reached, or does not answer, is
        :class:`~jobgate.errors.SchedulerUnavailable` (503 over HTTP).
        """
        if getattr(self._local, "conn", None) is not None:
            # In without_waiting: lost, the call is done again on a thread.
            try:
                return super()._retrying(fn, transaction)
            except psycopg.OperationalError as exc:
                if _lost(exc):
                    raise Busy(f"connection lost: {_first_line(exc)}") from None
                raise self._unavailable(exc) from None
        deadline = time.monotonic() + self.pool_timeout_s
        while True:
            try:
                with self.pool.connection(
                    timeout=max(0.001, deadline - time.monotonic())
                ) as conn:
                    if not transaction:
                        return fn(conn)
                    with conn.transaction():
                        return fn(conn)
            except PoolTimeout:
                raise self._unavailable(
                    f"no connection within {self.pool_timeout_s:g}s"
                ) from None
            except psycopg.OperationalError as exc:
                if not _lost(exc) or time.monotonic() >= deadline:
                    raise self._unavailable(exc) from None
                log.warning(
                    "a connection to the state database was lost (%s); trying another",
                    _first_line(exc),
                )

    def _unavailable(self, why: Exception | str) -> SchedulerUnavailable:
        if isinstance(why, Exception):
            why = _first_line(why)
        return SchedulerUnavailable(
            f"the state database does not answer this scheduler: {why}",
            retry_after_s=1,
        )

    def _beat(self, conn, params: list[dict]) -> set[str]:
        """The heartbeats in one round trip (a pipeline), with the ids of the
        rows they changed."""
        cur = conn.cursor()
        cur.executemany(self.sql.heartbeats, params, returning=True)
        changed: set[str] = set()
        while True:
            changed.update(row["id"] for row in cur.fetchall())
            if not cur.nextset():
                return changed

    def without_waiting(self, fn: Callable, *args):
        """``fn(*args)`` on a connection that is free now, else :class:`Busy`.

        There is no database-wide write lock to wait for, as SQLite has: rows
        are locked one by one, for the few statements that change them. What
        a caller may have to wait for is a connection of the pool, all of them
        in use by other threads: then it is :class:`Busy` at once, and the
        HTTP process goes to a thread as it does for SQLite. The statement
        itself is one round trip to the database, cheaper than the hop to a
        thread and back on a local network.
        """
        if getattr(self._local, "conn", None) is not None:
            return fn(*args)
        try:
            # A timeout of 0 refuses even a connection that is ready.
            conn = self.pool.getconn(timeout=0.001)
        except PoolTimeout as exc:
            raise Busy(str(exc)) from None
        self._local.conn = conn
        try:
            return fn(*args)
        finally:
            self._local.conn = None
            self.pool.putconn(conn)

    def writable(self) -> bool:
        """True if the database answers and takes writes (not a standby)."""
        try:
            return bool(self._one(WRITABLE, {})["writable"])  # type: ignore[index]
        except (psycopg.Error, SchedulerUnavailable):
            return False

    def healthy(self) -> bool:
        """True while the pool is open, whether or not the database answers.

        A database that restarts or is cut off for a while is no reason to
        restart the scheduler (which could not start without it either):
        readiness (:meth:`writable`) says it, and the pool reconnects.
        """
        return not self.pool.closed

    def close(self) -> None:
        self.pool.close()


def _lost(exc: psycopg.OperationalError) -> bool:
    """True if ``exc`` says the connection is gone (not that a statement
    failed on a working one, such as a statement timeout)."""
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in LOST_STATES


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
