"""Prometheus metrics after known traffic, across two gunicorn processes."""

from __future__ import annotations

import concurrent.futures
import re
import time
import urllib.request

import pytest
from conftest import Api, cluster_of_its_own


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of a text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def sample(values: dict[str, float], name: str, **labels: str) -> float:
    """The sample of ``name`` whose labels include ``labels`` (0 if absent)."""
    total = 0.0
    for key, value in values.items():
        m = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", key)
        if m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


@pytest.fixture(scope="module")
def metered(scripts_dir):
    with cluster_of_its_own(
        "metrics",
        scripts_dir,
        http_processes=2,
        worker_extra='[metrics]\nbind = "127.0.0.1:0"\n',
        # The tests below count the calls status reads make to the worker:
        # each read takes the worker's row from the index, none asks the
        # worker with a row read for an earlier request.
        state_extra="cached_worker_s = 0",
    ) as c:
        yield c


def test_scheduler_metrics_add_up_across_processes(metered):
    api = Api(metered)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: api.get("/v1/workers")[0], range(60)))
    assert statuses == [200] * 60
    assert api.get("/v1/workers/nope")[0] == 404
    job = api.start("worker-1", "hello.sh")
    out = api.output("worker-1", job["job_id"])

    status, headers, body = api.get("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    values = samples(body.decode())
    assert (
        sample(
            values,
            "jobgate_http_requests_total",
            route="/v1/workers",
            method="GET",
            status="200",
        )
        == 60
    )
    assert (
        sample(
            values,
            "jobgate_http_requests_total",
            route="/v1/workers/{worker}",
            status="404",
        )
        == 1
    )
    assert (
        sample(
            values,
            "jobgate_http_request_duration_seconds_count",
            route="/v1/workers",
            method="GET",
        )
        == 60
    )
    assert sample(values, "jobgate_jobs_started_total", worker="worker-1") == 1
    assert (
        sample(
            values,
            "jobgate_worker_calls_total",
            worker="worker-1",
            method="StartJob",
            code="OK",
        )
        == 1
    )
    assert sample(values, "jobgate_output_bytes_streamed_total") == len(out)
    assert sample(values, "jobgate_output_streams_open") == 0
    assert sample(values, "jobgate_workers", state="online") == 1
    assert sample(values, "jobgate_jobs") >= 1
    # Both gunicorn processes answered some of the 60 requests.
    pids = {
        line.split()[3]
        for line in (metered.logs / "scheduler.log").read_text().splitlines()
        if "scheduler.http.access" in line and '"GET /v1/workers"' in line
    }
    assert len(pids) == 2
    # One access line per request, the app's: gunicorn's own is off.
    assert "gunicorn.access" not in (metered.logs / "scheduler.log").read_text()


def test_metrics_need_a_token(metered):
    assert Api(metered).get("/metrics", token="")[0] == 401


def test_worker_metrics_listener(metered):
    api = Api(metered)
    job = api.start("worker-1", "mixed.sh", ["2"])
    out = api.output("worker-1", job["job_id"])
    port = metered.worker_info["worker-1"]["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        values = samples(r.read().decode())
    assert sample(values, "jobgate_worker_running_jobs") == 0
    assert (
        sample(values, "jobgate_worker_jobs_finished_total", exit_reason="failed") >= 1
    )
    assert sample(values, "jobgate_worker_job_duration_seconds_count") >= 1
    assert sample(values, "jobgate_worker_spawn_seconds_count") >= 1
    assert sample(values, "jobgate_worker_output_bytes_total") >= len(out)


def _get_job_calls(api: Api) -> float:
    values = samples(api.get("/metrics")[2].decode())
    return sample(values, "jobgate_worker_calls_total", method="GetJob")


def test_an_ended_jobs_status_comes_from_the_index_not_the_worker(metered):
    api = Api(metered)
    running = api.start("worker-1", "sleep.sh", ["30"])
    ended = api.start("worker-1", "hello.sh")
    api.output("worker-1", ended["job_id"])  # follows it to its end
    path = f"/v1/workers/worker-1/jobs/{ended['job_id']}"
    # The first status after the end comes from the worker and is recorded.
    status, _, final = api.get(path)
    assert status == 200 and final["state"] == "succeeded"
    before = _get_job_calls(api)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: api.get(path), range(20)))
    assert all(s == 200 and b == final for s, _, b in answers)
    status, _, body = api.post(
        "/query", {"worker_id": "worker-1", "job_id": ended["job_id"]}
    )
    assert status == 200 and body["done"] is True
    assert _get_job_calls(api) == before
    # A running job's status is the worker's, every time.
    for _ in range(3):
        assert api.get(f"/v1/workers/worker-1/jobs/{running['job_id']}")[0] == 200
    assert _get_job_calls(api) == before + 3
    assert api.post(f"/v1/workers/worker-1/jobs/{running['job_id']}/stop")[0] == 200


def _worker_finished(metered) -> float:
    port = metered.worker_info["worker-1"]["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        values = samples(r.read().decode())
    return sample(values, "jobgate_worker_jobs_finished_total")


def test_the_end_a_plain_output_read_saw_is_recorded_in_the_index(metered):
    api = Api(metered)
    finished = _worker_finished(metered)
    job = api.start("worker-1", "hello.sh")
    # Wait for the end on the worker's side, without asking the scheduler.
    deadline = time.monotonic() + 10
    while _worker_finished(metered) == finished and time.monotonic() < deadline:
        time.sleep(0.02)
    # A read without follow gets a stream of its own (not the shared relay).
    assert api.output("worker-1", job["job_id"], query="") == b"hello from worker-1\n"
    before = _get_job_calls(api)
    status, _, body = api.get(f"/v1/workers/worker-1/jobs/{job['job_id']}")
    assert status == 200 and body["state"] == "succeeded"
    assert _get_job_calls(api) == before  # answered from the index
