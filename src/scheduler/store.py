"""The scheduler's state in SQLite (WAL): workers and the jobs started on them.

Every process of the scheduler (the gRPC server and each gunicorn worker)
opens the same database, so whichever process answers sees the same truth,
and a restart loses nothing. Each thread uses its own connection.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

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

SCHEMA_VERSION = 4
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

ONLINE, OFFLINE, UNREACHABLE = "online", "offline", "unreachable"
# A worker's word on why it starts no jobs is kept up to this long.
MAX_DEGRADED_CHARS = 1024


@dataclass(frozen=True)
class WorkerRow:
    id: str
    name: str
    address: str
    labels: dict
    capacity: int
    version: str
    state: str  # as stored: online or offline
    registered_at: float
    last_seen_at: float
    running_jobs: int
    # The worker's own timeout (scaled with the heartbeat interval it was
    # given); 0 for rows written before it was kept.
    heartbeat_timeout_s: float = 0.0
    # Why the worker starts no jobs now (its own word); empty when healthy.
    degraded: str = ""
    # The per-job limits the worker can enforce ("memory_mb", ...).
    enforceable_limits: tuple[str, ...] = ()
    # Drained by an operator: it starts no new jobs (``degraded`` says who
    # asked, and when) and stays so across its restarts until undrained.
    draining: bool = False

    def timeout_s(self, configured: float) -> float:
        """How long the worker may stay silent before it is unreachable.

        ``configured`` is ``[workers].heartbeat_timeout_s``; a worker told to
        heartbeat less often than the configured interval has a longer timeout
        of its own, and the longer of the two applies.
        """
        return max(configured, self.heartbeat_timeout_s)

    def effective_state(self, now: float, heartbeat_timeout_s: float) -> str:
        """online, offline, or unreachable when an online worker went silent."""
        timeout = self.timeout_s(heartbeat_timeout_s)
        if self.state == ONLINE and now - self.last_seen_at > timeout:
            return UNREACHABLE
        return self.state


class Busy(Exception):
    """Another process holds the database's write lock right now."""


class Store:
    def __init__(self, path: Path, busy_timeout_s: float = 5.0):
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()

    def initialize(self) -> None:
        """Create the database and its tables if they do not exist yet."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OSError(
                f"{self.path} was written by a newer jobgate (schema {version}, "
                f"this one knows {SCHEMA_VERSION}); upgrade this scheduler"
            )
        if version == 0:
            # Databases from before versioning kept a narrower job index; it
            # is only an index, rebuilt as jobs are seen again.
            conn.execute("DROP TABLE IF EXISTS jobs")
        conn.executescript(SCHEMA)
        for table, columns in ADDED_COLUMNS.items():
            have = {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}
            for column, definition in columns.items():
                if column not in have:
                    conn.execute(
                        f"ALTER TABLE {table} ADD COLUMN {column} {definition}"
                    )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
        return conn

    def without_waiting(self, fn, *args):
        """``fn(*args)`` on this thread's connection, refusing to wait for a lock.

        Raises :class:`Busy` at once where ``fn`` would have waited for
        another process's write; nothing was written then. It lets the HTTP
        processes write on their event loop (``UseCases._write``) and go to a
        thread only when they must wait: the job index insert of a start took
        0.17 ms on the loop against 0.50 ms through a thread (bench scenario 1).
        """
        conn = self._conn()
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise Busy(str(exc)) from None
            raise
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")

    def writable(self) -> bool:
        """True if a write transaction can be taken now (for readiness)."""
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.Error:
            return False

    # -- workers --------------------------------------------------------------

    def register_worker(
        self,
        name: str,
        address: str,
        labels: dict,
        capacity: int,
        version: str,
        heartbeat_timeout_s: float = 0.0,
        enforceable_limits: list[str] | tuple[str, ...] = (),
        previous_id: str = "",
        degraded: str = "",
        draining: bool = False,
        running_jobs: int = 0,
    ) -> WorkerRow:
        """Insert or refresh the worker named ``name``; its id never changes.

        ``running_jobs``: the jobs it runs as it registers (those it took over
        from its earlier run).

        A name this database does not know (a new worker, or a database lost
        and started anew) gets ``previous_id``, the id the worker says it had,
        when that is a well-formed id no other worker has; else a new one.
        So a scheduler whose state was lost gives its workers back their ids.
        """
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT id FROM workers WHERE name = ?", (name,)
            ).fetchone()
            if row:
                worker_id = row["id"]
            elif (
                _is_uuid(previous_id)
                and not conn.execute(
                    "SELECT 1 FROM workers WHERE id = ?", (previous_id.lower(),)
                ).fetchone()
            ):
                worker_id = previous_id.lower()
            else:
                worker_id = str(uuid.uuid4())
            conn.execute(
                """INSERT INTO workers (id, name, address, labels, capacity, version,
                                        state, registered_at, last_seen_at,
                                        running_jobs, heartbeat_timeout_s,
                                        enforceable_limits, degraded, draining)
                   VALUES (?, ?, ?, ?, ?, ?, 'online', ?, ?, ?, ?, ?, ?, ?)
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
                (
                    worker_id,
                    name,
                    address,
                    json.dumps(labels, sort_keys=True),
                    capacity,
                    version,
                    now,
                    now,
                    running_jobs,
                    heartbeat_timeout_s,
                    json.dumps(sorted(enforceable_limits)),
                    degraded,
                    int(draining),
                ),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return self.get_worker(worker_id)  # type: ignore[return-value]

    def heartbeat(self, worker_id: str, running_jobs: int) -> bool:
        """Record a heartbeat; False if the worker is unknown or deregistered."""
        cur = self._conn().execute(
            """UPDATE workers SET last_seen_at = ?, running_jobs = ?
               WHERE id = ? AND state = 'online'""",
            (time.time(), running_jobs, worker_id),
        )
        return cur.rowcount == 1

    def heartbeats(self, beats: dict[str, tuple]) -> None:
        """Record many heartbeats in one transaction.

        ``beats`` maps a worker id to (time, running jobs, the worker's
        heartbeat timeout from then on[, why it is degraded or empty[,
        whether it is drained]]). What a beat says of the worker's drain is
        not written over a drain answer recorded after the beat's time.
        """
        if not beats:
            return
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "UPDATE workers SET last_seen_at = ?1, running_jobs = ?2, "
                "heartbeat_timeout_s = ?3, "
                "degraded = CASE WHEN drain_set_at > ?1 THEN degraded ELSE ?4 END, "
                "draining = CASE WHEN drain_set_at > ?1 THEN draining ELSE ?5 END "
                "WHERE id = ?6 AND state = 'online'",
                [
                    (
                        *beat[:3],
                        beat[3] if len(beat) > 3 else "",
                        int(beat[4]) if len(beat) > 4 else 0,
                        worker_id,
                    )
                    for worker_id, beat in beats.items()
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def set_drain(
        self, worker_id: str, draining: bool, degraded: str, running_jobs: int
    ) -> None:
        """Record what a worker answered to a drain, before its next heartbeat
        (and over any heartbeat received before now, see :meth:`heartbeats`)."""
        self._conn().execute(
            "UPDATE workers SET draining = ?, degraded = ?, running_jobs = ?, "
            "drain_set_at = ? WHERE id = ? AND state = 'online'",
            (int(draining), degraded, running_jobs, time.time(), worker_id),
        )

    def deregister(self, worker_id: str) -> None:
        self._conn().execute(
            "UPDATE workers SET state = 'offline', running_jobs = 0, last_seen_at = ? "
            "WHERE id = ?",
            (time.time(), worker_id),
        )

    def get_worker(self, worker_id: str) -> WorkerRow | None:
        row = (
            self._conn()
            .execute("SELECT * FROM workers WHERE id = ?", (worker_id,))
            .fetchone()
        )
        return _worker(row) if row else None

    def find_worker(self, ref: str) -> WorkerRow | None:
        """The worker whose id or, failing that, whose name is ``ref``."""
        row = (
            self._conn()
            .execute(
                "SELECT * FROM workers WHERE id = ? OR name = ? "
                "ORDER BY id = ? DESC LIMIT 1",
                (ref, ref, ref),
            )
            .fetchone()
        )
        return _worker(row) if row else None

    def list_workers(self) -> list[WorkerRow]:
        rows = self._conn().execute("SELECT * FROM workers ORDER BY name").fetchall()
        return [_worker(r) for r in rows]

    # -- job index --------------------------------------------------------------

    def record_job(self, status: dict, group_id: str | None = None) -> None:
        """Add a job the scheduler started, with the status the worker gave."""
        now = time.time()
        self._conn().execute(
            "INSERT OR IGNORE INTO jobs (job_id, worker_id, group_id, created_at, "
            "state, status, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                status["job_id"],
                status["worker_id"],
                group_id,
                now,
                status["state"],
                json.dumps(status),
                now,
            ),
        )

    def update_job(self, status: dict) -> None:
        """Keep the last status seen of a job the scheduler knows.

        An ended job's status is final: a status of it that is older (one
        that an earlier call saw running, written late) does not replace it.
        """
        self._conn().execute(
            "UPDATE jobs SET state = ?, status = ?, updated_at = ? "
            "WHERE job_id = ? AND state = 'running'",
            (status["state"], json.dumps(status), time.time(), status["job_id"]),
        )

    def ended_job(self, worker_id: str, job_id: str) -> dict | None:
        """The final status of the worker's job if the index saw it end.

        A worker never changes the status of a job that ended, so this
        answers for the worker (its retention may even have removed the job
        since).
        """
        row = (
            self._conn()
            .execute(
                "SELECT status FROM jobs WHERE job_id = ? AND worker_id = ? "
                "AND state != 'running'",
                (job_id, worker_id),
            )
            .fetchone()
        )
        return None if row is None else json.loads(row["status"])

    def worker_jobs(self, worker_id: str, limit: int = 1000) -> list[dict]:
        """Last known statuses of a worker's jobs, newest first."""
        rows = (
            self._conn()
            .execute(
                "SELECT status, updated_at FROM jobs WHERE worker_id = ? "
                "ORDER BY created_at DESC LIMIT ?",
                (worker_id, limit),
            )
            .fetchall()
        )
        return [_status(r) for r in rows]

    def job_counts(self) -> dict[str, int]:
        rows = (
            self._conn()
            .execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            .fetchall()
        )
        return {r["state"]: r["n"] for r in rows}

    # -- groups ---------------------------------------------------------------

    def create_group(self, group_id: str, request: dict, errors: list[dict]) -> None:
        self._conn().execute(
            "INSERT INTO groups (group_id, created_at, request, errors) "
            "VALUES (?, ?, ?, ?)",
            (group_id, time.time(), json.dumps(request), json.dumps(errors)),
        )

    def set_group_errors(self, group_id: str, errors: list[dict]) -> None:
        self._conn().execute(
            "UPDATE groups SET errors = ? WHERE group_id = ?",
            (json.dumps(errors), group_id),
        )

    def get_group(self, group_id: str) -> tuple[dict, list[dict], list[dict]] | None:
        """The group's request, its errors and its jobs' last known statuses."""
        conn = self._conn()
        row = conn.execute(
            "SELECT request, errors, created_at FROM groups WHERE group_id = ?",
            (group_id,),
        ).fetchone()
        if row is None:
            return None
        jobs = conn.execute(
            "SELECT status, updated_at FROM jobs WHERE group_id = ? "
            "ORDER BY created_at",
            (group_id,),
        ).fetchall()
        request = json.loads(row["request"])
        request["created_at"] = row["created_at"]
        return request, json.loads(row["errors"]), [_status(r) for r in jobs]


def timestamp(t: float | None) -> str | None:
    """RFC 3339 UTC with milliseconds, or None."""
    if t is None:
        return None
    return (
        dt.datetime.fromtimestamp(t, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _status(row: sqlite3.Row) -> dict:
    status = json.loads(row["status"])
    status["recorded_at"] = timestamp(row["updated_at"])
    return status


def _worker(row: sqlite3.Row) -> WorkerRow:
    d = dict(row)
    d["labels"] = json.loads(d["labels"])
    d["enforceable_limits"] = tuple(json.loads(d["enforceable_limits"]))
    d["draining"] = bool(d["draining"])
    del d["drain_set_at"]  # the store's own bookkeeping (see heartbeats)
    return WorkerRow(**d)


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False
