"""The scheduler's gRPC service: workers register, heartbeat and deregister.

The ``ServerGuard`` lets only worker certificates of the cluster in; here each
call is further tied to the caller's own name, so a worker can register only
as itself and heartbeat or deregister only its own id.
"""

from __future__ import annotations

import logging
import re
import threading
import time

from jobgate import identity
from jobgate.config import parse_hostport
from jobgate.errors import InvalidArgument, NotFound, PermissionDenied
from jobgate.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.store import ONLINE, Store

log = logging.getLogger(__name__)

POLICY = {"/jobgate.v1.Scheduler/": {identity.WORKER}}

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_LABELS = 64
MAX_LABEL_CHARS = 256


class Heartbeats:
    """Heartbeats gathered in memory and written in one transaction per flush.

    With thousands of workers, one database write per heartbeat would queue
    them behind each other; a flush every ``interval`` seconds writes them
    all at once. Readers see a heartbeat at most that much later.
    """

    def __init__(self, store: Store, interval: float):
        self.store = store
        self.interval = interval
        self._pending: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="heartbeats", daemon=True
        )
        self._thread.start()

    def record(self, worker_id: str, running_jobs: int) -> None:
        with self._lock:
            self._pending[worker_id] = (time.time(), running_jobs)

    def flush(self) -> None:
        with self._lock:
            beats, self._pending = self._pending, {}
        self.store.heartbeats(beats)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep flushing; the next may work
                log.exception("writing heartbeats failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()


class MembershipServicer(scheduler_pb2_grpc.SchedulerServicer):
    """Register, Heartbeat, Deregister.

    This process is the only one that changes workers' membership, so it keeps
    who is who (id -> name, online) in memory and answers heartbeats without
    reading the database.
    """

    def __init__(self, cfg: SchedulerConfig, store: Store):
        self.cfg = cfg
        self.store = store
        self.heartbeats = Heartbeats(store, cfg.workers.heartbeat_flush_s)
        self._workers: dict[str, tuple[str, bool]] = {
            w.id: (w.name, w.state == ONLINE) for w in store.list_workers()
        }

    def _caller(self, context) -> str:
        ident = identity.peer_identity(context, self.cfg.cluster.name)
        assert ident is not None and ident.role == identity.WORKER  # ServerGuard
        return ident.name

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
        row = self.store.register_worker(
            name, request.address, labels, request.capacity, request.version
        )
        self._workers[row.id] = (name, True)
        log.info(
            "worker %s registered as %s at %s",
            name,
            row.id,
            row.address,
            extra={"WORKER_ID": row.id},
        )
        return scheduler_pb2.RegisterResponse(
            worker_id=row.id,
            heartbeat_interval_s=self.cfg.workers.heartbeat_interval_s,
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
        self.heartbeats.record(request.worker_id, request.running_jobs)
        return scheduler_pb2.HeartbeatResponse()

    def Deregister(self, request, context):
        name, row = self._own(context, request.worker_id, "deregister")
        if row is None:
            raise NotFound(f"no worker with id {request.worker_id!r}")
        self.store.deregister(row.id)
        self._workers[row.id] = (name, False)
        log.info(
            "worker %s (%s) deregistered", name, row.id, extra={"WORKER_ID": row.id}
        )
        return scheduler_pb2.DeregisterResponse()
