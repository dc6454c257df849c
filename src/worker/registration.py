"""The worker's side of membership: register, heartbeat, deregister.

Registration retries with capped exponential backoff, so a worker started
before its scheduler waits for it instead of exiting. Once registered, a
heartbeat thread reports in on the interval the scheduler handed out, and
adopts the new interval each heartbeat's answer carries (the scheduler
lengthens it as the fleet grows); if the scheduler answers that it no longer
knows this worker, the worker registers again.
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
        self._channel = secure_channel(
            cfg.scheduler.address,
            creds,
            identity.dns_name(cfg.worker.cluster, identity.SCHEDULER),
        )
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    def _register_once(self) -> None:
        resp = self._stub.Register(
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
            timeout=self.cfg.scheduler.rpc_timeout_s,
        )
        self.worker_id = resp.worker_id
        self.heartbeat_interval = resp.heartbeat_interval_s or self.heartbeat_interval
        log.info(
            "registered with the scheduler at %s as %s (%s)",
            self.cfg.scheduler.address,
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
                resp = self._stub.Heartbeat(
                    scheduler_pb2.HeartbeatRequest(
                        worker_id=self.worker_id,
                        running_jobs=self.running_jobs(),
                        degraded=self.degraded(),
                        draining=self.draining(),
                    ),
                    timeout=self.cfg.scheduler.rpc_timeout_s,
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
                self._stub.Deregister(
                    scheduler_pb2.DeregisterRequest(worker_id=self.worker_id),
                    timeout=self.cfg.scheduler.rpc_timeout_s,
                )
                log.info(
                    "deregistered from the scheduler",
                    extra={"WORKER_ID": self.worker_id},
                )
            except grpc.RpcError as exc:
                log.warning(
                    "deregistration failed: %s: %s", exc.code().name, exc.details()
                )
        self._channel.close()

    @property
    def registered(self) -> bool:
        return self._registered.is_set()
