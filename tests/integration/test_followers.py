"""Many HTTP followers of one job, against a live cluster.

The followers of a job in one HTTP process share one stream from the worker
(``scheduler.relay``): every follower must still get every byte, in order,
with the job's final status, whether it reads the shared window, starts at an
offset, or falls behind and continues on a stream of its own.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import Api, make_public_dir

from jobgate.dev.cluster import DevCluster

pytestmark = pytest.mark.timeout(120)

WORKER = "fol-1"
FOLLOWERS = 24


def _cluster(scripts_dir: Path, prefix: str, scheduler_extra: str = ""):
    directory = make_public_dir(prefix)
    c = DevCluster(
        directory,
        scripts_dir=scripts_dir,
        http_processes=1,
        scheduler_extra=scheduler_extra,
    )
    try:
        c.start((WORKER,))
        yield c
    finally:
        c.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_cluster(scripts_dir):
    yield from _cluster(scripts_dir, "jobgate-test-followers-")


@pytest.fixture(scope="module")
def narrow_cluster(scripts_dir):
    """A window of 4 KiB: followers that fall behind get streams of their own."""
    yield from _cluster(
        scripts_dir, "jobgate-test-followers-narrow-", "follow_window_bytes = 4096\n"
    )


def output_path(job_id: str, query: str = "follow=true") -> str:
    return f"/v1/workers/{WORKER}/jobs/{job_id}/output?{query}"


def expected_lastwords(job_id: str, lines: int) -> bytes:
    return (
        "".join(f"line {i:04d} ✓ of job {job_id}\n" for i in range(1, lines + 1))
        + "last words"
    ).encode()


def worker_threads(c: DevCluster) -> int:
    for line in Path(f"/proc/{c.workers[WORKER].pid}/status").read_text().split("\n"):
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def follow_many(c: DevCluster, paths: list[tuple[str, dict]]) -> list[tuple]:
    """Request every (path, headers) at the same moment; (status, body) each."""
    barrier = threading.Barrier(len(paths))

    def one(item):
        path, headers = item
        barrier.wait()
        status, _, body = c.request("GET", path, headers=headers, timeout=60)
        return status, body

    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(one, paths))


def sse_output_and_end(raw: bytes) -> tuple[bytes, dict]:
    text, end = "", None
    for block in raw.decode().split("\n\n"):
        lines = [x for x in block.split("\n") if x and not x.startswith(":")]
        fields = [x.partition(": ") for x in lines]
        event = next((v for k, _, v in fields if k == "event"), None)
        data = "\n".join(v for k, _, v in fields if k == "data")
        if event == "output":
            text += data
        elif event == "end":
            end = json.loads(data)
    return text.encode(), end


def test_followers_of_one_job_get_identical_complete_bytes_from_one_stream(
    shared_cluster,
):
    c, api = shared_cluster, Api(shared_cluster)
    threads_before = worker_threads(c)
    job = api.start(WORKER, "lastwords.sh", ["20", "0.1"])
    results = follow_many(c, [(output_path(job["job_id"]), {})] * FOLLOWERS)
    expected = hashlib.sha256(expected_lastwords(job["job_id"], 20)).hexdigest()
    assert [s for s, _ in results] == [200] * FOLLOWERS
    assert [hashlib.sha256(b).hexdigest() for _, b in results] == [expected] * FOLLOWERS
    # Each stream the worker serves holds one of its threads: the followers
    # shared one (or a few, if some arrived after the job ended), not one each.
    assert worker_threads(c) - threads_before < FOLLOWERS // 2


def test_sse_plain_and_offset_followers_together_get_what_each_asked_for(
    shared_cluster,
):
    c, api = shared_cluster, Api(shared_cluster)
    job = api.start(WORKER, "lastwords.sh", ["15", "0.1"])
    jid = job["job_id"]
    expected = expected_lastwords(jid, 15)
    sse = {"Accept": "text/event-stream"}
    requests = [(output_path(jid), {})] * 4 + [(output_path(jid), sse)] * 4
    requests += [(output_path(jid, "follow=true&offset=7"), {})] * 4
    results = follow_many(c, requests)
    assert [s for s, _ in results] == [200] * len(requests)
    assert [b for _, b in results[:4]] == [expected] * 4
    final = api.get(f"/v1/workers/{WORKER}/jobs/{jid}")[2]
    for _, raw in results[4:8]:
        text, end = sse_output_and_end(raw)
        assert text == expected
        assert end == final
    assert [b for _, b in results[8:]] == [expected[7:]] * 4


def test_a_missing_job_is_404_for_every_follower(shared_cluster):
    c = shared_cluster
    path = output_path("00000000-0000-0000-0000-000000000000")
    results = follow_many(c, [(path, {})] * 4)
    assert [s for s, _ in results] == [404] * 4
    assert c.request("GET", path)[0] == 404


def test_followers_falling_out_of_a_narrow_window_still_get_every_byte(
    narrow_cluster,
):
    c, api = narrow_cluster, Api(narrow_cluster)
    job = api.start(WORKER, "utf8.sh", ["30000"])  # 420 kB at once
    results = follow_many(c, [(output_path(job["job_id"]), {})] * 8)
    expected = "ünï✓ text\n".encode() * 30000
    assert [s for s, _ in results] == [200] * 8
    assert all(b == expected for _, b in results)
    # Joining later, from an offset the window no longer holds.
    late = api.get(output_path(job["job_id"], "follow=true&offset=100"))
    assert late[0] == 200 and late[2] == expected[100:]


def test_a_follower_that_leaves_does_not_end_the_others(shared_cluster):
    c, api = shared_cluster, Api(shared_cluster)
    job = api.start(WORKER, "lastwords.sh", ["15", "0.1"])
    jid = job["job_id"]
    expected = expected_lastwords(jid, 15)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stayer = pool.submit(c.request, "GET", output_path(jid), timeout=60)
        conn = http.client.HTTPConnection("127.0.0.1", c.scheduler_info["http_port"])
        conn.request(
            "GET", output_path(jid), headers={"Authorization": f"Bearer {c.token}"}
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read1(10)
        conn.close()  # leaves early
        time.sleep(0.3)
        status, _, body = stayer.result(60)
    assert status == 200 and body == expected
