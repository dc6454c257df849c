"""Jobs done right, against live clusters over HTTP: one test per promise.

Process trees that leave nothing behind after stop and timeout, one exit reason
on every finished job, output that every follower receives whole (plain and
Server-Sent Events), capped output, limits on what a job may do, history and
retention, run-and-wait and run-and-follow, idempotent starts.

Tests that need a special worker configuration, or that kill workers, get a
cluster of their own; the others share the session's ``cluster``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import TEST_SCRIPTS, Api, make_public_dir, skip_unless_required

from jobgate.dev.cluster import DevCluster

pytestmark = pytest.mark.timeout(120)

NOPE = "/nonexistent/interp"
INTERPRETERS = f'interpreters = {{ bash = "/bin/bash", nope = "{NOPE}" }}'
HEAD = TAIL = 65536
TREE = ("child", "parent", "grandchild", "stubborn", "stubborn-child", "escapee")
GAP_NOTICE = re.compile(
    rb"\n\[jobgate: (\d+) bytes of output were dropped here by the output cap; "
    rb"the output resumes at byte (\d+)\]\n"
)


# -- processes -------------------------------------------------------------------


class Proc(NamedTuple):
    """A process, named by its pid and its start time (pids get reused)."""

    pid: int
    start: int | None


def start_time(pid: int) -> int | None:
    """The start time of a live process, or None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(p: Proc) -> bool:
    return p.start is not None and start_time(p.pid) == p.start


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def kill_if_alive(p: Proc) -> None:
    if alive(p):
        os.kill(p.pid, signal.SIGKILL)


# -- HTTP ------------------------------------------------------------------------


def jobs_path(worker: str, job_id: str = "", suffix: str = "") -> str:
    path = f"/v1/workers/{worker}/jobs"
    return f"{path}/{job_id}{suffix}" if job_id else path


def status_of(api: Api, worker: str, job_id: str) -> dict:
    status, _, job = api.get(jobs_path(worker, job_id))
    assert status == 200, (status, job)
    return job


def run_to_end(api: Api, worker: str, job_id: str) -> tuple[dict, bytes]:
    """Follow the job's output to its end; returns its final status and output."""
    output = api.output(worker, job_id)
    job = status_of(api, worker, job_id)
    assert job["state"] != "running", job
    return job, output


def job_ids(api: Api, worker: str) -> set[str]:
    status, _, data = api.get(jobs_path(worker))
    assert status == 200, (status, data)
    return {j["job_id"] for j in data["jobs"]}


def wait_output(api: Api, worker: str, job_id: str, pred, timeout=10.0) -> bytes:
    """Poll the output (without following) until ``pred(output)`` holds."""
    seen = b""

    def check() -> bool:
        nonlocal seen
        seen = api.output(worker, job_id, "follow=false")
        return pred(seen)

    assert wait_for(check, timeout), f"output never matched; it is {seen!r}"
    return seen


def open_stream(c: DevCluster, path: str, headers=None):
    """GET ``path``; returns (connection, response) to read the body as it comes."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", c.scheduler_info["http_port"], timeout=60
    )
    conn.request(
        "GET", path, headers={"Authorization": f"Bearer {c.token}", **(headers or {})}
    )
    return conn, conn.getresponse()


# -- Server-Sent Events -----------------------------------------------------------


def parse_sse(raw: bytes) -> list[dict]:
    """The events of a complete event stream, in order, comments left out."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-200:]
    return parse_sse_blocks(text[:-2].split("\n\n"))


def parse_sse_blocks(blocks: list[str]) -> list[dict]:
    """Events ({id, event, data}) of blocks; comment-only blocks (": keep-alive")
    are no events."""
    events = []
    for block in blocks:
        event = {"id": None, "event": "message", "data": []}
        fields = 0
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            fields += 1
            if field == "data":
                event["data"].append(value)
            elif field in ("id", "event"):
                event[field] = value
        if fields:
            event["data"] = "\n".join(event["data"])
            events.append(event)
    return events


def sse_text(events: list[dict]) -> str:
    return "".join(e["data"] for e in events if e["event"] == "output")


SSE = {"Accept": "text/event-stream"}


# -- expected output of flood.sh (seq 1 N) ------------------------------------------


def _bands(n: int):
    """(first number, last number, bytes per line) of seq's output, by width."""
    digits, lo = 1, 1
    while lo <= n:
        yield lo, min(n, 10**digits - 1), digits + 1
        digits, lo = digits + 1, 10**digits


def seq_size(n: int) -> int:
    return sum((hi - lo + 1) * width for lo, hi, width in _bands(n))


def seq_slice(n: int, start: int, stop: int) -> bytes:
    """Bytes ``start:stop`` of what ``seq 1 n`` writes, without writing it all."""
    if start >= stop:
        return b""
    parts, base, pos = [], None, 0
    for lo, hi, width in _bands(n):
        band = (hi - lo + 1) * width
        if pos + band > start and pos < stop:
            first = lo + max(0, start - pos) // width
            last = min(hi, lo + (stop - 1 - pos) // width)
            if base is None:
                base = pos + (first - lo) * width
            parts.append("".join(f"{i}\n" for i in range(first, last + 1)))
        pos += band
    return "".join(parts).encode()[start - base : stop - base]


def memory_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


# -- clusters ----------------------------------------------------------------------


class Site(NamedTuple):
    """A cluster, a client for it, and the worker the tests use on it."""

    cluster: DevCluster
    api: Api
    worker: str


def _own_cluster(prefix: str, scripts: Path, worker: str, **kw):
    directory = make_public_dir(prefix)
    c = DevCluster(directory, scripts_dir=scripts, http_processes=1, **kw)
    try:
        c.start((worker,))
        yield Site(c, Api(c), worker)
    finally:
        c.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def shared(cluster, api) -> Site:
    """The session's cluster (jobs in a cgroup each, when the host allows)."""
    return Site(cluster, api, "worker-1")


@pytest.fixture(scope="module")
def pg(scripts_dir):
    """One worker keeping jobs together by process group only, running every
    job as 'nobody' (when it runs as root)."""
    yield from _own_cluster(
        "jobgate-test-pg-",
        scripts_dir,
        "pg-1",
        worker_extra=(
            f'isolation = "process-group"\nuser_mode = "fixed"\nuser = "nobody"\n'
            f"{INTERPRETERS}\n"
        ),
    )


@pytest.fixture(scope="module")
def limits_scripts():
    """Scripts with a symlink out of their directory and a subdirectory; the
    script outside leaves a marker file if it ever runs."""
    scripts = make_public_dir("jobgate-test-limits-scripts-")
    outside = make_public_dir("jobgate-test-outside-")
    marker_dir = make_public_dir("jobgate-test-marker-")
    os.chmod(marker_dir, 0o777)  # the job account writes the marker
    for f in TEST_SCRIPTS.iterdir():
        shutil.copy(f, scripts / f.name)
        os.chmod(scripts / f.name, 0o755)
    evil = outside / "evil.sh"
    evil.write_text(f"#!/bin/bash\ntouch {marker_dir}/ran\necho evil\n")
    os.chmod(evil, 0o755)
    (scripts / "out-link.sh").symlink_to(evil)
    (scripts / "in-link.sh").symlink_to("hello.sh")
    (scripts / "subdir").mkdir()
    os.chmod(scripts / "subdir", 0o755)
    yield scripts, evil, marker_dir / "ran"
    for d in (scripts, outside, marker_dir):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def limits(limits_scripts):
    """One worker: at most two jobs at once, output capped at 64 KiB + 64 KiB."""
    yield from _own_cluster(
        "jobgate-test-limits-",
        limits_scripts[0],
        "lim-1",
        worker_extra=(
            f"max_concurrent = 2\noutput_head_bytes = {HEAD}\n"
            f"output_tail_bytes = {TAIL}\n{INTERPRETERS}\n"
        ),
    )


@pytest.fixture(scope="module")
def restarts(scripts_dir):
    """One worker that keeps 3 finished jobs and times jobs out after 2 s by
    default, behind a scheduler whose ?wait=true waits at most 1 s."""
    yield from _own_cluster(
        "jobgate-test-restarts-",
        scripts_dir,
        "rst-1",
        worker_extra=(
            "retention_max_jobs = 3\nretention_interval_s = 0.2\n"
            "default_timeout_s = 2\nmax_timeout_s = 600\n"
        ),
        scheduler_extra="max_wait_s = 1\n",
    )


@pytest.fixture(scope="module")
def wide(scripts_dir):
    # 64 clients at once, on a cluster of their own.
    yield from _own_cluster("jobgate-test-wide-", scripts_dir, "wide-1")


def restart_worker(site: Site, sig: int = signal.SIGTERM) -> None:
    """Stop the worker (gracefully, or with ``sig``) and start it again."""
    proc = site.cluster.workers[site.worker]
    if sig == signal.SIGTERM:
        assert proc.stop() == 0
    else:
        proc.signal(sig)
        proc.proc.wait(10)
    site.cluster.start_worker(site.worker)


# -- 1. stop and timeout end the whole process tree ---------------------------------


def tree_of(out: bytes) -> dict[str, Proc]:
    """The processes escape.sh printed, as they are now (start None: gone)."""
    procs = {}
    for line in out.decode().splitlines():
        name, pid = line.split()
        procs[name] = Proc(int(pid), start_time(int(pid)))
    assert set(procs) == set(TREE), out
    return procs


def start_tree(site: Site, **extra) -> tuple[dict, dict[str, Proc]]:
    """Start escape.sh; returns the job and its processes, all seen alive."""
    job = site.api.start(site.worker, "escape.sh", **extra)
    procs: dict[str, Proc] = {}
    try:
        out = wait_output(
            site.api,
            site.worker,
            job["job_id"],
            lambda o: all(f"\n{n} ".encode() in b"\n" + o for n in TREE),
        )
        procs = tree_of(out)
        assert all(p.start is not None for p in procs.values()), procs
    except BaseException:
        site.api.post(jobs_path(site.worker, job["job_id"], "/stop"))
        for p in procs.values():
            kill_if_alive(p)
        raise
    return job, procs


def stop_tree(site: Site, job: dict) -> None:
    status, _, final = site.api.post(jobs_path(site.worker, job["job_id"], "/stop"))
    assert status == 200, final
    assert final["exit_reason"] == "stopped"


def timed_out_tree(site: Site) -> dict[str, Proc]:
    """Run escape.sh with a 1 s timeout to its end; its processes right after."""
    job = site.api.start(site.worker, "escape.sh", timeout_s=1)
    final, out = run_to_end(site.api, site.worker, job["job_id"])
    procs = tree_of(out)
    assert final["exit_reason"] == "timed_out"
    return procs


def cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


def cgroup2_mounted() -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(" - cgroup2 " in line for line in f)


needs_cgroup2 = pytest.mark.skipif(
    not cgroup2_mounted(), reason="needs a cgroup v2 hierarchy"
)


def living(procs: dict[str, Proc]) -> list[str]:
    return [name for name, p in procs.items() if alive(p)]


@needs_cgroup2
def test_cgroup_job_stopped_leaves_no_process(shared):
    job, procs = start_tree(shared)
    try:
        # Every process is in the job's own cgroup, the escapee too.
        groups = {cgroup_of(p.pid) for p in procs.values()}
        assert len(groups) == 1 and groups.pop().endswith("/" + job["job_id"])
        stop_tree(shared, job)
        # A job reported ended has no process left: not the one that ignores
        # SIGTERM, not the one that left the job's session.
        assert living(procs) == []
    finally:
        for p in procs.values():
            kill_if_alive(p)


@needs_cgroup2
def test_cgroup_job_timed_out_leaves_no_process(shared):
    procs = timed_out_tree(shared)
    try:
        assert living(procs) == []
    finally:
        for p in procs.values():
            kill_if_alive(p)


def assert_group_gone_escapee_left(procs: dict[str, Proc]) -> None:
    group = {n: p for n, p in procs.items() if n != "escapee"}
    assert wait_for(lambda: living(group) == [], 3), living(group)
    # The README's limit of this mode: a process that calls setsid leaves the
    # group and is not stopped with the job (the test ends it).
    assert alive(procs["escapee"])


def test_process_group_job_stopped_leaves_no_process_of_its_group(pg):
    job, procs = start_tree(pg)
    try:
        stop_tree(pg, job)
        assert_group_gone_escapee_left(procs)
    finally:
        for p in procs.values():
            kill_if_alive(p)


def test_process_group_job_timed_out_leaves_no_process_of_its_group(pg):
    procs = timed_out_tree(pg)
    try:
        assert_group_gone_escapee_left(procs)
    finally:
        for p in procs.values():
            kill_if_alive(p)


# -- 2. one exit reason on every finished job -------------------------------------


def test_exit_reason_succeeded_and_failed_with_exit_code(shared):
    api, w = shared.api, shared.worker
    ok, _ = run_to_end(api, w, api.start(w, "hello.sh")["job_id"])
    assert (ok["state"], ok["exit_reason"], ok["exit_code"]) == (
        "succeeded",
        "succeeded",
        0,
    )
    bad, out = run_to_end(api, w, api.start(w, "mixed.sh", ["3"])["job_id"])
    assert (bad["state"], bad["exit_reason"], bad["exit_code"]) == (
        "failed",
        "failed",
        3,
    )
    assert bad["signal"] is None
    assert "3" in bad["reason"]
    assert out == b"out 1\nerr 1\nout 2\nerr 2\n"


@pytest.mark.parametrize(("name", "number"), [("KILL", 9), ("SEGV", 11)])
def test_exit_reason_killed_names_the_signal(shared, name, number):
    api, w = shared.api, shared.worker
    job, out = run_to_end(api, w, api.start(w, "killself.sh", [name])["job_id"])
    assert out == b"before\n"
    assert (job["state"], job["exit_reason"]) == ("failed", "killed")
    assert job["signal"] == number
    assert job["exit_code"] is None
    assert f"SIG{name}" in job["reason"]


def test_exit_reason_stopped_says_who_and_when(shared):
    api, w = shared.api, shared.worker
    job = api.start(w, "sleep.sh", ["300"])
    wait_output(api, w, job["job_id"], lambda o: o == b"sleeping\n")
    status, _, stopped = api.post(jobs_path(w, job["job_id"], "/stop"))
    assert status == 200
    assert (stopped["state"], stopped["exit_reason"]) == ("stopped", "stopped")
    assert stopped["stopped_by"] == "token dev"
    assert "token dev" in stopped["reason"]
    assert stopped["started_at"] <= stopped["stopped_at"] <= stopped["ended_at"]
    assert status_of(api, w, job["job_id"]) == stopped


def test_exit_reason_timed_out_after_timeout_s(shared):
    api, w = shared.api, shared.worker
    started = time.monotonic()
    job = api.start(w, "sleep.sh", ["300"], timeout_s=1)
    assert job["timeout_s"] == 1
    final, out = run_to_end(api, w, job["job_id"])
    elapsed = time.monotonic() - started
    assert out == b"sleeping\n"
    assert (final["state"], final["exit_reason"]) == ("timed_out", "timed_out")
    assert final["stopped_by"] is None and final["stopped_at"] is None
    assert "timeout" in final["reason"]
    assert 1.0 <= elapsed < 10


def test_worker_killed_mid_job_adopts_it_and_a_stop_leaves_no_process(restarts):
    api, w = restarts.api, restarts.worker
    job, procs = start_tree(restarts, timeout_s=60)
    try:
        before = status_of(api, w, job["job_id"])
        restart_worker(restarts, signal.SIGKILL)
        # The job outlived the worker: the next one adopted it, same pid.
        adopted = status_of(api, w, job["job_id"])
        assert adopted["state"] == "running", adopted
        assert adopted["pid"] == before["pid"] != 0
        assert [n for n, p in procs.items() if not alive(p)] == []
        # What the job wrote before the worker died is still served.
        assert b"escapee " in api.output(w, job["job_id"], "follow=false")
        status, _, stopped = api.post(jobs_path(w, job["job_id"], "/stop"))
        assert status == 200
        assert (stopped["state"], stopped["exit_reason"]) == ("stopped", "stopped")
        if cgroup2_mounted():
            # Its cgroup was kept for it: the stop ended every process in it,
            # the escapee included.
            deadline = time.monotonic() + 5
            while [n for n, p in procs.items() if alive(p)]:
                assert time.monotonic() < deadline, procs
                time.sleep(0.05)
    finally:
        for p in procs.values():
            kill_if_alive(p)


@pytest.mark.parametrize("site", ["limits", "pg"])
def test_exit_reason_start_failed_carries_the_os_error(request, site):
    s: Site = request.getfixturevalue(site)
    status, _, job = s.api.post(
        jobs_path(s.worker), {"command": "nope", "path": "hello.sh"}
    )
    assert status == 201, job
    final, out = run_to_end(s.api, s.worker, job["job_id"])
    assert out == b""
    assert (final["state"], final["exit_reason"]) == ("failed", "start_failed")
    assert NOPE in final["reason"]
    assert "No such file or directory" in final["reason"]


def test_default_and_maximum_timeout_come_from_the_worker_config(restarts):
    api, w = restarts.api, restarts.worker
    status, _, data = api.post(
        jobs_path(w), {"command": "bash", "path": "hello.sh", "timeout_s": 601}
    )
    assert status == 400
    assert "600" in data["description"]
    job = api.start(w, "sleep.sh", ["300"])
    assert job["timeout_s"] == 2  # [jobs].default_timeout_s
    final, _ = run_to_end(api, w, job["job_id"])
    assert final["exit_reason"] == "timed_out"


# -- 3. output: every follower gets every byte ---------------------------------------


def expected_lastwords(job_id: str, lines: int) -> bytes:
    return (
        "".join(f"line {i:04d} ✓ of job {job_id}\n" for i in range(1, lines + 1))
        + "last words"
    ).encode()


def follow_many(c: DevCluster, path: str, n: int) -> list[tuple[int, bytes]]:
    """``n`` clients request ``path`` at the same moment; (status, body) each."""
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        status, _, body = c.request("GET", path, timeout=60)
        return status, body

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_fifty_followers_get_identical_bytes_including_the_last_words(shared):
    api, w = shared.api, shared.worker
    job = api.start(w, "lastwords.sh", ["15", "0.1"])
    results = follow_many(
        shared.cluster, jobs_path(w, job["job_id"], "/output?follow=true"), 50
    )
    expected = hashlib.sha256(expected_lastwords(job["job_id"], 15)).hexdigest()
    assert [s for s, _ in results] == [200] * 50
    assert [hashlib.sha256(b).hexdigest() for _, b in results] == [expected] * 50


def test_fifty_followers_at_once_are_all_served_live(wide):
    """With an HTTP thread for each, 50 followers stream from the worker at once."""
    api, w = wide.api, wide.worker
    job = api.start(w, "lastwords.sh", ["20", "0.1"])
    results = follow_many(
        wide.cluster, jobs_path(w, job["job_id"], "/output?follow=true"), 50
    )
    expected = hashlib.sha256(expected_lastwords(job["job_id"], 20)).hexdigest()
    refused = [b[:200] for s, b in results if s != 200]
    assert refused == []
    assert [hashlib.sha256(b).hexdigest() for _, b in results] == [expected] * 50


def test_late_followers_from_an_offset_and_after_the_end_get_the_rest(shared):
    api, c, w = shared.api, shared.cluster, shared.worker
    job = api.start(w, "lastwords.sh", ["30", "0.1"])
    jid = job["job_id"]
    offset = 7  # inside the first line
    wait_output(api, w, jid, lambda o: len(o) > offset)
    conn, resp = open_stream(
        c, jobs_path(w, jid, f"/output?follow=true&offset={offset}")
    )
    try:
        assert resp.status == 200
        assert status_of(api, w, jid)["state"] == "running"
        from_offset = resp.read()
    finally:
        conn.close()
    expected = expected_lastwords(jid, 30)
    assert from_offset == expected[offset:]
    assert status_of(api, w, jid)["state"] == "succeeded"
    # Joining after the end: from the start, and from an offset.
    assert api.output(w, jid, "follow=true&offset=0") == expected
    assert api.output(w, jid, "follow=true&offset=12") == expected[12:]


def test_binary_output_passes_the_plain_stream_byte_exact_while_running(shared):
    api, w = shared.api, shared.worker
    job = api.start(w, "bytes.sh", ["4", "0.2"])
    expected = bytes(range(256)) * 4 + b"\xc3"
    late = wait_output(api, w, job["job_id"], lambda o: len(o) >= 300)
    assert late == expected[: len(late)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        whole = pool.submit(api.output, w, job["job_id"])
        rest = pool.submit(api.output, w, job["job_id"], "follow=true&offset=300")
        assert whole.result(30) == expected
        assert rest.result(30) == expected[300:]


def test_sse_ids_are_byte_offsets_and_end_event_has_the_final_status(shared):
    api, w = shared.api, shared.worker
    # 420000 bytes in lines of 14: reads of 64 KiB end inside characters.
    job = api.start(w, "utf8.sh", ["30000"])
    final, plain = run_to_end(api, w, job["job_id"])
    assert plain == "ünï✓ text\n".encode() * 30000
    status, headers, raw = api.get(jobs_path(w, job["job_id"], "/output"), headers=SSE)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(raw)
    assert [e["event"] for e in events[-1:]] == ["end"]
    assert json.loads(events[-1]["data"]) == final
    assert {e["event"] for e in events[:-1]} == {"output"}
    assert sse_text(events) == plain.decode()
    text = ""
    for e in events[:-1]:
        text += e["data"]
        # Each id is the byte offset just past the text so far.
        assert plain[: int(e["id"])].decode() == text
    assert int(events[-2]["id"]) == len(plain)


def test_sse_output_ending_inside_a_character_has_an_id_for_its_last_event(shared):
    api, w = shared.api, shared.worker
    job = api.start(w, "bytes.sh", ["1", "0"])  # ends in a lone UTF-8 lead byte
    final, _ = run_to_end(api, w, job["job_id"])
    events = parse_sse(api.get(jobs_path(w, job["job_id"], "/output"), headers=SSE)[2])
    assert events[-1]["event"] == "end"
    last = events[-2]
    # The replacement for the lone byte: its id is the end of the output, so
    # a client that reconnects after it gets no second one.
    assert (last["event"], last["data"][-1:]) == ("output", "\ufffd")
    assert int(last["id"]) == final["output_bytes"]


def test_sse_resume_with_last_event_id_gives_exactly_the_rest(shared):
    api, w = shared.api, shared.worker
    job = api.start(w, "utf8.sh", ["30000"])
    _, plain = run_to_end(api, w, job["job_id"])
    path = jobs_path(w, job["job_id"], "/output")
    events = parse_sse(api.get(path, headers=SSE)[2])
    ids = [int(e["id"]) for e in events if e["id"] is not None]
    rng = random.Random()
    boundaries = [i for i in range(1, len(plain)) if plain[i] & 0xC0 != 0x80]
    for offset in (rng.choice(ids[:-1]), rng.choice(boundaries), 0, len(plain)):
        status, _, raw = api.get(path, headers={**SSE, "Last-Event-ID": str(offset)})
        assert status == 200
        resumed = parse_sse(raw)
        assert sse_text(resumed) == plain[offset:].decode(), offset
        assert resumed[-1]["event"] == "end"


def test_sse_reconnect_mid_job_continues_where_it_left_off(shared):
    api, c, w = shared.api, shared.cluster, shared.worker
    job = api.start(w, "lastwords.sh", ["40", "0.1"])
    path = jobs_path(w, job["job_id"], "/output")
    conn, resp = open_stream(c, path, SSE)
    first, buffer = [], b""
    try:
        while len(first) < 3:
            buffer += resp.read1(65536)
            *blocks, buffer = buffer.split(b"\n\n")
            first += parse_sse_blocks([b.decode() for b in blocks])
    finally:
        conn.close()
    assert status_of(api, w, job["job_id"])["state"] == "running"
    last_id = [e["id"] for e in first if e["id"] is not None][-1]
    status, _, raw = api.get(path, headers={**SSE, "Last-Event-ID": last_id})
    assert status == 200
    second = parse_sse(raw)
    expected = expected_lastwords(job["job_id"], 40)
    assert sse_text(first) + sse_text(second) == expected.decode()
    end = json.loads(second[-1]["data"])
    assert second[-1]["event"] == "end"
    assert (end["state"], end["output_bytes"]) == ("succeeded", len(expected))


# -- 4. output limits ------------------------------------------------------------


def job_dir(c: DevCluster, job_id: str) -> Path:
    found = list((c.dir / "state").glob(f"*/jobs/{job_id}"))
    assert len(found) == 1, found
    return found[0]


def disk_usage(directory: Path) -> int:
    """What the files in ``directory`` take on the disk (a kept job's output
    file is sparse: its size is all the job wrote, its blocks what is kept)."""
    return sum(f.stat().st_blocks * 512 for f in directory.iterdir())


def test_output_past_the_cap_keeps_head_and_tail_and_costs_no_disk_or_memory(limits):
    api, c, w = limits.api, limits.cluster, limits.worker
    n = 20_000_000
    total = seq_size(n)  # about 169 MB
    worker_pid = c.workers[w].pid
    rss_before = memory_kb(worker_pid, "VmRSS")
    job = api.start(w, "flood.sh", [str(n)])
    live = api.output(w, job["job_id"])  # a follower from the start, live
    final = status_of(api, w, job["job_id"])
    assert final["state"] == "succeeded", final
    assert final["output_bytes"] == total
    assert final["output_dropped_bytes"] == total - HEAD - TAIL
    assert str(total - HEAD - TAIL) in final["reason"]
    # Served after the end: the head, one notice, the tail.
    head, tail = seq_slice(n, 0, HEAD), seq_slice(n, total - TAIL, total)
    served = api.output(w, job["job_id"])
    notice = GAP_NOTICE.search(served)
    assert notice is not None
    assert int(notice[1]) == total - HEAD - TAIL
    assert int(notice[2]) == total - TAIL
    assert served == head + notice[0] + tail
    # The live follower got every byte it was sent at its true offset, each
    # gap announced with its size, and the last bytes of all.
    pos, parts = 0, GAP_NOTICE.split(live)
    for i in range(0, len(parts), 3):
        data = parts[i]
        assert data[:4096] == seq_slice(n, pos, pos + min(len(data), 4096)), pos
        pos += len(data)
        if i + 1 < len(parts):
            skipped, offset = int(parts[i + 1]), int(parts[i + 2])
            assert skipped > 0 and offset == pos + skipped
            pos = offset
    assert pos == total
    assert live.startswith(head) and live.endswith(tail)
    # Disk: the kept head and tail and a small record, nothing more.
    assert disk_usage(job_dir(c, job["job_id"])) <= HEAD + TAIL + 16384
    # Memory: the worker never held more than a little of it.
    assert memory_kb(worker_pid, "VmHWM") - rss_before < 100 * 1024
    # Server-Sent Events announce the gap too.
    events = parse_sse(api.get(jobs_path(w, job["job_id"], "/output"), headers=SSE)[2])
    gaps = [json.loads(e["data"]) for e in events if e["event"] == "gap"]
    assert gaps == [{"skipped": total - HEAD - TAIL, "offset": total - TAIL}]
    assert sse_text(events) == (head + tail).decode()


def test_capped_output_is_served_the_same_after_a_worker_restart(limits):
    api, w = limits.api, limits.worker
    job = api.start(w, "flood.sh", ["300000"])  # about 2 MB
    before, _ = run_to_end(api, w, job["job_id"])
    assert before["output_dropped_bytes"] > 0
    served = api.output(w, job["job_id"])
    assert len(GAP_NOTICE.findall(served)) == 1
    restart_worker(limits)
    assert status_of(api, w, job["job_id"]) == before
    assert api.output(w, job["job_id"]) == served
    # A read from inside the gap resumes where the tail begins.
    from_gap = api.output(w, job["job_id"], f"offset={HEAD + 5}")
    notice = GAP_NOTICE.match(from_gap)
    assert notice is not None
    assert int(notice[1]) == before["output_dropped_bytes"] - 5
    assert int(notice[2]) == before["output_bytes"] - TAIL
    assert from_gap[notice.end() :] == served[-TAIL:]


# -- 5. limits on what a job may do ---------------------------------------------------


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("../{outside}/evil.sh", 403),
        ("subdir/../../{outside}/evil.sh", 403),
        ("{evil}", 403),
        ("{scripts}/hello.sh", 403),
        ("out-link.sh", 403),
        ("subdir", 400),
        ("missing.sh", 400),
    ],
)
def test_script_path_escapes_are_refused_and_nothing_runs(
    limits, limits_scripts, path, code
):
    scripts, evil, marker = limits_scripts
    path = path.format(outside=evil.parent.name, evil=evil, scripts=scripts)
    api, w = limits.api, limits.worker
    before = job_ids(api, w)
    status, _, data = api.post(jobs_path(w), {"command": "bash", "path": path})
    assert status == code, data
    assert data["description"]
    assert job_ids(api, w) == before
    time.sleep(0.2)
    assert not marker.exists()
    # The same worker runs a script linked from inside its directory.
    job = api.start(w, "in-link.sh")
    assert run_to_end(api, w, job["job_id"])[1] == b"hello from lim-1\n"
    assert not marker.exists()


def test_command_not_on_the_allow_list_is_403(limits):
    api, w = limits.api, limits.worker
    before = job_ids(api, w)
    status, _, data = api.post(jobs_path(w), {"command": "perl", "path": "hello.sh"})
    assert status == 403
    assert "perl" in data["description"]
    assert job_ids(api, w) == before


def test_max_concurrent_full_is_429_with_retry_after(limits):
    api, w = limits.api, limits.worker
    running = [api.start(w, "sleep.sh", ["300"]) for _ in range(2)]
    try:
        status, headers, data = api.post(
            jobs_path(w), {"command": "bash", "path": "hello.sh"}
        )
        assert status == 429, data
        assert int(headers["Retry-After"]) > 0
        api.post(jobs_path(w, running[0]["job_id"], "/stop"))
        job = api.start(w, "hello.sh")
        assert run_to_end(api, w, job["job_id"])[0]["state"] == "succeeded"
    finally:
        for job in running:
            api.post(jobs_path(w, job["job_id"], "/stop"))


@pytest.mark.parametrize("site", ["shared", "pg"])
def test_job_runs_as_its_user_with_scrubbed_env_and_stdin_dev_null(request, site):
    """shared: a user id of its own (user_mode dynamic); pg: 'nobody' (fixed)."""
    s: Site = request.getfixturevalue(site)
    job = s.api.start(s.worker, "env.sh")
    final, out = run_to_end(s.api, s.worker, job["job_id"])
    lines = out.decode().splitlines()
    assert final["state"] == "succeeded"
    assert lines[-1] == "stdin=/dev/null"
    uid = int(lines[-2].removeprefix("uid="))
    env = dict(x.split("=", 1) for x in lines[:-2])
    if os.geteuid() == 0 and site == "pg":
        assert uid == pwd.getpwnam("nobody").pw_uid
        assert env["USER"] == env["LOGNAME"] == "nobody"
        assert env["SHELL"] == pwd.getpwnam("nobody").pw_shell
    elif os.geteuid() == 0:
        assert 61184 <= uid <= 65519
        assert env["USER"] == env["LOGNAME"] == f"jobgate-{uid}"
        assert env["HOME"] == env["TMPDIR"]  # a dynamic user has no home
        assert env["SHELL"] == "/usr/sbin/nologin"  # as systemd's DynamicUser=
    assert env["TMPDIR"].endswith(f"/{job['job_id']}")
    assert env["JOBGATE_JOB_ID"] == job["job_id"]
    assert env["JOBGATE_WORKER"] == s.worker
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    # Nothing of the worker's own environment; bash adds PWD, SHLVL and _.
    assert set(env) == {
        "TMPDIR",
        "HOME",
        "JOBGATE_JOB_ID",
        "JOBGATE_WORKER",
        "LANG",
        "LOGNAME",
        "PATH",
        "USER",
        "SHELL",
        "PWD",
        "SHLVL",
        "_",
    }


# -- 6. history and retention -------------------------------------------------------


def test_history_and_idempotency_keys_survive_a_worker_restart(restarts):
    api, w = restarts.api, restarts.worker
    key = str(uuid.uuid4())
    body = {
        "command": "bash",
        "path": "hello.sh",
        "args": ["x"],
        "timeout_s": 60,
        "idempotency_key": key,
    }
    status, _, job = api.post(jobs_path(w), body)
    assert status == 201
    before, out = run_to_end(api, w, job["job_id"])
    restart_worker(restarts)
    assert status_of(api, w, job["job_id"]) == before
    assert api.output(w, job["job_id"]) == out == b"hello from rst-1\narg: x\n"
    status, _, again = api.post(jobs_path(w), body)
    assert status == 200
    assert again == before


def test_retention_by_count_removes_the_oldest_finished_jobs(restarts):
    api, c, w = restarts.api, restarts.cluster, restarts.worker
    running = api.start(w, "sleep.sh", ["300"], timeout_s=60)
    try:
        finished, dirs, final = [], [], {}
        for _ in range(4):
            job = api.start(w, "hello.sh", timeout_s=60)
            final[job["job_id"]], _ = run_to_end(api, w, job["job_id"])
            finished.append(job["job_id"])
            dirs.append(job_dir(c, job["job_id"]))  # while it is among the newest

        def removed() -> bool:
            try:
                return api.get(jobs_path(w, finished[0], "/output"))[0] == 404
            except http.client.IncompleteRead:
                # Removed while its output was being sent: the answer is cut
                # rather than ended as if the output were whole.
                return False

        assert wait_for(removed, timeout=10)
        assert not dirs[0].exists()
        assert all(d.exists() for d in dirs[1:])
        assert finished[0] not in job_ids(api, w)
        # The scheduler saw it end: its final status is still answered.
        assert status_of(api, w, finished[0]) == final[finished[0]]
        for job_id in finished[1:]:
            assert status_of(api, w, job_id)["state"] == "succeeded"
        # A running job is never retention's to remove, however old.
        assert status_of(api, w, running["job_id"])["state"] == "running"
    finally:
        api.post(jobs_path(w, running["job_id"], "/stop"))


# -- 7. run-and-wait and run-and-follow ---------------------------------------------


def test_start_with_wait_returns_the_final_status(shared):
    api, w = shared.api, shared.worker
    started = time.monotonic()
    status, headers, job = api.post(
        jobs_path(w) + "?wait=true",
        {"command": "bash", "path": "sleep.sh", "args": ["1"]},
    )
    assert status == 201
    assert time.monotonic() - started >= 1.0
    assert (job["state"], job["exit_reason"], job["exit_code"]) == (
        "succeeded",
        "succeeded",
        0,
    )
    assert job["ended_at"] is not None
    assert headers["Location"].endswith(job["job_id"])
    assert status_of(api, w, job["job_id"]) == job


def test_start_with_wait_is_202_while_the_job_outlives_the_wait(restarts):
    api, w = restarts.api, restarts.worker
    status, _, job = api.post(
        jobs_path(w) + "?wait=true",
        {"command": "bash", "path": "sleep.sh", "args": ["300"], "timeout_s": 60},
    )
    try:
        assert status == 202, job
        assert job["state"] == "running"
    finally:
        api.post(jobs_path(w, job["job_id"], "/stop"))


def curl_follow(c: DevCluster, worker: str, body: dict) -> subprocess.CompletedProcess:
    """The README's line for cron: start, stream the output, fail if the job did."""
    return subprocess.run(
        [
            "curl",
            "-fsSN",
            "-H",
            f"Authorization: Bearer {c.token}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
            f"{c.url}{jobs_path(worker)}?follow=true",
        ],
        capture_output=True,
        timeout=60,
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_follow_exits_zero_only_when_the_job_succeeds(shared):
    c, w = shared.cluster, shared.worker
    ok = curl_follow(
        c, w, {"command": "bash", "path": "count.sh", "args": ["3", "0.1"]}
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == b"1\n2\n3\n"
    bad = curl_follow(c, w, {"command": "bash", "path": "mixed.sh", "args": ["3"]})
    assert bad.returncode == 18  # curl: the transfer ended before its last chunk
    assert bad.stdout.startswith(b"out 1\nerr 1\nout 2\nerr 2\n")
    last = bad.stdout.decode().splitlines()[-1]
    assert re.fullmatch(r"\[jobgate: job [0-9a-f-]{36} failed: .*code 3.*\]", last)


# -- 8. idempotency -----------------------------------------------------------------


def test_idempotency_key_returns_the_original_job_on_that_worker_only(api):
    key = str(uuid.uuid4())
    body = {"command": "bash", "path": "hello.sh", "idempotency_key": key}
    status, _, first = api.post(jobs_path("worker-1"), body)
    assert status == 201
    final, _ = run_to_end(api, "worker-1", first["job_id"])
    # After the end, and with other arguments: still the original job.
    status, _, again = api.post(jobs_path("worker-1"), {**body, "args": ["other"]})
    assert status == 200
    assert again == final
    with_key = [
        j
        for j in api.get(jobs_path("worker-1"))[2]["jobs"]
        if j["idempotency_key"] == key
    ]
    assert [j["job_id"] for j in with_key] == [first["job_id"]]
    # The key belongs to that worker: another worker starts a job of its own.
    status, _, other = api.post(jobs_path("worker-2"), body)
    assert status == 201
    assert other["job_id"] != first["job_id"]


# -- 8. per-job limits ----------------------------------------------------------------


def host_enforces(*names: str) -> list[str]:
    """Which of ``names`` a worker on this host could enforce."""
    from worker import isolation
    from worker.limits import Enforcer

    instance = f"probe-{uuid.uuid4().hex[:8]}"
    try:
        groups = isolation.Cgroups.create(instance)
    except OSError:
        groups = None
    base = groups.base if groups else None
    enforcer = Enforcer.discover(instance, base, lambda j: f"{base}/{j}")
    found = [n for n in names if enforcer.how(n)]
    enforcer.close()
    if groups:
        groups.close()
    return found


@pytest.fixture(scope="module")
def capped(scripts_dir):
    """One worker whose jobs get at most 512 MiB and 64 tasks."""
    missing = {"memory_mb", "tasks"} - set(host_enforces("memory_mb", "tasks"))
    if missing:
        skip_unless_required(
            f"this host cannot enforce {sorted(missing)}", "JOBGATE_REQUIRE_CGROUP"
        )
    yield from _own_cluster(
        "jobgate-test-capped-",
        scripts_dir,
        "cap-1",
        worker_extra="max_memory_mb = 512\nmax_tasks = 64\n",
    )


def test_a_job_over_its_memory_limit_is_oom_and_limits_show(capped):
    api, w = capped.api, capped.worker
    status, _, worker = api.get(f"/v1/workers/{w}")
    assert status == 200
    assert {"memory_mb", "tasks"} <= set(worker["enforceable_limits"])
    job = api.start(w, "hog.sh", ["600"], limits={"memory_mb": 32})
    assert job["limits"] == {"memory_mb": 32, "tasks": 64}
    final, _ = run_to_end(api, w, job["job_id"])
    assert (final["state"], final["exit_reason"]) == ("failed", "oom")
    assert final["reason"] == "killed for using more than its memory limit of 32 MiB"
    # A job that asks for nothing runs with the worker's maxima.
    job = api.start(w, "hog.sh", ["8"])
    final, _ = run_to_end(api, w, job["job_id"])
    assert final["state"] == "succeeded"
    assert final["limits"] == {"memory_mb": 512, "tasks": 64}


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ({"memory_mb": 513}, "limits.memory_mb 513 is above this worker's maximum 512"),
        ({"tasks": 65}, "[jobs].max_tasks"),
        ({"swap_mb": 1}, "limits.swap_mb: unknown limit"),
        ({"memory_mb": "1G"}, "limits.memory_mb: must be an integer"),
        ([1], "limits: must be an object"),
    ],
)
def test_limits_above_the_maxima_or_malformed_are_400(capped, limits, words):
    api, w = capped.api, capped.worker
    before = job_ids(api, w)
    status, _, body = api.post(
        jobs_path(w), {"command": "bash", "path": "hello.sh", "limits": limits}
    )
    assert status == 400, body
    assert words in body["description"]
    assert job_ids(api, w) == before


def test_fan_out_carries_the_limits(capped):
    api, w = capped.api, capped.worker
    status, _, body = api.post(
        "/v1/jobs",
        {"workers": [w], "command": "bash", "path": "hello.sh", "limits": {"tasks": 8}},
    )
    assert status == 201, body
    [job] = body["jobs"]
    assert status_of(api, w, job["job_id"])["limits"] == {"memory_mb": 512, "tasks": 8}
