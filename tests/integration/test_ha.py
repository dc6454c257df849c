"""Two schedulers on one PostgreSQL database: every call on either, and one
killed with SIGKILL under load loses nothing it acknowledged.

Workers are given both schedulers' gRPC addresses ([scheduler].addresses)
and clients both URLs (jobgate.client with a comma-separated URL). The
database is a new one on the test session's server (``postgres`` in
``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import make_public_dir

from jobgate.client.api import Client
from jobgate.client.errors import ApiError, ConnectionFailed
from jobgate.dev.cluster import DevCluster

pytestmark = pytest.mark.timeout(180)

WORKERS = ("ha-1", "ha-2")


@pytest.fixture
def ha(postgres, scripts_dir):
    url = postgres.create_database()
    name = url.rsplit("/", 1)[1]
    c = DevCluster(
        make_public_dir("jobgate-test-ha-"),
        scripts_dir=scripts_dir,
        schedulers=2,
        store_url=postgres.url(name, tcp=True),
        store_password_file=postgres.password_file,
    )
    try:
        c.start(WORKERS)
        yield c
    finally:
        c.stop()
        postgres.drop_database(name)


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = Path(f"/proc/{p}/task").iterdir()
            kids = [int(k) for t in tasks for k in (t / "children").read_text().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def kill_scheduler(c: DevCluster, index: int) -> None:
    """SIGKILL a scheduler and its HTTP processes at once: as when its host
    dies (under systemd, the unit's KillMode=mixed ends the HTTP processes
    when the main one dies)."""
    proc = c.schedulers[index]
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.proc.wait(5)


def client(c: DevCluster, *urls: str) -> Client:
    return Client(",".join(urls or c.urls), c.token)


def test_every_scheduler_serves_every_call(ha):
    first, second = (client(ha, u) for u in ha.urls)
    for c in (first, second):
        assert {w["name"]: w["state"] for w in c.workers()} == {
            "ha-1": "online",
            "ha-2": "online",
        }
    # Started through one, read through the other.
    key = f"nightly-{uuid.uuid4()}"
    status, job = first.start_job("ha-1", "count.sh", ["3", "0.1"], idempotency_key=key)
    assert status == 201
    out = b"".join(second.output("ha-1", job["job_id"], follow=True))
    assert out == b"1\n2\n3\n"
    assert second.job("ha-1", job["job_id"])["state"] == "succeeded"
    # A retry through the other scheduler gets the same job.
    status, again = second.start_job(
        "ha-1", "count.sh", ["3", "0.1"], idempotency_key=key
    )
    assert (status, again["job_id"]) == (200, job["job_id"])
    # A follower resumes on the other scheduler where it stopped.
    assert b"".join(first.output("ha-1", job["job_id"], offset=2)) == out[2:]
    # A fan-out group made on one is read on the other.
    group = first.fanout({"all": True}, "hello.sh", ["x"])
    read = second.group(group["group_id"], wait=True)
    assert read["summary"]["states"] == {"succeeded": 2}
    jobs, stale = second.jobs("ha-2")
    assert not stale and job["job_id"] not in {j["job_id"] for j in jobs}


def test_a_killed_scheduler_loses_nothing_it_acknowledged(ha):
    both = client(ha)
    # A job whose output a follower reads through the first scheduler.
    status, long_job = both.start_job("ha-1", "count.sh", ["30", "0.1"])
    assert status == 201
    got = bytearray()
    follower = client(ha, *ha.urls)  # starts on the first scheduler

    def follow() -> None:
        for chunk in follower.output("ha-1", long_job["job_id"], follow=True):
            got.extend(chunk)

    cut: list[BaseException] = []

    def follow_until_cut() -> None:
        try:
            follow()
        except ConnectionFailed as exc:
            cut.append(exc)

    reader = threading.Thread(target=follow_until_cut, daemon=True)
    reader.start()
    # Starts through both URLs, from two threads, before and after the kill.
    acknowledged: list[tuple[str, str]] = []
    failed: list[str] = []
    stop = threading.Event()

    def load(worker: str) -> None:
        c = client(ha)
        while not stop.is_set():
            try:
                status, job = c.start_job(worker, "hello.sh", ["x"])
            except (ApiError, ConnectionFailed) as exc:
                failed.append(str(exc))
                continue
            if status in (200, 201):
                acknowledged.append((worker, job["job_id"]))

    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in WORKERS]
    for t in threads:
        t.start()
    time.sleep(1.0)
    before = len(acknowledged)
    killed_at = time.monotonic()
    kill_scheduler(ha, 0)
    # Requests go on through the survivor at once.
    while len(acknowledged) < before + 5:
        assert time.monotonic() - killed_at < 5, failed[-3:]
        time.sleep(0.01)
    recovered_s = time.monotonic() - killed_at
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(10)
    assert recovered_s < 1.0, recovered_s
    survivor = client(ha, ha.urls[1])
    # Every start that was answered is in the index, reachable through the
    # surviving scheduler.
    for worker, job_id in acknowledged:
        assert survivor.job(worker, job_id)["job_id"] == job_id
    # The workers stay online: their heartbeats went to the survivor.
    hb_interval = 1.0  # DevCluster's [workers].heartbeat_interval_s
    time.sleep(4.0 + hb_interval)  # past the heartbeat timeout
    assert {w["name"]: w["state"] for w in survivor.workers()} == {
        "ha-1": "online",
        "ha-2": "online",
    }
    # The follower was cut; it resumes on the survivor with every byte.
    reader.join(10)
    assert cut, "the stream through the killed scheduler did not break"
    rest = b"".join(
        survivor.output("ha-1", long_job["job_id"], offset=len(got), follow=True)
    )
    whole = bytes(got) + rest
    assert whole == b"".join(f"{i}\n".encode() for i in range(1, 31))
