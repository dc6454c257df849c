"""What the HTTP API does, independent of HTTP: the scheduler's use cases.

Both route families (``/v1/...`` and the original ``/start``, ``/stop``,
``/query``, ``/stream``) call these functions, which resolve the worker,
make the gRPC call on the channel kept for it, and render plain dicts.
Errors are :mod:`jobgate.errors` exceptions (:class:`WorkerCalls` converts a
worker's); ``scheduler.http.errors`` maps them to HTTP in one table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobgate import identity, model
from jobgate.errors import NotFound, Unavailable
from jobgate.jobstate import ExitReason, JobState
from jobgate.tls import secure_aio_channel
from jobgate.v1 import common_pb2, worker_pb2
from scheduler import metrics
from scheduler.config import SchedulerConfig
from scheduler.relay import Relay
from scheduler.store import (
    MAX_DEGRADED_CHARS,
    ONLINE,
    Busy,
    Store,
    WorkerRow,
    timestamp,
)
from scheduler.worker_calls import (
    ChannelPool,
    SharedCalls,
    WorkerCalls,
    request_metadata,
)

log = logging.getLogger(__name__)


_ENUMS = {"JobState": JobState, "ExitReason": ExitReason}


def _job_field(f: model.Field) -> Callable[[common_pb2.Job], object]:
    """How one field of the model's Job is read from the gRPC message.

    A field that may be null is null when the message leaves it unset: a
    field with presence (``optional``) not set, any other at its zero value
    (an empty ``idempotency_key``, ``EXIT_REASON_UNSPECIFIED``).
    """
    name = f.name
    convert: Callable[[object], object] = lambda v: v  # noqa: E731
    if f.type == "timestamp":
        convert = timestamp
    elif f.type in _ENUMS:
        enum = _ENUMS[f.type]
        convert = lambda v: enum.from_proto(v).value  # noqa: E731
    elif f.is_array:
        convert = list
    elif f.type in model.SHAPES:
        names = model.SHAPES[f.type].names
        # A message's fields at 0 are unset: those set only.
        convert = lambda m: {n: v for n in names if (v := getattr(m, n))}  # noqa: E731
    elif f.type not in ("string", "uuid", "integer"):
        raise TypeError(f"Job.{name}: no rendering for type {f.type!r}")
    if not f.null:
        return lambda job: convert(getattr(job, name))
    if common_pb2.Job.DESCRIPTOR.fields_by_name[name].has_presence:
        return lambda job: convert(getattr(job, name)) if job.HasField(name) else None
    return lambda job: convert(v) if (v := getattr(job, name)) else None


# The model's Job, field by field; the scheduler adds what is not on the
# wire (worker_id).
_JOB_FIELDS = [(f.name, _job_field(f) if f.wire else None) for f in model.JOB.fields]


def _no_worker(ref: str) -> NotFound:
    return NotFound(f"no worker with id or name {ref!r}; GET /v1/workers lists them")


def job_to_dict(job: common_pb2.Job, worker_id: str) -> dict:
    """A job as the HTTP API renders it (``jobgate.model.JOB``)."""
    return {name: read(job) if read else worker_id for name, read in _JOB_FIELDS}


class UseCases:
    """The scheduler's use cases, as coroutines of the HTTP process's loop.

    Reads of the state database that cannot wait on a lock (WAL readers
    never do) run on the loop, and so do writes while no other process is
    writing; a write that would have to wait for a lock, and large reads,
    run on a thread (:func:`asyncio.to_thread`), so a database busy with
    another process's write stalls one request, never the loop and every
    connection on it.
    """

    def __init__(
        self,
        cfg: SchedulerConfig,
        store: Store,
        pool: ChannelPool,
        grpc_target: str | None = None,
    ):
        self.cfg = cfg
        self.store = store
        self.pool = pool
        self._last_seen: dict[str, tuple[str, int]] = {}
        # (worker ref, job id) -> the job's final status, oldest first
        self._ended_jobs: dict[tuple[str, str], dict] = {}
        self._rows = RecentRows(cfg.state.cached_worker_s)
        self._calls = SharedCalls()
        w = cfg.workers
        # Shared follow streams of this process (scheduler.relay).
        self.relay = Relay(
            w.follow_window_bytes,
            w.follow_buffer_bytes,
            w.rpc_timeout_s,
            w.follow_write_bytes,
        )
        self._grpc_target = grpc_target
        self._health = None

    async def _write(self, fn: Callable, *args) -> None:
        """A write to the state database: on the loop unless it must wait.

        The hop to a thread and back cost a start 0.35 ms in the start
        scenario (a scratch build that timed each step: 0.5 against 0.17 ms
        for the job index insert), as the job's own process competes for the
        cores just then.
        """
        try:
            self.store.without_waiting(fn, *args)
        except Busy:
            await asyncio.to_thread(fn, *args)

    async def readiness_problems(self) -> list[str]:
        """What keeps the scheduler from serving; empty when it is ready."""
        problems = []
        if not await asyncio.to_thread(self.store.writable):
            problems.append(f"the state database {self.store.location} is not writable")
        if self._grpc_target is None:
            problems.append("this process does not know the scheduler's gRPC address")
            return problems
        if self._health is None:
            channel = secure_aio_channel(
                self._grpc_target,
                self.pool.creds,
                identity.dns_name(self.cfg.cluster.name, identity.SCHEDULER),
            )
            self._health = health_pb2_grpc.HealthStub(channel)
        try:
            resp = await self._health.Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
            if resp.status != health_pb2.HealthCheckResponse.SERVING:
                problems.append("the gRPC server is not serving")
        except grpc.RpcError as exc:
            problems.append(f"the gRPC server does not answer: {exc.code().name}")
        return problems

    # -- workers ------------------------------------------------------------------

    def _state(self, w: WorkerRow, now: float | None = None) -> str:
        return w.effective_state(
            now if now is not None else time.time(),
            self.cfg.workers.heartbeat_timeout_s,
        )

    def worker_to_dict(self, w: WorkerRow, now: float | None = None) -> dict:
        state = self._state(w, now)
        return {
            "id": w.id,
            "name": w.name,
            "address": w.address,
            "state": state,
            "labels": w.labels,
            "registered_at": timestamp(w.registered_at),
            "last_seen_at": timestamp(w.last_seen_at),
            "running_jobs": w.running_jobs if state == ONLINE else 0,
            "capacity": w.capacity,
            "version": w.version,
            # Why an online worker starts no jobs now; null when it does.
            "degraded": (w.degraded or None) if state == ONLINE else None,
            "enforceable_limits": list(w.enforceable_limits),
            # As the worker last said: a drained worker comes back drained.
            "draining": w.draining,
        }

    async def list_workers(self) -> list[dict]:
        def render() -> list[dict]:
            now = time.time()
            return [self.worker_to_dict(w, now) for w in self.store.list_workers()]

        return await asyncio.to_thread(render)

    def find(self, ref: str) -> WorkerRow:
        worker = self.store.find_worker(ref)
        if worker is None:
            raise _no_worker(ref)
        return worker

    def get_worker(self, ref: str) -> dict:
        return self.worker_to_dict(self.find(ref))

    def _reachable(self, ref: str) -> tuple[WorkerRow, WorkerCalls]:
        return self._stub(self.find(ref))

    def _stub(self, worker: WorkerRow) -> tuple[WorkerRow, WorkerCalls]:
        """The worker and its stub, or Unavailable unless it is online."""
        state = self._state(worker)
        if state != ONLINE:
            raise Unavailable(
                f"worker {worker.name!r} is {state}; retry when it is online",
                self.cfg.workers.retry_after_s,
            )
        return worker, self.pool.stub(worker)

    async def drain_worker(
        self, ref: str, enable: bool, requested_by: str = "", wait: bool = False
    ) -> tuple[dict, bool]:
        """Drain the worker (or lift its drain); returns it and whether it is idle.

        With ``wait``, a drain answers once the worker runs no job, or after
        ``[workers].max_wait_s`` (then not idle). What the worker answered is
        written at once, so the worker as the API shows it needs no heartbeat.
        """
        worker, stub = self._reachable(ref)
        wait_s = self.cfg.workers.max_wait_s if wait and enable else 0.0
        state = await stub.SetDrain(
            worker_pb2.SetDrainRequest(
                enable=enable, requested_by=requested_by, wait_s=wait_s
            ),
            timeout=wait_s + self.cfg.workers.rpc_timeout_s,
            metadata=request_metadata(),
        )
        await self._write(
            self.store.set_drain,
            worker.id,
            state.draining,
            state.degraded[:MAX_DEGRADED_CHARS],
            state.running_jobs,
        )
        log.info(
            "worker %s %s by %s; %d jobs running",
            worker.name,
            "drained" if state.draining else "undrained",
            requested_by or "an unnamed client",
            state.running_jobs,
            extra={"WORKER_ID": worker.id},
        )
        return self.get_worker(worker.id), state.running_jobs == 0

    # -- jobs ---------------------------------------------------------------------

    async def start_job(
        self,
        ref: str,
        command: str,
        path: str,
        args: list[str],
        timeout_s: int = 0,
        idempotency_key: str = "",
        group_id: str | None = None,
        limits: dict[str, int] | None = None,
    ) -> tuple[dict, bool]:
        """Start a job; returns its status and whether it already existed."""
        worker, stub = self._reachable(ref)
        # A start with an idempotency key may be the retry of one the worker
        # already took: only the worker can answer it with that job (it
        # refuses a new one while drained or degraded all the same).
        if (worker.draining or worker.degraded) and not idempotency_key:
            raise Unavailable(
                f"worker {worker.name!r} is drained and starts no jobs "
                f"({worker.degraded or 'draining'}); start the job on another "
                "worker, or once the drain is lifted"
                if worker.draining
                else f"worker {worker.name!r} is degraded and starts no jobs: "
                f"{worker.degraded}",
                self.cfg.workers.retry_after_s,
            )
        resp = await stub.StartJob(
            worker_pb2.StartJobRequest(
                command=command,
                path=path,
                args=args,
                timeout_s=timeout_s,
                idempotency_key=idempotency_key,
                limits=common_pb2.Limits(**(limits or {})),
            ),
            timeout=self.cfg.workers.rpc_timeout_s,
            metadata=request_metadata(),
        )
        status = job_to_dict(resp.job, worker.id)
        await self._write(self.store.record_job, status, group_id)
        if not resp.existing:
            metrics.JOBS_STARTED.labels(worker.name).inc()
            log.info(
                "started job %s on %s: %s %s",
                status["job_id"],
                worker.name,
                status["command"],
                status["path"],
                extra={"JOB_ID": status["job_id"], "WORKER_ID": worker.id},
            )
        return status, resp.existing

    async def list_jobs(self, ref: str) -> tuple[list[dict], bool]:
        """The worker's jobs, and whether they come from the scheduler's record.

        When the worker cannot be asked, the answer is the last status the
        scheduler saw of each job it started there, marked as possibly stale.
        """
        worker = self.find(ref)
        if self._state(worker) != ONLINE:
            return await asyncio.to_thread(self.store.worker_jobs, worker.id), True
        stub = self.pool.stub(worker)
        resp = await stub.ListJobs(
            worker_pb2.ListJobsRequest(),
            timeout=self.cfg.workers.rpc_timeout_s,
            metadata=request_metadata(),
        )
        return [job_to_dict(j, worker.id) for j in resp.jobs], False

    def _ended(self, ref: str, job_id: str) -> tuple[WorkerRow, dict | None]:
        """The worker, and the job's final status if the index saw it end.

        An ended job's status never changes: once seen, the index answers for
        it, whatever the state of its worker now. That is one lookup instead
        of a call to the worker: ``GET`` of a finished job (bench scenario 2)
        went from 562 / 650 to 1,508 / 1,392 req/s with 8 / 32 clients when
        it came in. The worker and the job are read in one query: one round
        trip to PostgreSQL instead of two (172 against 143 + 118 µs on a
        local server), which brought that GET with 8 clients from 2,128 to
        3,135 req/s on PostgreSQL (back to back with SQLite's 3,910).
        """
        worker, ended = self.store.find_worker_and_ended_job(ref, job_id)
        if worker is None:
            raise _no_worker(ref)
        self._rows.put(ref, worker)
        if ended is not None:
            self._keep_ended((ref, job_id), ended)
        return worker, ended

    def _keep_ended(self, key: tuple[str, str], status: dict) -> None:
        """Keep a final status in memory (``[state].cached_ended_jobs`` of
        them, the oldest dropped first): a client polling a job that ended
        then reads no database at all."""
        limit = self.cfg.state.cached_ended_jobs
        if not limit:
            return
        while len(self._ended_jobs) >= limit:
            del self._ended_jobs[next(iter(self._ended_jobs))]
        self._ended_jobs[key] = status

    async def _job_status(
        self,
        ref: str,
        job_id: str,
        ask: Callable[[WorkerRow, WorkerCalls], Awaitable[dict]],
    ) -> dict:
        """A job's status: from memory or the index once it ended, else what
        ``ask`` gets from its worker.

        A status request for a running job first asks the worker whose row it
        read within ``[state].cached_worker_s``, without reading the database
        again: the read was a fifth of the HTTP process's time for ``GET`` of
        a running job on PostgreSQL. That ``GET`` (bench scenario 2's, 8
        clients, 4 back-to-back pairs of 6 s runs) went from 1,500-1,840 to
        2,500-2,750 req/s on PostgreSQL, and from 1,860-2,720 to 2,410-2,830
        on SQLite. A row gone stale costs one more call: when the worker
        cannot be reached or does not know the job, the row and the index are
        read again, and the worker asked again only if it moved or registered
        anew since.
        """
        key = (ref, job_id)
        ended = self._ended_jobs.get(key)
        if ended is not None:
            return ended
        cached = self._rows.get(ref)
        failed: NotFound | Unavailable | None = None
        if cached is not None and self._state(cached) == ONLINE:
            try:
                return self._final(key, await ask(cached, self.pool.stub(cached)))
            except (NotFound, Unavailable) as exc:
                failed = exc
        worker, ended = self._ended(ref, job_id)
        if ended is not None:
            return ended
        worker, stub = self._stub(worker)
        if failed and cached and worker.same_registration(cached):
            raise failed
        return self._final(key, await ask(worker, stub))

    def _final(self, key: tuple[str, str], status: dict) -> dict:
        """``status``, kept in memory when final (it is in the index by now)."""
        if status["state"] != JobState.RUNNING.value:
            self._keep_ended(key, status)
        return status

    async def get_job(self, ref: str, job_id: str) -> dict:
        async def ask(worker: WorkerRow, stub: WorkerCalls) -> dict:
            async def call() -> dict:
                job = await stub.GetJob(
                    worker_pb2.GetJobRequest(job_id=job_id),
                    timeout=self.cfg.workers.rpc_timeout_s,
                    metadata=request_metadata(),
                )
                return await self._seen(job_to_dict(job, worker.id))

            return await self._calls.share((worker.id, job_id), call)

        return await self._job_status(ref, job_id, ask)

    async def _seen(self, status: dict) -> dict:
        """Record a job's status in the index when it changed since last seen."""
        key = (status["state"], status["output_bytes"])
        if self._last_seen.get(status["job_id"]) != key:
            await self._write(self.store.update_job, status)
            if len(self._last_seen) > 10_000:
                self._last_seen.clear()
            self._last_seen[status["job_id"]] = key
        return status

    async def wait_job(self, ref: str, job_id: str) -> dict:
        """The job's status once it ended, or after ``[workers].max_wait_s``."""
        wait_s = self.cfg.workers.max_wait_s

        async def ask(worker: WorkerRow, stub: WorkerCalls) -> dict:
            job = await stub.WaitJob(
                worker_pb2.WaitJobRequest(job_id=job_id, timeout_s=wait_s),
                timeout=wait_s + self.cfg.workers.rpc_timeout_s,
                metadata=request_metadata(),
            )
            return await self._seen(job_to_dict(job, worker.id))

        return await self._job_status(ref, job_id, ask)

    async def stop_job(self, ref: str, job_id: str, requested_by: str = "") -> dict:
        worker, stub = self._reachable(ref)
        job = await stub.StopJob(
            worker_pb2.StopJobRequest(job_id=job_id, requested_by=requested_by),
            timeout=self.cfg.workers.stop_timeout_s,
            metadata=request_metadata(),
        )
        return await self._seen(job_to_dict(job, worker.id))

    async def output(
        self, ref: str, job_id: str, offset: int = 0, follow: bool = False
    ) -> OutputStream:
        """Open the job's output stream; errors surface here, before any byte.

        Followers of one job in this process share one call to the worker
        (see :mod:`scheduler.relay`); a follower starting before what that
        call still keeps, and a read without ``follow``, get a call of their
        own. Either kind of stream is iterated the same way.
        """
        worker, stub = self._reachable(ref)
        metadata = request_metadata()

        def open_call(start: int, timeout_s: float):
            return stub.StreamOutput(
                worker_pb2.StreamOutputRequest(
                    job_id=job_id, offset=start, follow=follow
                ),
                timeout=timeout_s,
                metadata=metadata,
            )

        async def final(msg) -> dict:
            # The end a follower sees is in the index before the follower
            # sees it: a status asked for after it answers from there.
            status = await self._seen(job_to_dict(msg, worker.id))
            return self._final((ref, job_id), status)

        if follow:
            shared = await self.relay.follow(
                (worker.id, worker.address, job_id),
                offset,
                open_call,
                final,
                lambda: stub.diagnose("StreamOutput"),
                worker.id,
                self.cfg.workers.stream_timeout_s,
            )
            if shared is not None:
                return shared  # type: ignore[return-value] - same interface
        stream = OutputStream(
            open_call(offset, self.cfg.workers.stream_timeout_s), worker.id, final
        )
        await stream.first(
            self.cfg.workers.rpc_timeout_s, lambda: stub.diagnose("StreamOutput")
        )
        return stream


class RecentRows:
    """Workers' rows as lately read, each reused for ``ttl_s`` seconds.

    Entries are looked up by the reference a request named the worker with
    (its name or id); expired ones are dropped as the map grows, so it holds
    about the workers asked about within ``ttl_s``, twice at most.
    """

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._rows: dict[str, tuple[float, WorkerRow]] = {}
        self._sweep_at = 1024

    def put(self, ref: str, row: WorkerRow) -> None:
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        if len(self._rows) >= self._sweep_at:
            self._rows = {k: v for k, v in self._rows.items() if v[0] > now}
            self._sweep_at = max(1024, 2 * len(self._rows))
        self._rows[ref] = (now + self.ttl_s, row)

    def get(self, ref: str) -> WorkerRow | None:
        entry = self._rows.get(ref)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]


class OutputStream:
    """A job's output as it arrives from the worker.

    :meth:`first` waits for the first message, so a missing job or a worker
    error becomes an HTTP error status rather than a truncated 200.
    Iterating (``async for``) yields ``(offset, data, skipped)``, ``skipped``
    being bytes the output cap dropped just before ``offset``; an empty
    ``data`` is a keep-alive from a quiet job. :attr:`final` holds the job's
    status once the stream has ended, after ``on_final`` recorded it.
    :meth:`close` cancels the call.
    """

    def __init__(
        self,
        call,
        worker_id: str,
        on_final: Callable[[object], Awaitable[dict]],
    ):
        self._call = call
        self.worker_id = worker_id
        self._on_final = on_final
        self.final: dict | None = None
        self._first = None
        # What consumers iterate; the HTTP layer may wrap it (token checks).
        self.chunks: AsyncIterator[tuple[int, bytes, int]] = self._iterate()

    async def first(
        self, timeout_s: float, diagnose: Callable[[], Awaitable[Exception]]
    ) -> None:
        """Wait for the first message: the worker answers a stream at once
        (data, a keep-alive or the end), so a longer wait means it is busy or
        hung."""
        try:
            msg = await asyncio.wait_for(self._call.read(), timeout_s)
        except TimeoutError:
            self._call.cancel()
            raise await diagnose() from None
        except BaseException:
            self._call.cancel()
            raise
        self._first = None if msg is grpc.aio.EOF else msg

    def __aiter__(self) -> AsyncIterator[tuple[int, bytes, int]]:
        return self.chunks

    async def _iterate(self) -> AsyncIterator[tuple[int, bytes, int]]:
        try:
            msg = self._first
            self._first = None
            while msg is not None:
                if msg.HasField("final"):
                    self.final = await self._on_final(msg.final)
                else:
                    yield msg.offset, msg.data, msg.skipped
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    break
        finally:
            self._call.cancel()

    def close(self) -> None:
        self._call.cancel()
