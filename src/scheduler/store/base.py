"""What every state store does, whichever database keeps the state.

:class:`Store` holds the logic: what a registration, a heartbeat or a job
status writes, and how rows become :class:`WorkerRow` and status dicts. A
backend (``scheduler.store.sqlite``, ``scheduler.store.postgres``) brings its
SQL, one :class:`Statements` with the same names and named parameters, its
ordered migrations, and how a connection and a write transaction are had.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

ONLINE, OFFLINE, UNREACHABLE = "online", "offline", "unreachable"
# A worker's word on why it starts no jobs now is kept up to this long.
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

    def same_registration(self, other: WorkerRow) -> bool:
        """Both rows are of one registration: the same worker process, at the
        same address (a worker that restarted or moved registered anew)."""
        return (self.id, self.address, self.registered_at) == (
            other.id,
            other.address,
            other.registered_at,
        )

    def effective_state(self, now: float, heartbeat_timeout_s: float) -> str:
        """online, offline, or unreachable when an online worker went silent."""
        timeout = self.timeout_s(heartbeat_timeout_s)
        if self.state == ONLINE and now - self.last_seen_at > timeout:
            return UNREACHABLE
        return self.state


T = TypeVar("T")


class Busy(Exception):
    """The store cannot take the call now without waiting (see
    :meth:`Store.without_waiting`); nothing was written."""


@dataclass(frozen=True)
class Statements:
    """The SQL of one backend: one statement per use, named parameters.

    Every backend fills in each of them (a missing one is a TypeError when
    its module is imported); ``lock_registrations`` may be empty where a
    write transaction already excludes every other writer.
    """

    # registration: within one write transaction
    lock_registrations: str  # one registration at a time, so that no two
    # take the same id
    worker_id_by_name: str  # :name -> id
    worker_id_taken: str  # :id -> a row if a worker has it
    upsert_worker: str  # every column of the worker, by name
    # workers
    heartbeat: str  # :now, :running_jobs, :id
    heartbeats: str  # :now, :running_jobs, :timeout, :degraded, :draining, :id
    set_drain: str  # :draining, :degraded, :running_jobs, :now, :id
    deregister: str  # :now, :id
    get_worker: str  # :id
    find_worker: str  # :ref
    find_worker_ended_job: str  # :ref, :job_id; the worker's columns and ended
    list_workers: str
    heard_from: str  # :now, :timeout; -> n: online workers within their timeout
    # job index
    record_job: str  # :job_id, :worker_id, :group_id, :now, :state, :status
    update_job: str  # :state, :status, :now, :job_id
    ended_job: str  # :job_id, :worker_id
    worker_jobs: str  # :worker_id, :limit
    job_counts: str
    # groups
    create_group: str  # :group_id, :now, :request, :errors
    set_group_errors: str  # :errors, :group_id
    get_group: str  # :group_id
    group_jobs: str  # :group_id


def newer_schema(location: str, version: int, known: int) -> OSError:
    """The error of a database written by a newer jobgate than this one."""
    return OSError(
        f"{location} was written by a newer jobgate (schema {version}, "
        f"this one knows {known}); upgrade this scheduler"
    )


Row = Mapping[str, Any]


class Store(abc.ABC):
    """The scheduler's state: workers, the job index and fan-out groups.

    Every process of the scheduler (the gRPC server and each HTTP process)
    has a store of its own on the same database, so whichever process
    answers sees the same truth. Open one with
    :func:`scheduler.store.open_store`.
    """

    #: The backend's SQL.
    sql: Statements
    #: Where the state is, for messages (a path or a URL without secrets).
    location: str

    # -- what a backend provides ----------------------------------------------

    @abc.abstractmethod
    def initialize(self) -> None:
        """Create or migrate the schema, under a lock (once per start)."""

    @abc.abstractmethod
    def _connection(self) -> contextlib.AbstractContextManager[Any]:
        """A DB-API connection for single statements, each its own
        transaction (autocommit); rows read from it are mappings."""

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A connection in a write transaction, committed when the block
        ends without an exception and rolled back otherwise."""

    @abc.abstractmethod
    def writable(self) -> bool:
        """True if the database takes writes now (for readiness)."""

    def healthy(self) -> bool:
        """False if this process should be restarted for the store's sake
        (the service's watchdog); the store's own failure, not the database
        being away for a while."""
        return self.writable()

    def _retrying(self, fn: Callable[[Any], T], transaction: bool = False) -> T:
        """``fn(conn)`` on a connection (in a write transaction if
        ``transaction``). Every use of a connection goes through here, so a
        backend whose connections can be lost may run ``fn`` again on
        another: every statement of the store may run twice."""
        with self._transaction() if transaction else self._connection() as conn:
            return fn(conn)

    def without_waiting(self, fn: Callable, *args):
        """``fn(*args)``, or :class:`Busy` at once where it would have to
        wait for another writer (or another caller's connection) first.

        It lets the HTTP processes write on their event loop
        (``UseCases._write``) and go to a thread only when they must wait.
        """
        return fn(*args)

    def close(self) -> None:  # noqa: B027 - a backend with nothing to close
        """Release the connections of this store."""

    # -- helpers --------------------------------------------------------------

    def _run(self, sql: str, params: Mapping[str, Any]) -> int:
        """Run one write; the number of rows it changed."""
        return self._retrying(lambda conn: conn.execute(sql, params).rowcount)

    def _one(self, sql: str, params: Mapping[str, Any]) -> Row | None:
        return self._retrying(lambda conn: conn.execute(sql, params).fetchone())

    def _all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        return self._retrying(lambda conn: conn.execute(sql, params or {}).fetchall())

    def _beat(self, conn, params: list[dict]) -> set[str]:
        """Run the heartbeats statement for each of ``params``; the ids whose
        row it changed."""
        return {
            p["id"] for p in params if conn.execute(self.sql.heartbeats, p).rowcount
        }

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
        sql = self.sql

        def register(conn) -> str:
            if sql.lock_registrations:
                conn.execute(sql.lock_registrations)
            row = conn.execute(sql.worker_id_by_name, {"name": name}).fetchone()
            if row:
                worker_id = row["id"]
            elif (
                _is_uuid(previous_id)
                and not conn.execute(
                    sql.worker_id_taken, {"id": previous_id.lower()}
                ).fetchone()
            ):
                worker_id = previous_id.lower()
            else:
                worker_id = str(uuid.uuid4())
            conn.execute(
                sql.upsert_worker,
                {
                    "id": worker_id,
                    "name": name,
                    "address": address,
                    "labels": json.dumps(labels, sort_keys=True),
                    "capacity": capacity,
                    "version": version,
                    "now": now,
                    "heartbeat_timeout_s": heartbeat_timeout_s,
                    "enforceable_limits": json.dumps(sorted(enforceable_limits)),
                    "degraded": degraded,
                    "draining": bool(draining),
                    "running_jobs": running_jobs,
                },
            )
            return worker_id

        worker_id = self._retrying(register, transaction=True)
        return self.get_worker(worker_id)  # type: ignore[return-value]

    def heartbeat(self, worker_id: str, running_jobs: int) -> bool:
        """Record a heartbeat; False if the worker is unknown or deregistered."""
        changed = self._run(
            self.sql.heartbeat,
            {"now": time.time(), "running_jobs": running_jobs, "id": worker_id},
        )
        return changed == 1

    def heartbeats(self, beats: dict[str, tuple]) -> set[str]:
        """Record many heartbeats in one transaction; the ids of the workers
        that are not online in the database (deregistered, perhaps through
        another scheduler), whose beats changed nothing.

        ``beats`` maps a worker id to (time, running jobs, the worker's
        heartbeat timeout from then on[, why it is degraded or empty[,
        whether it is drained]]). What a beat says of the worker's drain is
        not written over a drain answer recorded after the beat's time, and
        a beat older than the worker's last (written late, by a scheduler
        the worker has since left for another) changes nothing.
        """
        if not beats:
            return set()
        params = [
            {
                "now": beat[0],
                "running_jobs": beat[1],
                "timeout": beat[2],
                "degraded": beat[3] if len(beat) > 3 else "",
                "draining": bool(beat[4]) if len(beat) > 4 else False,
                "id": worker_id,
            }
            for worker_id, beat in beats.items()
        ]
        changed = self._retrying(lambda conn: self._beat(conn, params), True)
        unmatched = set(beats) - changed
        # Rare: look again at those, online but heard from later.
        rows = (self.get_worker(worker_id) for worker_id in unmatched)
        return unmatched - {w.id for w in rows if w is not None and w.state == ONLINE}

    def set_drain(
        self, worker_id: str, draining: bool, degraded: str, running_jobs: int
    ) -> None:
        """Record what a worker answered to a drain, before its next heartbeat
        (and over any heartbeat received before now, see :meth:`heartbeats`)."""
        self._run(
            self.sql.set_drain,
            {
                "draining": bool(draining),
                "degraded": degraded,
                "running_jobs": running_jobs,
                "now": time.time(),
                "id": worker_id,
            },
        )

    def deregister(self, worker_id: str) -> None:
        self._run(self.sql.deregister, {"now": time.time(), "id": worker_id})

    def get_worker(self, worker_id: str) -> WorkerRow | None:
        row = self._one(self.sql.get_worker, {"id": worker_id})
        return _worker(row) if row else None

    def find_worker(self, ref: str) -> WorkerRow | None:
        """The worker whose id or, failing that, whose name is ``ref``."""
        row = self._one(self.sql.find_worker, {"ref": ref})
        return _worker(row) if row else None

    def find_worker_and_ended_job(
        self, ref: str, job_id: str
    ) -> tuple[WorkerRow | None, dict | None]:
        """:meth:`find_worker` and that worker's :meth:`ended_job` in one
        query: a status request's reads in one round trip to the database."""
        row = self._one(self.sql.find_worker_ended_job, {"ref": ref, "job_id": job_id})
        if row is None:
            return None, None
        row = dict(row)
        ended = row.pop("ended")
        return _worker(row), None if ended is None else json.loads(ended)

    def list_workers(self) -> list[WorkerRow]:
        return [_worker(r) for r in self._all(self.sql.list_workers)]

    def heard_from(self, now: float, timeout: float) -> int:
        """Online workers heard from within their timeout (``timeout`` or
        their own, the longer): the whole fleet, whichever scheduler they
        heartbeat to."""
        row = self._one(self.sql.heard_from, {"now": now, "timeout": timeout})
        return int(row["n"]) if row is not None else 0

    # -- job index --------------------------------------------------------------

    def record_job(self, status: dict, group_id: str | None = None) -> None:
        """Add a job the scheduler started, with the status the worker gave."""
        self._run(
            self.sql.record_job,
            {
                "job_id": status["job_id"],
                "worker_id": status["worker_id"],
                "group_id": group_id,
                "now": time.time(),
                "state": status["state"],
                "status": json.dumps(status),
            },
        )

    def update_job(self, status: dict) -> None:
        """Keep the last status seen of a job the scheduler knows.

        An ended job's status is final: a status of it that is older (one
        that an earlier call saw running, written late) does not replace it.
        """
        self._run(
            self.sql.update_job,
            {
                "state": status["state"],
                "status": json.dumps(status),
                "now": time.time(),
                "job_id": status["job_id"],
            },
        )

    def ended_job(self, worker_id: str, job_id: str) -> dict | None:
        """The final status of the worker's job if the index saw it end.

        A worker never changes the status of a job that ended, so this
        answers for the worker (its retention may even have removed the job
        since).
        """
        row = self._one(self.sql.ended_job, {"job_id": job_id, "worker_id": worker_id})
        return None if row is None else json.loads(row["status"])

    def worker_jobs(self, worker_id: str, limit: int = 1000) -> list[dict]:
        """Last known statuses of a worker's jobs, newest first."""
        rows = self._all(self.sql.worker_jobs, {"worker_id": worker_id, "limit": limit})
        return [_status(r) for r in rows]

    def job_counts(self) -> dict[str, int]:
        return {r["state"]: r["n"] for r in self._all(self.sql.job_counts)}

    # -- groups ---------------------------------------------------------------

    def create_group(self, group_id: str, request: dict, errors: list[dict]) -> None:
        self._run(
            self.sql.create_group,
            {
                "group_id": group_id,
                "now": time.time(),
                "request": json.dumps(request),
                "errors": json.dumps(errors),
            },
        )

    def set_group_errors(self, group_id: str, errors: list[dict]) -> None:
        self._run(
            self.sql.set_group_errors,
            {"errors": json.dumps(errors), "group_id": group_id},
        )

    def get_group(self, group_id: str) -> tuple[dict, list[dict], list[dict]] | None:
        """The group's request, its errors and its jobs' last known statuses."""

        def read(conn):
            row = conn.execute(self.sql.get_group, {"group_id": group_id}).fetchone()
            if row is None:
                return None, []
            return row, conn.execute(
                self.sql.group_jobs, {"group_id": group_id}
            ).fetchall()

        row, jobs = self._retrying(read)
        if row is None:
            return None
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


def _status(row: Row) -> dict:
    status = json.loads(row["status"])
    status["recorded_at"] = timestamp(row["updated_at"])
    return status


def _worker(row: Row) -> WorkerRow:
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
