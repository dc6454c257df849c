"""The scheduler's gRPC service: workers register, heartbeat and deregister.

The ``ServerGuard`` lets only worker certificates of the cluster in; here each
call is further tied to the caller's own name, so a worker can register only
as itself and heartbeat or deregister only its own id.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable

from jobgate import grpc_guard, identity
from jobgate.config import parse_hostport
from jobgate.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SchedulerUnavailable,
)
from jobgate.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler.config import SchedulerConfig, WorkersSection
from scheduler.store import MAX_DEGRADED_CHARS, ONLINE, Store

log = logging.getLogger(__name__)

POLICY = {"/jobgate.v1.Scheduler/": {identity.WORKER}}

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_LABELS = 64
MAX_LABEL_CHARS = 256
# How often the workers that count towards the heartbeat rate (those heard
# from within their timeout) are counted again.
RECOUNT_S = 1.0
# Heartbeats are refused (UNAVAILABLE, so that workers fail over) once the
# flushes have failed, or one has hung, for this many flush intervals, and
# for this share of the heartbeat timeout: a flush slowed down by a busy
# machine is no reason to move a fleet, and a worker that moves then still
# has most of its timeout to reach another scheduler.
UNWRITTEN_FLUSHES = 3
UNWRITTEN_TIMEOUT_SHARE = 0.25
# While heartbeats cannot be written, a warning this often.
WARN_EVERY_S = 30.0


class Pacing:
    """The heartbeat interval handed to each worker, and its timeout.

    Every online worker sends one heartbeat per interval, so a fleet of N
    sends N / interval a second. The interval is the configured one until
    that would exceed ``max_heartbeats_per_s``; beyond, it grows with the
    fleet (N / max_heartbeats_per_s), so the load on this process stays
    bounded however many workers there are. Each interval handed out is up
    to ``heartbeat_jitter`` longer, at random, so heartbeats spread out
    instead of arriving in waves; a worker whose interval grows gets its
    first longer one anywhere between its old and its new interval, so a
    fleet whose interval just grew does not keep its old rhythm with gaps.

    A worker's timeout keeps the configured proportion to the interval it
    was given, so a worker told to heartbeat less often is not declared
    unreachable for it.
    """

    def __init__(
        self,
        cfg: WorkersSection,
        uniform: Callable[[float, float], float] = random.uniform,
    ):
        self.min_interval = cfg.heartbeat_interval_s
        self.ratio = cfg.heartbeat_timeout_s / cfg.heartbeat_interval_s
        self.max_rate = cfg.max_heartbeats_per_s
        self.jitter = cfg.heartbeat_jitter
        self._uniform = uniform

    def base(self, workers: int) -> float:
        """The interval at which ``workers`` send at most the rate aimed at."""
        return max(self.min_interval, workers / self.max_rate)

    def interval(self, base: float, previous: float) -> float:
        """An interval for a worker whose last one was paced at ``previous``."""
        low = min(previous, base)
        high = base * (1.0 + self.jitter)
        return self._uniform(low, high) if high > low else base

    def timeout(self, interval: float) -> float:
        return interval * self.ratio


class Heartbeats:
    """Heartbeats gathered in memory and written in one transaction per flush.

    With thousands of workers, one database write per heartbeat would queue
    them behind each other; a flush every ``interval`` seconds writes them
    all at once. Readers see a heartbeat at most that much later.
    """

    def __init__(
        self,
        store: Store,
        interval: float,
        offline: Callable[[set[str]], None] = lambda ids: None,
    ):
        self.store = store
        self.interval = interval
        # Told the workers whose beats found them not online in the database
        # (another scheduler took their deregistration).
        self._offline = offline
        self._pending: dict[str, tuple[float, int, float, str, bool]] = {}
        # time.monotonic() of the first of the flushes failing since the last
        # that worked, or None; and of the start of the flush under way
        self.failing_since: float | None = None
        self._flushing_since: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="heartbeats", daemon=True
        )
        self._thread.start()

    def record(
        self,
        worker_id: str,
        running_jobs: int,
        timeout: float,
        degraded: str = "",
        draining: bool = False,
    ) -> None:
        with self._lock:
            self._pending[worker_id] = (
                time.time(),
                running_jobs,
                timeout,
                degraded,
                draining,
            )

    def flush(self) -> None:
        """Write the beats gathered; those it could not write are kept for
        the next flush, unless a newer beat of the same worker came meanwhile."""
        with self._lock:
            beats, self._pending = self._pending, {}
        self._flushing_since = time.monotonic()
        try:
            gone = self.store.heartbeats(beats)
        except Exception:
            with self._lock:
                self._pending = beats | self._pending
                if self.failing_since is None:
                    self.failing_since = self._flushing_since
            raise
        finally:
            self._flushing_since = None
        self.failing_since = None
        if gone:
            self._offline(gone)

    def failing_for(self) -> float:
        """How long the flushes have been failing, or the one under way
        taking (a database that stopped answering holds it until the
        connection counts as lost); 0 while they work."""
        since = [t for t in (self.failing_since, self._flushing_since) if t]
        return time.monotonic() - min(since) if since else 0.0

    def _run(self) -> None:
        warned = 0.0
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except SchedulerUnavailable as exc:
                # Once when it starts, then every WARN_EVERY_S while it lasts.
                if time.monotonic() - warned >= WARN_EVERY_S:
                    warned = time.monotonic()
                    log.warning(
                        "writing heartbeats failed for %.1fs: %s",
                        self.failing_for(),
                        exc.message,
                    )
            except Exception:  # noqa: BLE001 - keep flushing; the next may work
                log.exception("writing heartbeats failed")
            else:
                warned = 0.0

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()


class MembershipServicer(scheduler_pb2_grpc.SchedulerServicer):
    """Register, Heartbeat, Deregister.

    This process is the only one that changes workers' membership, so it keeps
    who is who (id -> name, online) in memory and answers heartbeats without
    reading the database. It also keeps, per worker, the interval it was last
    paced at and when its heartbeat is overdue, to count the workers that
    heartbeat and hand out intervals that keep their rate bounded.
    """

    def __init__(
        self, cfg: SchedulerConfig, store: Store, pacing: Pacing | None = None
    ):
        self.cfg = cfg
        self.store = store
        self.pacing = pacing or Pacing(cfg.workers)
        self.heartbeats = Heartbeats(
            store, cfg.workers.heartbeat_flush_s, self._went_offline
        )
        self._unwritten_limit = max(
            UNWRITTEN_FLUSHES * cfg.workers.heartbeat_flush_s,
            UNWRITTEN_TIMEOUT_SHARE * cfg.workers.heartbeat_timeout_s,
        )
        self._lock = threading.Lock()
        self._workers: dict[str, tuple[str, bool]] = {}
        # worker id -> the base interval it was last paced at
        self._paced: dict[str, float] = {}
        # worker id -> time.monotonic() after which it is overdue
        self._deadlines: dict[str, float] = {}
        now, mono = time.time(), time.monotonic()
        for w in store.list_workers():
            self._workers[w.id] = (w.name, w.state == ONLINE)
            if w.state != ONLINE:
                continue
            timeout = w.timeout_s(cfg.workers.heartbeat_timeout_s)
            self._deadlines[w.id] = mono + (w.last_seen_at + timeout - now)
            # Never below the configured interval, which may have been raised.
            self._paced[w.id] = max(
                self.pacing.min_interval, timeout / self.pacing.ratio
            )
        self._active = sum(1 for d in self._deadlines.values() if d > mono)
        self._recount_at = mono + RECOUNT_S

    def _went_offline(self, ids: set[str]) -> None:
        """Forget as online the workers the database has offline: their next
        heartbeat here is answered with ``reregister``."""
        mono = time.monotonic()
        with self._lock:
            for worker_id in ids:
                name, online = self._workers.get(worker_id, ("", False))
                if not online:
                    continue
                self._workers[worker_id] = (name, False)
                self._paced.pop(worker_id, None)
                if self._deadlines.pop(worker_id, 0.0) > mono:
                    self._active -= 1
                log.warning(
                    "worker %s is offline in the state database (deregistered "
                    "through another scheduler?); it must register again",
                    name or worker_id,
                    extra={"WORKER_ID": worker_id},
                )

    def _caller(self, context) -> str:
        ident = grpc_guard.caller(context, self.cfg.cluster.name)
        assert ident is not None and ident.role == identity.WORKER  # ServerGuard
        return ident.name

    def active_workers(self) -> int:
        """Online workers heard from within their timeout (recounted each second).

        Counted in the database: with several schedulers sharing it, each
        paces for the whole fleet, not for its share of the heartbeats. The
        count is never below the workers heard from here (heartbeats reach
        the database only with the next flush); a database that cannot be
        read leaves those alone counted.
        """
        now = time.monotonic()
        if now >= self._recount_at and self._lock.acquire(blocking=False):
            try:
                self._recount_at = now + RECOUNT_S
                deadlines = list(self._deadlines.values())
                here = sum(1 for d in deadlines if d > now)
                try:
                    fleet = self.store.heard_from(
                        time.time(), self.cfg.workers.heartbeat_timeout_s
                    )
                except Exception:  # noqa: BLE001 - pace on what is known here
                    log.warning("counting the workers in the database failed")
                    fleet = 0
                self._active = max(here, fleet)
            finally:
                self._lock.release()
        return self._active

    def _pace(self, low: float, joining: bool = False) -> tuple[float, float, float]:
        """(base, interval, timeout) to hand a worker last paced at ``low``."""
        base = self.pacing.base(self.active_workers() + joining)
        interval = self.pacing.interval(base, low)
        return base, interval, self.pacing.timeout(interval)

    def _note(
        self, worker_id: str, base: float, timeout: float, name: str | None = None
    ) -> None:
        """Record the pace a worker was given and count it as heard from.

        ``name`` (at registration) marks the worker online; otherwise a worker
        that deregistered meanwhile is left alone, so it is not counted again.
        """
        now = time.monotonic()
        with self._lock:
            if name is not None:
                self._workers[worker_id] = (name, True)
            elif not self._workers.get(worker_id, ("", False))[1]:
                return
            if self._deadlines.get(worker_id, 0.0) <= now:
                self._active += 1  # it was not counted any more
            self._paced[worker_id] = base
            self._deadlines[worker_id] = now + timeout

    def _own(self, context, worker_id: str, action: str):
        name = self._caller(context)
        row = self.store.get_worker(worker_id)
        if row is None:
            return name, None
        if row.name != name:
            raise PermissionDenied(
                f"worker {name!r} may not {action} worker {row.name!r}"
            )
        return name, row

    def Register(self, request, context):
        name = self._caller(context)
        if request.name != name:
            raise PermissionDenied(
                f"the certificate names worker {name!r}; it cannot register as "
                f"{request.name!r}"
            )
        if UUID_RE.match(name):
            raise InvalidArgument(
                f"worker name {name!r} looks like a worker id; names must not, "
                "so that every reference to a worker is unambiguous"
            )
        try:
            parse_hostport(request.address)
        except ValueError as exc:
            raise InvalidArgument(f"address: {exc}") from None
        labels = dict(request.labels)
        if len(labels) > MAX_LABELS or any(
            len(k) > MAX_LABEL_CHARS or len(v) > MAX_LABEL_CHARS
            for k, v in labels.items()
        ):
            raise InvalidArgument(
                f"labels: at most {MAX_LABELS}, each key and value at most "
                f"{MAX_LABEL_CHARS} characters"
            )
        # The first interval lies anywhere from the shortest to the current
        # one, so a fleet registering at once spreads its heartbeats from the
        # start. The count includes this worker.
        base, interval, timeout = self._pace(self.pacing.min_interval, joining=True)
        row = self.store.register_worker(
            name,
            request.address,
            labels,
            request.capacity,
            request.version,
            heartbeat_timeout_s=timeout,
            enforceable_limits=[str(x)[:32] for x in request.enforceable_limits[:8]],
            previous_id=request.previous_id,
            degraded=request.degraded[:MAX_DEGRADED_CHARS],
            draining=request.draining,
            running_jobs=request.running_jobs,
        )
        self._note(row.id, base, timeout, name)
        log.info(
            "worker %s registered as %s at %s",
            name,
            row.id,
            row.address,
            extra={"WORKER_ID": row.id},
        )
        return scheduler_pb2.RegisterResponse(
            worker_id=row.id, heartbeat_interval_s=interval
        )

    def Heartbeat(self, request, context):
        name = self._caller(context)
        known = self._workers.get(request.worker_id)
        if known is None or not known[1]:
            return scheduler_pb2.HeartbeatResponse(reregister=True)
        if known[0] != name:
            raise PermissionDenied(
                f"worker {name!r} may not heartbeat for worker {known[0]!r}"
            )
        failing = self.heartbeats.failing_for()
        if failing > self._unwritten_limit:
            # Accepted, the beats would be lost with this process, and the
            # worker would be offline for every other scheduler: it had
            # better heartbeat to one that can write them.
            raise SchedulerUnavailable(
                f"this scheduler has not written heartbeats to its state "
                f"database for {failing:.1f}s"
            )
        base, interval, timeout = self._pace(
            self._paced.get(request.worker_id, self.pacing.min_interval)
        )
        self._note(request.worker_id, base, timeout)
        self.heartbeats.record(
            request.worker_id,
            request.running_jobs,
            timeout,
            request.degraded[:MAX_DEGRADED_CHARS],
            request.draining,
        )
        return scheduler_pb2.HeartbeatResponse(heartbeat_interval_s=interval)

    def Deregister(self, request, context):
        name, row = self._own(context, request.worker_id, "deregister")
        if row is None:
            raise NotFound(f"no worker with id {request.worker_id!r}")
        self.store.deregister(row.id)
        with self._lock:
            self._workers[row.id] = (name, False)
            self._paced.pop(row.id, None)
            if self._deadlines.pop(row.id, 0.0) > time.monotonic():
                self._active -= 1
        log.info(
            "worker %s (%s) deregistered", name, row.id, extra={"WORKER_ID": row.id}
        )
        return scheduler_pb2.DeregisterResponse()
