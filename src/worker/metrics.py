"""Prometheus metrics of a worker, served on ``[metrics].bind`` when set."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from jobgate.config import parse_hostport

RUNNING_JOBS = Gauge("jobgate_worker_running_jobs", "Jobs running now")
SPAWN_SECONDS = Histogram(
    "jobgate_worker_spawn_seconds",
    "Time to start a job's process, from request to running",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
OUTPUT_BYTES = Counter(
    "jobgate_worker_output_bytes_total", "Output bytes jobs wrote (before the cap)"
)
JOB_SECONDS = Histogram(
    "jobgate_worker_job_duration_seconds",
    "How long finished jobs ran, by exit reason",
    ["exit_reason"],
    buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400, 86400),
)
JOBS_FINISHED = Counter(
    "jobgate_worker_jobs_finished_total",
    "Jobs finished, by exit reason",
    ["exit_reason"],
)


def serve(bind: str, running: Callable[[], int]) -> int:
    """Serve /metrics on ``bind`` (plain HTTP); returns the bound port."""
    RUNNING_JOBS.set_function(running)
    host, port = parse_hostport(bind, "bind")
    server, _ = start_http_server(port, addr=host)
    return server.server_port
