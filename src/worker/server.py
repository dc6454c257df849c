"""The worker process: gRPC server, job runner and registration together.

Its life is :class:`jobgate.lifecycle.Service`'s; what is its own: the job
runner before the gRPC server, the metrics listener and the registration
beside it, ready once registered. On the way out it deregisters and stops
its jobs while the gRPC server still answers (a caller asking about a job
meanwhile gets its answer, a start is refused as the worker shuts down).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc

from jobgate import identity
from jobgate.lifecycle import Service
from jobgate.tls import Credentials
from jobgate.v1 import worker_pb2_grpc
from worker.config import WorkerConfig
from worker.registration import Registrar
from worker.runner import JobRunner
from worker.servicer import WorkerServicer

# How long the worker waits for systemd to say whether it restarts.
RESTART_QUERY_TIMEOUT_S = 5.0
# Only the scheduler of the cluster may drive a worker.
POLICY = {"/jobgate.v1.Worker/": {identity.SCHEDULER}}


class WorkerService(Service):
    stopping_status = "deregistering and stopping jobs"

    def __init__(self, cfg: WorkerConfig, ready_file: Path | None = None):
        super().__init__(cfg.worker.cluster, POLICY, cfg.grpc, cfg.tls, ready_file)
        self.cfg = cfg
        self.runner: JobRunner | None = None
        self.registrar: Registrar | None = None

    def prepare(self, creds: Credentials) -> None:
        self.creds = creds
        self.runner = JobRunner(self.cfg.jobs, self.cfg.worker.name)

    def add_servicers(self, server: grpc.Server) -> None:
        servicer = WorkerServicer(
            self.runner, self.cfg.jobs.follow_keepalive_s, self.cfg.grpc.max_streams
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)

    def start(self, grpc_port: int) -> None:
        cfg, runner = self.cfg, self.runner
        self.grpc_port = grpc_port
        self.address = f"{cfg.worker.advertise_host}:{grpc_port}"
        self.metrics_port = None
        if cfg.metrics.bind:
            from worker import metrics

            self.metrics_port = metrics.serve(cfg.metrics.bind, runner.running_count)
            self.log.info(
                "metrics on http://%s/metrics (port %d)",
                cfg.metrics.bind,
                self.metrics_port,
            )
        self.log.info("advertising the gRPC server as %s", self.address)
        self.registrar = Registrar(
            cfg,
            self.creds,
            self.address,
            runner.running_count,
            cfg.jobs.max_concurrent,
            self.stop_requested,
            degraded=runner.degraded,
            enforceable_limits=tuple(runner.enforcer.enforceable()),
            draining=lambda: runner.drain.state is not None,
        )
        runner.health.on_change(lambda reason: self.registrar.nudge())
        runner.drain.on_change(lambda state: self.registrar.nudge())
        self.notifier.status(
            f"registering with the scheduler at {', '.join(cfg.scheduler.all)}"
        )

    def wait_ready(self) -> dict | None:
        # Retries until registered, or until the worker is asked to stop.
        self.registrar.start()
        if not self.registrar.registered:
            return None
        return {
            "grpc_port": self.grpc_port,
            "address": self.address,
            "worker_id": self.registrar.worker_id,
            "metrics_port": self.metrics_port,
        }

    def status(self) -> str:
        running = self.runner.running_count()
        jobs = f"{running} job{'s' if running != 1 else ''} running"
        if self.runner.degraded():
            jobs += f"; degraded: {self.runner.degraded()}"
        if not self.registrar.registered:
            where = ", ".join(self.cfg.scheduler.all)
            return f"not registered with {where}; {jobs}"
        name, worker_id = self.cfg.worker.name, self.registrar.worker_id
        return f"registered as {name} ({worker_id}), {jobs}"

    def healthy(self) -> bool:
        return self.runner.responsive()

    def stop_before_grpc(self) -> None:
        keep = self.cfg.jobs.keep_on_restart and restart_pending()
        if keep:
            self.log.info("systemd restarts the worker: its kept jobs go on running")
        if self.registrar is not None:
            self.registrar.stop()
        if self.runner is not None:
            self.runner.shutdown(keep_jobs=keep)


def own_unit() -> str:
    """The systemd service this process runs in ("" if none)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                for part in reversed(line.strip().split(":", 2)[-1].split("/")):
                    if part.endswith(".service"):
                        return part
    except OSError:
        pass
    return ""


def restart_pending() -> bool:
    """Whether systemd stops the worker in order to start it again.

    ``systemctl restart`` (an Ansible handler, a package upgrade) queues one
    job of type ``restart`` for the unit; it runs, as that type, for as long
    as the unit stops. ``systemctl stop`` and a package removal queue a
    ``stop``. Outside systemd, or if systemd cannot be asked, the answer is
    no: the jobs are stopped, as they always were.
    """
    unit = own_unit()
    if not unit or "INVOCATION_ID" not in os.environ:
        return False
    try:
        out = subprocess.run(
            ["systemctl", "list-jobs", "--plain", "--no-legend", "--no-pager", unit],
            capture_output=True,
            text=True,
            timeout=RESTART_QUERY_TIMEOUT_S,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit and fields[2] == "restart":
            return True
    return False


def serve(cfg: WorkerConfig, ready_file: Path | None = None) -> int:
    return WorkerService(cfg, ready_file).run()
