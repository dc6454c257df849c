"""The scheduler's gRPC service: workers register, heartbeat and deregister.

The ``ServerGuard`` lets only worker certificates of the cluster in; here each
call is further tied to the caller's own name, so a worker can register only
as itself and heartbeat or deregister only its own id.
"""

from __future__ import annotations

import logging
import re

from jobgate import identity
from jobgate.config import parse_hostport
from jobgate.errors import InvalidArgument, NotFound, PermissionDenied
from jobgate.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.store import Store

log = logging.getLogger(__name__)

POLICY = {"/jobgate.v1.Scheduler/": {identity.WORKER}}

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_LABELS = 64
MAX_LABEL_CHARS = 256


class MembershipServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, cfg: SchedulerConfig, store: Store):
        self.cfg = cfg
        self.store = store

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
        _, row = self._own(context, request.worker_id, "heartbeat for")
        if row is None or not self.store.heartbeat(
            request.worker_id, request.running_jobs
        ):
            return scheduler_pb2.HeartbeatResponse(reregister=True)
        return scheduler_pb2.HeartbeatResponse()

    def Deregister(self, request, context):
        name, row = self._own(context, request.worker_id, "deregister")
        if row is None:
            raise NotFound(f"no worker with id {request.worker_id!r}")
        self.store.deregister(row.id)
        log.info(
            "worker %s (%s) deregistered", name, row.id, extra={"WORKER_ID": row.id}
        )
        return scheduler_pb2.DeregisterResponse()
