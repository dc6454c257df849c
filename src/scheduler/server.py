"""The scheduler process: gRPC membership server plus the HTTP gateway.

This process serves gRPC itself (threaded) and runs the HTTP gateway as a
gunicorn child process started with fork+exec, so gunicorn's own forking
never copies gRPC state. It binds the HTTP socket and hands it down, waits
until both halves serve, then tells systemd READY=1. If gunicorn dies, the
scheduler exits with an error so systemd restarts the whole service.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from jobgate.config import parse_hostport
from jobgate.notify import Notifier
from jobgate.service import (
    bind_secure,
    grpc_server,
    set_serving,
    stop_event_on_signals,
    write_ready_file,
)
from jobgate.tls import Credentials
from jobgate.v1 import scheduler_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.http.auth import TokenFileError, load_tokens
from scheduler.membership import POLICY, MembershipServicer
from scheduler.store import Store

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0
SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _listen(bind: str) -> socket.socket:
    host, port = parse_hostport(bind, "bind")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise OSError(f"cannot listen on {bind} for HTTP: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _loopback_target(bind: str, port: int) -> str:
    host, _ = parse_hostport(bind, "bind")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wait_ready(fd: int, child: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        readable, _, _ = select.select([fd], [], [], 0.5)
        if readable and os.read(fd, 64):
            return True
    return False


def _status(cfg: SchedulerConfig, store: Store, http_port: int, grpc_port: int) -> str:
    now = time.time()
    states = [
        w.effective_state(now, cfg.workers.heartbeat_timeout_s)
        for w in store.list_workers()
    ]
    counts = ", ".join(
        f"{states.count(s)} {s}" for s in ("online", "unreachable", "offline")
    )
    return f"workers: {counts}; HTTP on port {http_port}, gRPC on port {grpc_port}"


def serve(cfg: SchedulerConfig, config_path: Path, ready_file: Path | None) -> int:
    stop = stop_event_on_signals()
    notifier = Notifier()
    try:
        load_tokens(cfg.auth.tokens_file)  # refuse to start on a broken tokens file
    except TokenFileError as exc:
        raise OSError(str(exc)) from None

    def on_hup(*_) -> None:
        # gunicorn's processes re-read the tokens file as soon as it changes;
        # SIGHUP (systemctl reload) checks it and says what they will see.
        try:
            tokens = load_tokens(cfg.auth.tokens_file)
            log.info(
                "tokens file %s: %d tokens in force", cfg.auth.tokens_file, len(tokens)
            )
        except TokenFileError as exc:
            log.error("%s; no token is valid until it is fixed", exc)

    signal.signal(signal.SIGHUP, on_hup)
    store = Store(cfg.state.path, cfg.state.busy_timeout_s)
    store.initialize()
    creds = Credentials.load(cfg.tls)
    server, health_servicer = grpc_server(
        cfg.cluster.name, POLICY, cfg.grpc.max_threads, cfg.grpc.max_message_bytes
    )
    membership = MembershipServicer(cfg, store)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(membership, server)
    grpc_port = bind_secure(server, cfg.grpc.bind, creds)
    sock = _listen(cfg.http.bind)
    if cfg.http.scheme == "http":
        log.warning(
            "serving the HTTP API as plain HTTP on %s: tokens travel unencrypted; "
            'set [http].scheme = "https" for anything but local use',
            cfg.http.bind,
        )
    http_port = sock.getsockname()[1]
    server.start()
    set_serving(health_servicer, True)
    log.info("gRPC server listening on %s (port %d)", cfg.grpc.bind, grpc_port)

    metrics_dir = cfg.state.path.parent / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counters start at zero
    metrics_dir.mkdir(parents=True)
    ready_r, ready_w = os.pipe()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scheduler.http_server",
            str(config_path),
            "--listen-fd",
            str(sock.fileno()),
            "--ready-fd",
            str(ready_w),
            "--grpc-target",
            _loopback_target(cfg.grpc.bind, grpc_port),
            "--parent-pid",
            str(os.getpid()),
        ],
        pass_fds=(sock.fileno(), ready_w),
        env={
            # Only this process talks to systemd (NotifyAccess=main).
            **{k: v for k, v in os.environ.items() if k not in SYSTEMD_ONLY},
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        },
    )
    os.close(ready_w)
    sock.close()  # gunicorn owns the listener now
    notifier.status("starting the HTTP gateway")
    child_exited = threading.Event()

    def watch_child() -> None:
        child.wait()
        child_exited.set()
        stop.set()

    threading.Thread(target=watch_child, name="http-watch", daemon=True).start()
    failed = False
    if _wait_ready(ready_r, child, STARTUP_TIMEOUT_S):
        os.close(ready_r)
        log.info(
            "HTTP API listening on %s://%s (port %d)",
            cfg.http.scheme,
            cfg.http.bind,
            http_port,
        )
        notifier.ready(
            f"serving HTTP on port {http_port}, gRPC on port {grpc_port} "
            f"for cluster {cfg.cluster.name}"
        )
        notifier.start_watchdog(
            lambda: child.poll() is None and store.writable(),
            lambda: _status(cfg, store, http_port, grpc_port),
        )
        write_ready_file(
            ready_file,
            {"http_port": http_port, "grpc_port": grpc_port, "pid": os.getpid()},
        )
        stop.wait()
    else:
        os.close(ready_r)
        log.error("the HTTP gateway did not start; see the messages above")
        failed = True
    if child_exited.is_set() and not failed:
        log.error("the HTTP gateway exited unexpectedly (code %s)", child.returncode)
        failed = True
    notifier.stopping("stopping")
    set_serving(health_servicer, False)
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(cfg.http.graceful_timeout_s + 5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    server.stop(grace=2).wait()
    membership.heartbeats.close()
    log.info("stopped")
    return 1 if failed else 0
