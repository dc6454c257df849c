"""The life of a jobgate service process, from start-up to exit.

The scheduler and the worker live the same life; :class:`Service` is that
life, and each of them fills in its own steps
(:class:`scheduler.server.SchedulerService`, :class:`worker.server.WorkerService`).
:meth:`Service.run` goes through them in this order:

1. SIGTERM and SIGINT become a request to stop; SIGHUP calls
   :meth:`Service.reload` if the service has one.
2. The TLS credentials are loaded; the service prepares what its gRPC
   servicers need (:meth:`Service.prepare`) and adds them to a threaded gRPC
   server that already has the role guard and the health service.
3. The server is bound with mutual TLS, started and marked SERVING.
4. The service starts what runs beside the gRPC server (:meth:`Service.start`)
   and waits until it can really serve (:meth:`Service.wait_ready`).
5. systemd is told READY=1 with a STATUS= line; a thread pings the watchdog
   while :meth:`Service.healthy` holds and keeps STATUS= current; the ready
   file is written; then the process waits for a stop: a signal, or
   :meth:`Service.fail`.
6. It stops: STOPPING=1, health NOT_SERVING, what must end while the gRPC
   server still answers (:meth:`Service.stop_before_grpc`), the gRPC server
   with a short grace, then the rest (:meth:`Service.close`).

A service asked to stop before it is ready skips step 5. If a step after the
gRPC server started raises, step 6 still runs before the error goes up to
the command line. The exit status is 0, or 1 after :meth:`Service.fail`.

Outside systemd (no ``NOTIFY_SOCKET``) the notifications are no-ops, so the
same code runs under ``make run``, the tests and systemd.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Protocol

import grpc
import sdnotify
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from jobgate.grpc_guard import ServerGuard
from jobgate.tls import SERVER_OPTIONS, Credentials, TLSConfig

log = logging.getLogger(__name__)

# Calls under way when the gRPC server stops get this long to finish.
GRPC_STOP_GRACE_S = 2.0


class GrpcSettings(Protocol):
    """The ``[grpc]`` settings both services have."""

    bind: str
    max_threads: int
    max_message_bytes: int


class Notifier:
    """``sd_notify`` messages to systemd; no-ops without ``NOTIFY_SOCKET``."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None
        self._status = ""
        self._stop = threading.Event()

    def _send(self, text: str) -> None:
        if self._n is not None:
            self._n.notify(text)

    def ready(self, status: str = "") -> None:
        self._status = status
        self._send("READY=1\n" + (f"STATUS={status}\n" if status else ""))

    def status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self._send(f"STATUS={status}\n")

    def stopping(self, status: str = "") -> None:
        self._stop.set()
        self._send("STOPPING=1\n" + (f"STATUS={status}\n" if status else ""))

    def start_watchdog(
        self,
        healthy: Callable[[], bool],
        status: Callable[[], str] | None = None,
        every_s: float = 2.0,
    ) -> None:
        """Ping the watchdog while ``healthy()`` holds; refresh STATUS meanwhile.

        Runs every ``every_s`` (at most half of ``WATCHDOG_USEC`` when systemd
        set one), so STATUS stays current and a hung service (``healthy()``
        false, or this thread stuck) is restarted.
        """
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and (not pid or pid == str(os.getpid()))
        interval = min(int(usec) / 2e6, every_s) if watchdog else every_s
        if not self.enabled:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    ok = healthy()
                    if status is not None:
                        self.status(status())
                except Exception:  # noqa: BLE001 - a failing check is "unhealthy"
                    log.exception("health check failed")
                    ok = False
                if ok and watchdog:
                    self._send("WATCHDOG=1\n")
                elif not ok:
                    log.warning("health check failed; not pinging the watchdog")

        threading.Thread(target=loop, name="watchdog", daemon=True).start()


def grpc_server(
    cluster: str, policy: dict, settings: GrpcSettings
) -> tuple[grpc.Server, health.HealthServicer]:
    """A threaded gRPC server guarded by role checks, with the health service."""
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.max_threads, thread_name_prefix="rpc"
        ),
        interceptors=[ServerGuard(cluster, policy)],
        options=list(SERVER_OPTIONS)
        + [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ],
        # No cap here: a call beyond the threads waits for one. Long output
        # streams have their own, lower limit (the worker's max_streams), so
        # short calls always find a thread.
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


def bind_secure(server: grpc.Server, bind: str, creds: Credentials) -> int:
    """Bind ``bind`` with mutual TLS and return the port (port 0 picks one)."""
    try:
        port = server.add_secure_port(bind, creds.server())
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {bind}: {exc}") from None
    if port == 0:
        raise OSError(
            f"cannot listen on {bind} (in use, or not an address of this host)"
        )
    return port


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    health_servicer.set("", status)


def write_ready_file(path: Path | None, info: dict) -> None:
    """Atomically write ``info`` as JSON to ``path`` (for scripts and tests)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


class Service:
    """One service process: its steps, run in the order the module describes.

    A subclass fills in :meth:`prepare`, :meth:`add_servicers`, :meth:`start`,
    :meth:`wait_ready` and what it needs of the rest; :meth:`run` does the
    part every service shares. Messages are logged under the subclass's
    module, so the log says which service speaks.
    """

    #: The STATUS= line that goes with STOPPING=1.
    stopping_status = "stopping"

    def __init__(
        self,
        cluster: str,
        policy: dict,
        grpc_settings: GrpcSettings,
        tls: TLSConfig,
        ready_file: Path | None = None,
    ):
        self.cluster = cluster
        self.policy = policy
        self.grpc_settings = grpc_settings
        self.tls = tls
        self.ready_file = ready_file
        self.notifier = Notifier()
        # Set by SIGTERM, SIGINT or fail(); run() then stops the service.
        self.stop_requested = threading.Event()
        self.failed = False
        self.log = logging.getLogger(type(self).__module__)

    # -- the steps a service fills in --------------------------------------------

    def prepare(self, creds: Credentials) -> None:
        """Open what the gRPC servicers need, before the server exists.

        Raise ``OSError`` or a ``JobgateError`` for what the operator must fix:
        the command line prints it and exits 1.
        """

    def add_servicers(self, server: grpc.Server) -> None:
        """Add the service's own servicers to ``server``."""
        raise NotImplementedError

    def start(self, grpc_port: int) -> None:
        """Start what runs beside the gRPC server, which serves by now."""

    def wait_ready(self) -> dict | None:
        """Block until the service can serve; return what the ready file says.

        Return ``None`` if it never will: it was asked to stop, or it called
        :meth:`fail`.
        """
        raise NotImplementedError

    def status(self) -> str:
        """The STATUS= line while serving, refreshed with each watchdog ping."""
        return ""

    def ready_status(self) -> str:
        """The STATUS= line that goes with READY=1."""
        return self.status()

    def healthy(self) -> bool:
        """Whether the watchdog is pinged: false long enough, systemd restarts."""
        return True

    def reload(self) -> None:
        """What SIGHUP does.

        Only a service that overrides it handles SIGHUP; for the others the
        signal keeps its default action.
        """

    def stop_before_grpc(self) -> None:
        """Stop what must end while the gRPC server still answers calls."""

    def close(self) -> None:
        """Release what is left once the gRPC server has stopped."""

    # -- what every service does ---------------------------------------------------

    def fail(self, reason: str) -> None:
        """The service cannot go on: log ``reason``, stop, and exit 1."""
        self.log.error("%s", reason)
        self.failed = True
        self.stop_requested.set()

    def run(self) -> int:
        """Start, serve until asked to stop, stop; returns the exit status."""
        self._handle_signals()
        creds = Credentials.load(self.tls)
        self.prepare(creds)
        server, health_servicer = grpc_server(
            self.cluster, self.policy, self.grpc_settings
        )
        self.add_servicers(server)
        port = bind_secure(server, self.grpc_settings.bind, creds)
        server.start()
        try:
            set_serving(health_servicer, True)
            self.log.info(
                "gRPC server listening on %s (port %d)", self.grpc_settings.bind, port
            )
            self.start(port)
            info = self.wait_ready()
            if info is not None:
                self.notifier.ready(self.ready_status())
                self.notifier.start_watchdog(self.healthy, self.status)
                write_ready_file(self.ready_file, info)
                self.stop_requested.wait()
        finally:
            self._stop(server, health_servicer)
        return 1 if self.failed else 0

    def _handle_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop_requested.set())
        if type(self).reload is not Service.reload:
            signal.signal(signal.SIGHUP, lambda *_: self.reload())

    def _stop(
        self, server: grpc.Server, health_servicer: health.HealthServicer
    ) -> None:
        self.log.info("stopping")
        self.notifier.stopping(self.stopping_status)
        set_serving(health_servicer, False)
        try:
            self.stop_before_grpc()
        finally:
            server.stop(grace=GRPC_STOP_GRACE_S).wait()
            self.close()
        self.log.info("stopped")
