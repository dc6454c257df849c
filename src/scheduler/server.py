"""The scheduler process: gRPC membership server plus the HTTP gateway.

Its life is :class:`jobgate.lifecycle.Service`'s; what is its own: the state
store and the membership servicer before the gRPC server, the HTTP side
(:class:`scheduler.http_child.HttpChild`) beside it, ready once an HTTP
process serves. If the HTTP side fails (gunicorn exits, or its processes keep
exiting), the scheduler stops with exit status 1 so that systemd restarts the
whole service. SIGHUP checks the tokens file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc

from jobgate.lifecycle import Service
from jobgate.tls import Credentials
from jobgate.v1 import scheduler_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.http.auth import TokenFileError, load_tokens
from scheduler.http_child import HttpChild, listen, loopback_target
from scheduler.membership import POLICY, MembershipServicer
from scheduler.store import Store, open_store

STARTUP_TIMEOUT_S = 60.0


class SchedulerService(Service):
    def __init__(
        self, cfg: SchedulerConfig, config_path: Path, ready_file: Path | None = None
    ):
        super().__init__(cfg.cluster.name, POLICY, cfg.grpc, cfg.tls, ready_file)
        self.cfg = cfg
        self.config_path = config_path
        self.http: HttpChild | None = None
        self.membership: MembershipServicer | None = None
        self.store: Store | None = None
        self.grpc_port = 0

    def prepare(self, creds: Credentials) -> None:
        cfg = self.cfg
        try:
            load_tokens(cfg.auth.tokens_file)  # refuse to start on a broken file
        except TokenFileError as exc:
            raise OSError(str(exc)) from None
        self.store = open_store(cfg.state)
        self.store.initialize()
        self.membership = MembershipServicer(cfg, self.store)
        self.listener = listen(cfg.http.bind)
        if cfg.http.scheme == "http":
            self.log.warning(
                "serving the HTTP API as plain HTTP on %s: tokens travel "
                'unencrypted; set [http].scheme = "https" for anything but local use',
                cfg.http.bind,
            )

    def add_servicers(self, server: grpc.Server) -> None:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.membership, server)

    def start(self, grpc_port: int) -> None:
        self.grpc_port = grpc_port
        self.http = HttpChild(
            self.cfg,
            self.config_path,
            self.listener,
            loopback_target(self.cfg.grpc.bind, grpc_port),
        )
        self.notifier.status("starting the HTTP gateway")

    def wait_ready(self) -> dict | None:
        http = self.http
        if not http.wait_ready(STARTUP_TIMEOUT_S):
            reason = "the HTTP gateway did not start; see the messages above"
            if http.failure and not http.exited:
                reason = http.failure  # its processes keep exiting
            self.fail(reason)
            return None
        self.log.info(
            "HTTP API listening on %s://%s (port %d)",
            self.cfg.http.scheme,
            self.cfg.http.bind,
            http.port,
        )
        http.on_failure(self.fail)
        return {"http_port": http.port, "grpc_port": self.grpc_port, "pid": os.getpid()}

    def ready_status(self) -> str:
        return (
            f"serving HTTP on port {self.http.port}, gRPC on port {self.grpc_port} "
            f"for cluster {self.cfg.cluster.name}"
        )

    def status(self) -> str:
        now = time.time()
        states = [
            w.effective_state(now, self.cfg.workers.heartbeat_timeout_s)
            for w in self.store.list_workers()
        ]
        counts = ", ".join(
            f"{states.count(s)} {s}" for s in ("online", "unreachable", "offline")
        )
        return (
            f"workers: {counts}; HTTP on port {self.http.port} "
            f"({self.http.processes_up} of {self.cfg.http.processes} processes up), "
            f"gRPC on port {self.grpc_port}"
        )

    def healthy(self) -> bool:
        return self.http.healthy() and self.store.healthy()

    def reload(self) -> None:
        # gunicorn's processes re-read the tokens file as soon as it changes;
        # SIGHUP (systemctl reload) checks it and says what they will see.
        try:
            tokens = load_tokens(self.cfg.auth.tokens_file)
            self.log.info(
                "tokens file %s: %d tokens in force",
                self.cfg.auth.tokens_file,
                len(tokens),
            )
        except TokenFileError as exc:
            self.log.error("%s; no token is valid until it is fixed", exc)

    def stop_before_grpc(self) -> None:
        # The HTTP side calls this process's gRPC server: it stops first.
        if self.http is not None:
            self.http.stop()

    def close(self) -> None:
        if self.membership is not None:
            self.membership.heartbeats.close()
        if self.store is not None:
            self.store.close()


def serve(cfg: SchedulerConfig, config_path: Path, ready_file: Path | None) -> int:
    return SchedulerService(cfg, config_path, ready_file).run()
