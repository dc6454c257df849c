"""The worker process: gRPC server, job runner and registration together."""

from __future__ import annotations

import logging
from pathlib import Path

from jobgate import identity
from jobgate.notify import Notifier
from jobgate.service import (
    bind_secure,
    grpc_server,
    set_serving,
    stop_event_on_signals,
    write_ready_file,
)
from jobgate.tls import Credentials
from jobgate.v1 import worker_pb2_grpc
from worker.config import WorkerConfig
from worker.registration import Registrar
from worker.runner import JobRunner
from worker.servicer import WorkerServicer

log = logging.getLogger(__name__)

# Only the scheduler of the cluster may drive a worker.
POLICY = {"/jobgate.v1.Worker/": {identity.SCHEDULER}}


def serve(cfg: WorkerConfig, ready_file: Path | None = None) -> int:
    stop = stop_event_on_signals()
    notifier = Notifier()
    creds = Credentials.load(cfg.tls)
    runner = JobRunner(cfg.jobs, cfg.worker.name)
    server, health_servicer = grpc_server(
        cfg.worker.cluster, POLICY, cfg.grpc.max_threads, cfg.grpc.max_message_bytes
    )
    worker_pb2_grpc.add_WorkerServicer_to_server(
        WorkerServicer(runner, cfg.jobs.follow_keepalive_s, cfg.grpc.max_streams),
        server,
    )
    port = bind_secure(server, cfg.grpc.bind, creds)
    server.start()
    set_serving(health_servicer, True)
    address = f"{cfg.worker.advertise_host}:{port}"
    metrics_port = None
    if cfg.metrics.bind:
        from worker import metrics

        metrics_port = metrics.serve(cfg.metrics.bind, runner.running_count)
        log.info(
            "metrics on http://%s/metrics (port %d)", cfg.metrics.bind, metrics_port
        )
    log.info("gRPC server listening on %s (advertised as %s)", cfg.grpc.bind, address)
    registrar = Registrar(
        cfg,
        creds,
        address,
        runner.running_count,
        cfg.jobs.max_concurrent,
        stop,
        degraded=lambda: runner.health.reason,
        enforceable_limits=tuple(runner.enforcer.enforceable()),
    )
    runner.health.on_change(lambda reason: registrar.nudge())
    notifier.status(f"registering with the scheduler at {cfg.scheduler.address}")

    def status() -> str:
        running = runner.running_count()
        jobs = f"{running} job{'s' if running != 1 else ''} running"
        if runner.health.reason:
            jobs += f"; degraded: {runner.health.reason}"
        if not registrar.registered:
            return f"not registered with {cfg.scheduler.address}; {jobs}"
        return f"registered as {cfg.worker.name} ({registrar.worker_id}), {jobs}"

    registrar.start()
    if registrar.registered:
        notifier.ready(status())
        notifier.start_watchdog(runner.responsive, status)
        write_ready_file(
            ready_file,
            {
                "grpc_port": port,
                "address": address,
                "worker_id": registrar.worker_id,
                "metrics_port": metrics_port,
            },
        )
        stop.wait()
    log.info("stopping")
    notifier.stopping("deregistering and stopping jobs")
    set_serving(health_servicer, False)
    registrar.stop()
    runner.shutdown()
    server.stop(grace=2).wait()
    log.info("stopped")
    return 0
