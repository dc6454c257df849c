"""The worker's side of membership: register, heartbeat, deregister.

Registration retries with capped exponential backoff, so a worker started
before its scheduler waits for it instead of exiting. Once registered, a
heartbeat thread reports in on the interval the scheduler handed out, and
adopts the new interval each heartbeat's answer carries (the scheduler
lengthens it as the fleet grows); if the scheduler answers that it no longer
knows this worker, the worker registers again.

Several schedulers may share one database (``[scheduler].addresses``). The
worker talks to one at a time: when it does not answer (its process is gone,
the network is cut), the next one is asked at once, so a heartbeat reaches a
scheduler within one interval. Each heartbeat's deadline is then at most
half the interval, leaving the other half for the next scheduler. Any of
them knows the worker (its row is in the shared database); one that does not
asks it to register again, and it does, there.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

import grpc

from jobgate import __version__, identity
from jobgate.tls import Credentials, secure_channel
from jobgate.v1 import scheduler_pb2, scheduler_pb2_grpc
from worker.config import WorkerConfig

log = logging.getLogger(__name__)

# A scheduler that fails a call with these did not answer it: the next one
# is asked (several schedulers). Others are answers (a refusal, a bug) that
# another scheduler would give too.
UNANSWERED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# The shortest deadline of a heartbeat, however short the interval.
MIN_RPC_S = 0.5


class Registrar:
    def __init__(
        self,
        cfg: WorkerConfig,
        creds: Credentials,
        address: str,
        running_jobs: Callable[[], int],
        capacity: int,
        stop: threading.Event | None = None,
        degraded: Callable[[], str] = lambda: "",
        enforceable_limits: tuple[str, ...] = (),
        draining: Callable[[], bool] = lambda: False,
    ):
        self.cfg = cfg
        self.address = address
        self.running_jobs = running_jobs
        self.capacity = capacity
        self.degraded = degraded
        self.draining = draining
        self.enforceable_limits = list(enforceable_limits)
        self.worker_id = ""
        self.heartbeat_interval = 5.0
        # Setting it (e.g. from a signal handler) also ends registration retries.
        self._stop = stop or threading.Event()
        self._registered = threading.Event()
        # Set to heartbeat before the interval is over (see nudge()).
        self._nudged = threading.Event()
        self._thread: threading.Thread | None = None
        self.addresses = cfg.scheduler.all
        self._current = 0  # the scheduler talked to
        server_name = identity.dns_name(cfg.worker.cluster, identity.SCHEDULER)
        self._channels = [secure_channel(a, creds, server_name) for a in self.addresses]
        self._stubs = [scheduler_pb2_grpc.SchedulerStub(c) for c in self._channels]

    @property
    def address_in_use(self) -> str:
        """The scheduler the worker talks to now."""
        return self.addresses[self._current]

    @property
    def _stub(self):
        return self._stubs[self._current]

    def _fail_over(self, exc: grpc.RpcError) -> bool:
        """Move on to the next scheduler if this one did not answer; True if so."""
        if len(self.addresses) == 1 or exc.code() not in UNANSWERED:
            return False
        failed = self.address_in_use
        self._current = (self._current + 1) % len(self.addresses)
        log.warning(
            "the scheduler at %s does not answer (%s); trying the one at %s",
            failed,
            exc.code().name,
            self.address_in_use,
        )
        return True

    def _call(self, method: str, request, timeout: float):
        """Call ``method`` on the scheduler in use, failing over to each other
        one in turn while they do not answer."""
        for attempt in range(len(self.addresses)):
            try:
                return getattr(self._stub, method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                if attempt == len(self.addresses) - 1 or not self._fail_over(exc):
                    raise
        raise AssertionError("unreachable")

    def _heartbeat_timeout(self) -> float:
        timeout = self.cfg.scheduler.rpc_timeout_s
        if len(self.addresses) > 1:
            timeout = min(timeout, max(self.heartbeat_interval / 2, MIN_RPC_S))
        return timeout

    def _register_once(self) -> None:
        resp = self._call(
            "Register",
            scheduler_pb2.RegisterRequest(
                name=self.cfg.worker.name,
                address=self.address,
                labels=dict(self.cfg.worker.labels),
                capacity=self.capacity,
                version=__version__,
                previous_id=self.worker_id,
                enforceable_limits=self.enforceable_limits,
                degraded=self.degraded(),
                draining=self.draining(),
                running_jobs=self.running_jobs(),
            ),
            self.cfg.scheduler.rpc_timeout_s,
        )
        self.worker_id = resp.worker_id
        self.heartbeat_interval = resp.heartbeat_interval_s or self.heartbeat_interval
        log.info(
            "registered with the scheduler at %s as %s (%s)",
            self.address_in_use,
            self.cfg.worker.name,
            self.worker_id,
            extra={"WORKER_ID": self.worker_id},
        )
        self._registered.set()

    def register(self) -> bool:
        """Register, retrying with backoff until it works or :meth:`stop` is called."""
        delay = self.cfg.scheduler.retry_initial_s
        while not self._stop.is_set():
            try:
                self._register_once()
                return True
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    log.error("the scheduler refused registration: %s", exc.details())
                else:
                    log.warning(
                        "registration failed (%s: %s); retrying in %.1fs",
                        code.name,
                        exc.details(),
                        delay,
                    )
            # Full jitter keeps a restarted fleet from re-registering in lockstep.
            self._stop.wait(random.uniform(0.5, 1.0) * delay)  # noqa: S311
            delay = min(delay * 2, self.cfg.scheduler.retry_max_s)
        return False

    def start(self) -> None:
        """Register (blocking), then heartbeat in the background."""
        if self.register():
            self._thread = threading.Thread(
                target=self._heartbeat_loop, name="heartbeat", daemon=True
            )
            self._thread.start()

    def nudge(self) -> None:
        """Heartbeat now: what the scheduler must know changed (health, drain)."""
        self._nudged.set()

    def _heartbeat_loop(self) -> None:
        while True:
            self._nudged.wait(self.heartbeat_interval)
            self._nudged.clear()
            if self._stop.is_set():
                return
            try:
                resp = self._call(
                    "Heartbeat",
                    scheduler_pb2.HeartbeatRequest(
                        worker_id=self.worker_id,
                        running_jobs=self.running_jobs(),
                        degraded=self.degraded(),
                        draining=self.draining(),
                    ),
                    self._heartbeat_timeout(),
                )
            except grpc.RpcError as exc:
                log.warning("heartbeat failed: %s: %s", exc.code().name, exc.details())
                continue
            if resp.reregister:
                log.warning("the scheduler asked this worker to register again")
                self.register()
            elif resp.heartbeat_interval_s > 0:
                self._adopt_interval(resp.heartbeat_interval_s)

    def _adopt_interval(self, interval: float) -> None:
        interval = min(interval, threading.TIMEOUT_MAX)
        previous, self.heartbeat_interval = self.heartbeat_interval, interval
        # Jitter moves it a little on every heartbeat; say so only when it
        # changes by more than that.
        if abs(interval - previous) > 0.5 * previous:
            log.info(
                "the scheduler set the heartbeat interval to %.1fs (was %.1fs)",
                interval,
                previous,
                extra={"WORKER_ID": self.worker_id},
            )

    def stop(self) -> None:
        """Stop heartbeating and deregister (best effort, bounded by the deadline)."""
        self._stop.set()
        self._nudged.set()
        if self._thread is not None:
            self._thread.join(self.cfg.scheduler.rpc_timeout_s + 1)
        if self._registered.is_set():
            try:
                self._call(
                    "Deregister",
                    scheduler_pb2.DeregisterRequest(worker_id=self.worker_id),
                    self.cfg.scheduler.rpc_timeout_s,
                )
                log.info(
                    "deregistered from the scheduler",
                    extra={"WORKER_ID": self.worker_id},
                )
            except grpc.RpcError as exc:
                log.warning(
                    "deregistration failed: %s: %s", exc.code().name, exc.details()
                )
        for channel in self._channels:
            channel.close()

    @property
    def registered(self) -> bool:
        return self._registered.is_set()
