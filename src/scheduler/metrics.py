"""Prometheus metrics of the scheduler, correct across gunicorn processes.

The HTTP processes record into prometheus_client's multiprocess files (the
directory is handed down in ``PROMETHEUS_MULTIPROC_DIR`` by the scheduler's
main process, which empties it at start); a scrape adds them up. What the
state database knows (workers by state, jobs by state) is read at scrape
time, so it is right whichever process answers.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from scheduler.store import Store

CONTENT_TYPE = CONTENT_TYPE_LATEST

HTTP_REQUESTS = Counter(
    "jobgate_http_requests_total",
    "HTTP requests answered, by route, method and status",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "jobgate_http_request_duration_seconds",
    "Time to answer an HTTP request (to the first byte for streams)",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WORKER_CALLS = Counter(
    "jobgate_worker_calls_total",
    "gRPC calls to workers, by worker, method and status code",
    ["worker", "method", "code"],
)
JOBS_STARTED = Counter(
    "jobgate_jobs_started_total", "Jobs started through the scheduler", ["worker"]
)
OUTPUT_BYTES = Counter(
    "jobgate_output_bytes_streamed_total", "Job output bytes sent to HTTP clients"
)
OPEN_STREAMS = Gauge(
    "jobgate_output_streams_open",
    "Output streams open to HTTP clients",
    multiprocess_mode="livesum",
)


class StateCollector:
    """Workers and jobs by state, read from the state database at scrape time."""

    def __init__(self, store: Store, heartbeat_timeout_s: float):
        self.store = store
        self.timeout = heartbeat_timeout_s

    def collect(self):
        now = time.time()
        workers = GaugeMetricFamily(
            "jobgate_workers", "Known workers by state", labels=["state"]
        )
        counts = {"online": 0, "unreachable": 0, "offline": 0}
        for w in self.store.list_workers():
            counts[w.effective_state(now, self.timeout)] += 1
        for state, n in counts.items():
            workers.add_metric([state], n)
        yield workers
        jobs = GaugeMetricFamily(
            "jobgate_jobs",
            "Jobs started through the scheduler, by last state seen",
            labels=["state"],
        )
        for state, n in self.store.job_counts().items():
            jobs.add_metric([state], n)
        yield jobs


def render(store: Store, heartbeat_timeout_s: float) -> bytes:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:  # a single process (an app built outside the scheduler service)
        for metric in (
            HTTP_REQUESTS,
            HTTP_LATENCY,
            WORKER_CALLS,
            JOBS_STARTED,
            OUTPUT_BYTES,
            OPEN_STREAMS,
        ):
            registry.register(metric)
    registry.register(StateCollector(store, heartbeat_timeout_s))
    return generate_latest(registry)


class Middleware:
    """Falcon middleware counting and timing every request by route, from the
    request's first byte (see :func:`scheduler.http.middleware.received_at`)."""

    async def process_response(self, req, resp, resource, req_succeeded) -> None:
        from scheduler.http.middleware import received_at

        route = req.uri_template or "unmatched"
        HTTP_LATENCY.labels(route, req.method).observe(
            time.perf_counter() - received_at(req)
        )
        HTTP_REQUESTS.labels(route, req.method, resp.status_code).inc()
