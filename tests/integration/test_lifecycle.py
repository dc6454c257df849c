"""Workers joining and leaving, and clusters that leave no process behind."""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import REPO, Api, cluster_of_its_own, make_public_dir
from test_mtls import START_HELLO, pair, worker_stub

from jobgate.dev.cluster import DevCluster
from jobgate.v1 import worker_pb2


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate, timeout=15.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


@pytest.fixture
def small_cluster(scripts_dir):
    with cluster_of_its_own(
        "lifecycle", scripts_dir, ("worker-a", "worker-b"), http_processes=1
    ) as c:
        yield c


def worker_state(api: Api, name: str) -> str:
    return api.get(f"/v1/workers/{name}")[2]["state"]


def test_worker_deregisters_on_sigterm_and_shows_offline(small_cluster):
    api = Api(small_cluster)
    assert worker_state(api, "worker-a") == "online"
    job = api.start("worker-a", "sleep.sh", ["300"])
    job_pid = job["pid"]
    assert pid_alive(job_pid)

    assert small_cluster.workers["worker-a"].stop() == 0
    assert worker_state(api, "worker-a") == "offline"
    assert worker_state(api, "worker-b") == "online"
    # Its job was stopped with it, not left behind.
    assert wait_for(lambda: not pid_alive(job_pid), timeout=5)
    status, headers, data = api.post(
        "/v1/workers/worker-a/jobs", {"command": "bash", "path": "hello.sh"}
    )
    assert status == 503
    assert int(headers["Retry-After"]) > 0
    assert "offline" in data["description"]


def test_restarted_worker_keeps_its_id_and_history(small_cluster):
    api = Api(small_cluster)
    before = api.get("/v1/workers/worker-b")[2]
    job = api.start("worker-b", "hello.sh")
    api.output("worker-b", job["job_id"])
    small_cluster.workers["worker-b"].stop()
    small_cluster.start_worker("worker-b")
    after = api.get("/v1/workers/worker-b")[2]
    assert after["id"] == before["id"]
    assert after["state"] == "online"
    status, _, status_after = api.get(f"/v1/workers/worker-b/jobs/{job['job_id']}")
    assert status == 200
    assert status_after["state"] == "succeeded"


def test_killed_worker_becomes_unreachable_and_answers_503(small_cluster):
    api = Api(small_cluster)
    small_cluster.workers["worker-a"].signal(signal.SIGKILL)
    # heartbeat_timeout_s is 4 s in the development cluster
    assert wait_for(lambda: worker_state(api, "worker-a") == "unreachable", timeout=10)
    started = time.monotonic()
    status, headers, _ = api.post(
        "/v1/workers/worker-a/jobs", {"command": "bash", "path": "hello.sh"}
    )
    assert status == 503
    assert "Retry-After" in headers
    assert time.monotonic() - started < 2
    # The job list still answers, from the scheduler's record, flagged stale.
    status, _, listing = api.get("/v1/workers/worker-a/jobs")
    assert (status, listing["stale"]) == (200, True)
    assert worker_state(api, "worker-b") == "online"


def test_stopping_a_cluster_leaves_no_process(scripts_dir):
    directory = make_public_dir("jobgate-test-leftovers-")
    try:
        with DevCluster(directory, scripts_dir=scripts_dir, http_processes=2) as c:
            api = Api(c)
            job = api.start("worker-1", "tree.sh")
            assert processes_mentioning(str(directory))
            pids = [c.scheduler.pid] + [p.pid for p in c.workers.values()]
        assert not any(pid_alive(p) for p in pids)
        assert processes_mentioning(str(directory)) == []
        assert not pid_alive(job["pid"])
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_make_run_flow_runs_sample_job_and_cleans_up(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "jobgate.dev.run", "--dir", str(run_dir), "--once"],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "1\n2\n3\n4\n5\n" in out
    assert "job succeeded" in out
    env = dict(
        line.removeprefix("export ").split("=", 1)
        for line in (run_dir / "local.env").read_text().splitlines()
    )
    assert env["JOBGATE_URL"].startswith("http://127.0.0.1:")
    assert len(env["JOBGATE_TOKEN"]) >= 32
    assert env["JOBGATE_WORKERS"] == "worker-1,worker-2"
    assert processes_mentioning(str(run_dir)) == []


def test_scheduler_serves_with_two_gunicorn_processes(cluster):
    masters = [
        pid
        for pid in processes_mentioning("scheduler.http_server")
        if str(cluster.dir) in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    assert len(masters) == 3  # the gunicorn master and its two workers
    log = cluster.logs / "scheduler.log"
    start = log.stat().st_size
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda _: cluster.request("GET", "/v1/workers/worker-1")[2], range(200)
            )
        )
    # Whichever process answered, the state it reports is the same.
    states = {json.loads(a)["id"] + json.loads(a)["state"] for a in answers}
    assert len(states) == 1
    with log.open() as f:
        f.seek(start)
        pids = {
            line.split()[3]
            for line in f
            if "scheduler.http.access" in line and "/v1/workers/worker-1" in line
        }
    assert len(pids) == 2


def test_frozen_worker_is_told_apart_from_a_busy_one(small_cluster):
    api = Api(small_cluster)
    # A job still running, so its status must come from the worker (a job
    # already ended when it was started is answered from the job index).
    job = api.start("worker-b", "sleep.sh", ["30"])
    worker = small_cluster.workers["worker-b"]
    worker.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, headers, data = api.get(f"/v1/workers/worker-b/jobs/{job['job_id']}")
        elapsed = time.monotonic() - started
    finally:
        worker.signal(signal.SIGCONT)
    # rpc_timeout_s (5 s in the development cluster) plus the health probe.
    assert elapsed < 8
    assert status == 503, (status, data, elapsed)
    assert "not even its health check" in data["description"]
    assert "Retry-After" in headers
    api.post(f"/v1/workers/worker-b/jobs/{job['job_id']}/stop")


# -- heartbeat pacing ------------------------------------------------------------


@pytest.fixture
def paced_cluster(scripts_dir):
    """Three workers and a scheduler that takes at most 1 heartbeat a second.

    The development cluster's interval is 1 s and its timeout 4 s, so three
    workers stretch the interval to 3 s (timeout 12 s), two to 2 s (8 s).
    """
    directory = make_public_dir("jobgate-test-pacing-")
    c = DevCluster(
        directory,
        scripts_dir=scripts_dir,
        http_processes=1,
        scheduler_extra="max_heartbeats_per_s = 1.0\nheartbeat_jitter = 0.0\n",
    )
    c.start(("worker-a", "worker-b", "worker-c"))
    yield c
    c.stop()
    shutil.rmtree(directory, ignore_errors=True)


def rfc3339(value: str) -> float:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def heartbeat_gaps(api: Api, name: str, seconds: float) -> list[float]:
    """Seconds between the heartbeats of ``name`` seen over ``seconds``."""
    seen: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        last = rfc3339(api.get(f"/v1/workers/{name}")[2]["last_seen_at"])
        if not seen or last != seen[-1]:
            seen.append(last)
        time.sleep(0.05)
    return [b - a for a, b in zip(seen[1:], seen[2:], strict=False)]


def test_heartbeat_interval_follows_the_fleet_and_the_timeout_follows_it(
    paced_cluster,
):
    api = Api(paced_cluster)
    time.sleep(6)  # every worker has heard of the 3 s interval by now
    # (The shortest gap: a slow poll may miss a heartbeat and see a double.)
    gaps = heartbeat_gaps(api, "worker-b", 10)
    assert len(gaps) >= 2, gaps
    assert 2.6 <= min(gaps) <= 3.8, gaps

    # One worker leaves: the other two are told to heartbeat every 2 s.
    assert paced_cluster.workers["worker-c"].stop() == 0
    time.sleep(3.5)
    gaps = heartbeat_gaps(api, "worker-b", 7)
    assert len(gaps) >= 2, gaps
    assert 1.6 <= min(gaps) <= 2.8, gaps

    # A worker that dies is unreachable after its own timeout (8 s for 2 s),
    # not after the configured 4 s, which its heartbeats no longer meet.
    paced_cluster.workers["worker-a"].signal(signal.SIGKILL)
    paced_cluster.workers["worker-a"].proc.wait(5)
    while True:
        w = api.get("/v1/workers/worker-a")[2]
        silent = time.time() - rfc3339(w["last_seen_at"])
        if w["state"] != "online":
            break
        assert silent < 11.5, "still online long after its timeout"
        time.sleep(0.1)
    assert w["state"] == "unreachable"
    assert 8.0 <= silent < 11.5, silent
    assert worker_state(api, "worker-b") == "online"


def test_worker_shutting_down_refuses_starts_over_grpc(small_cluster):
    """While a stopping worker waits for its jobs, StartJob gets UNAVAILABLE."""
    api = Api(small_cluster)
    job = api.start("worker-a", "stubborn.sh")
    # The job ignores SIGTERM: the worker's shutdown waits [jobs].stop_grace_s
    # for it, serving gRPC meanwhile.
    assert wait_for(
        lambda: b"stubborn" in api.output("worker-a", job["job_id"], "follow=false")
    )
    worker = small_cluster.workers["worker-a"]
    scheduler = pair(small_cluster.pki, "scheduler")
    with worker_stub(small_cluster, "worker-a", scheduler) as stub:
        stub.GetJob(worker_pb2.GetJobRequest(job_id=job["job_id"]), timeout=5)
        worker.signal(signal.SIGTERM)
        refused = None
        deadline = time.monotonic() + 5
        while refused is None and time.monotonic() < deadline:
            try:
                stub.StartJob(START_HELLO, timeout=5)
            except grpc.RpcError as exc:
                if "shutting down" in (exc.details() or ""):
                    refused = exc
                    break
            time.sleep(0.02)
    assert refused is not None, "no start was refused during the shutdown"
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "another worker" in refused.details()
    assert worker.proc.wait(timeout=15) == 0
    assert worker_state(api, "worker-a") == "offline"
