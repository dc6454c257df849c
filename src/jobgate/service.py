"""Process plumbing shared by the scheduler's and the worker's services."""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from jobgate.guard import ServerGuard
from jobgate.tls import SERVER_OPTIONS, Credentials


def grpc_server(
    cluster: str,
    policy: dict,
    max_threads: int,
    max_message_bytes: int,
) -> tuple[grpc.Server, health.HealthServicer]:
    """A threaded gRPC server guarded by role checks, with the health service."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="rpc"),
        interceptors=[ServerGuard(cluster, policy)],
        options=list(SERVER_OPTIONS)
        + [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
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


def stop_event_on_signals(*signums: int) -> threading.Event:
    """An event set by any of ``signums`` (SIGTERM and SIGINT by default)."""
    event = threading.Event()
    for s in signums or (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: event.set())
    return event
