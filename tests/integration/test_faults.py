"""Faults with real processes: killed, frozen, restarted and cut-off members.

Each test asserts what a user of the HTTP API sees while the fault lasts and
after it, and that no worker and no job record was lost. The bounds come from
the generated configs ([workers] of the scheduler, [scheduler] of a worker).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Api, make_public_dir, skip_unless_required
from test_lifecycle import pid_alive, wait_for

from jobgate.dev.cluster import DevCluster
from jobgate.dev.process import Process
from scheduler import config as scheduler_config
from worker import config as worker_config

# An answer that needs no worker (503 for a worker that is down, or any answer
# from a healthy worker) comes in well under a second.
FAST_S = 0.5
# Slack on top of a configured bound: heartbeat phase, polling, process start.
MARGIN_S = 1.5
PAIR = ("worker-a", "worker-b")


# -- helpers ---------------------------------------------------------------------


def ts(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp of the API."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Client(Api):
    """The tests' HTTP client; it remembers every job it started."""

    def __init__(self, cluster: DevCluster):
        super().__init__(cluster)
        self.job_ids: set[str] = set()

    def call(self, method: str, path: str, body=None, **kw):
        status, headers, data = super().call(method, path, body, **kw)
        if method == "POST" and isinstance(data, dict):
            if "job_id" in data:
                self.job_ids.add(data["job_id"])
            for job in data.get("jobs", ()):
                if isinstance(job, dict) and "job_id" in job:
                    self.job_ids.add(job["job_id"])
        return status, headers, data

    def timed(self, method: str, path: str, body=None, timeout: float = 30.0):
        """(seconds taken, (status, headers, data)); status None: no answer."""
        started = time.monotonic()
        try:
            answer = self.call(method, path, body, timeout=timeout)
        except TimeoutError:
            answer = (None, {}, f"no answer within {timeout}s")
        return time.monotonic() - started, answer

    def worker(self, name: str) -> dict:
        status, _, data = self.get(f"/v1/workers/{name}")
        assert status == 200, (status, data)
        return data


def job_processes(job_ids: set[str]) -> list[int]:
    """Pids of live processes of the given jobs (found by their environment)."""
    wanted = {f"JOBGATE_JOB_ID={j}".encode() for j in job_ids}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if env & wanted:
            found.append(int(entry.name))
    return found


def end_jobs(job_ids: set[str]) -> None:
    """SIGKILL what is left of the given jobs (a killed worker leaves its jobs)."""
    for _ in range(10):
        pids = job_processes(job_ids)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def remove_job_cgroups(cluster: DevCluster, job_ids: set[str]) -> None:
    """Remove the (empty) cgroups that killed workers and their jobs left."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        own = Path("/proc/self/cgroup").read_text()
    except OSError:
        return
    mounts = [
        Path(line.split(" - ")[0].split()[4])
        for line in mountinfo
        if " - cgroup2 " in line
    ]
    match = re.search(r"^0::(.*)$", own, re.M)
    if not mounts or match is None:
        return
    # Workers are this process's children: their job cgroups are below ours,
    # in a directory named after the worker and its state directory.
    base = mounts[0] / match.group(1).lstrip("/")
    for name in cluster.workers:
        state_dir = (cluster.dir / "state" / name).resolve()
        key = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
        parent = base / f"jobgate-{name}-{key}"
        for d in [*(parent / j for j in job_ids), parent]:
            try:
                d.rmdir()
            except OSError:
                pass


@pytest.fixture
def clusters(scripts_dir):
    """Makes clusters; every process and job of them ends in teardown."""
    made: list[tuple[DevCluster, Client, Path]] = []

    def make(
        tag: str, workers: tuple[str, ...] = PAIR, start: bool = True, **kw
    ) -> tuple[DevCluster, Client]:
        directory = make_public_dir(f"jobgate-test-faults-{tag}-")
        kw.setdefault("http_processes", 2)
        c = DevCluster(directory, scripts_dir=scripts_dir, **kw)
        client = Client(c)
        made.append((c, client, directory))
        c.prepare()
        if start:
            c.start_scheduler()
            for name in workers:
                c.start_worker(name, wait=False)
            for name in workers:
                c.worker_info[name] = c.workers[name].wait_ready()
        return c, client

    yield make
    for c, client, directory in made:
        try:
            c.stop()  # it also continues stopped processes so they can exit
        finally:
            end_jobs(client.job_ids)
            remove_job_cgroups(c, client.job_ids)
            shutil.rmtree(directory, ignore_errors=True)


def bounds(c: DevCluster) -> scheduler_config.WorkersSection:
    return scheduler_config.load(c.dir / "scheduler.toml").workers


def wait_state(api: Client, name: str, state: str, timeout: float):
    """Poll until worker ``name`` is ``state``; returns (seconds, worker)."""
    started = time.monotonic()
    while True:
        w = api.worker(name)
        elapsed = time.monotonic() - started
        if w["state"] == state:
            return elapsed, w
        if elapsed > timeout:
            pytest.fail(f"{name} is still {w['state']}, not {state}, after {timeout}s")
        time.sleep(0.05)


def watch_until_unreachable(
    api: Client, name: str, other: str, since: float, bound: float
):
    """Poll ``name`` until it is unreachable, timing requests for ``other``.

    Returns (seconds since ``since``, the worker as then shown, every state
    seen, [(seconds, status) of each request for ``other``]).
    """
    states, timings = [], []
    while True:
        w = api.worker(name)
        states.append(w["state"])
        elapsed = time.monotonic() - since
        if w["state"] == "unreachable":
            return elapsed, w, states, timings
        assert elapsed <= bound, f"{name} not unreachable after {bound}s: {states}"
        took, (status, _, _) = api.timed("GET", f"/v1/workers/{other}/jobs")
        timings.append((took, status))
        time.sleep(0.05)


def assert_fast_503s(api: Client, worker: str, job_id: str) -> None:
    """Every call that needs the worker answers 503 + Retry-After, at once."""
    base = f"/v1/workers/{worker}/jobs"
    calls = [
        ("GET", f"{base}/{job_id}", None),
        ("GET", f"{base}/{job_id}/output", None),
        ("GET", f"{base}/{job_id}/output?follow=true", None),
        ("POST", f"{base}/{job_id}/stop", None),
        ("POST", base, {"command": "bash", "path": "hello.sh"}),
    ]
    for method, path, body in calls:
        took, (status, headers, data) = api.timed(method, path, body)
        assert status == 503, (method, path, status, data)
        assert int(headers["Retry-After"]) >= 1, (method, path)
        assert "unreachable" in data["description"], (method, path, data)
        assert took < FAST_S, (method, path, took)


def assert_serves_fast(api: Client, worker: str) -> None:
    """A healthy worker answers start, status, output and list at full speed."""
    took, (status, _, job) = api.timed(
        "POST", f"/v1/workers/{worker}/jobs", {"command": "bash", "path": "hello.sh"}
    )
    assert status == 201 and took < FAST_S, (status, took, job)
    for path in (
        f"/v1/workers/{worker}/jobs/{job['job_id']}",
        f"/v1/workers/{worker}/jobs/{job['job_id']}/output?follow=true",
        f"/v1/workers/{worker}/jobs",
    ):
        took, (status, _, data) = api.timed("GET", path)
        assert status == 200 and took < FAST_S, (path, status, took, data)
    assert api.output(worker, job["job_id"]) == f"hello from {worker}\n".encode()


def assert_stale_listing(api: Client, worker: str, expected: dict[str, str]) -> None:
    """The job list answers from the scheduler's record, flagged as stale."""
    took, (status, headers, listing) = api.timed("GET", f"/v1/workers/{worker}/jobs")
    assert status == 200, (status, listing)
    assert took < FAST_S
    assert listing["stale"] is True
    assert "stale" in headers["Warning"]
    assert {j["job_id"]: j["state"] for j in listing["jobs"]} == expected


# -- a killed worker -----------------------------------------------------------------


def test_killed_worker_turns_unreachable_in_bounded_time_and_fails_fast(clusters):
    c, api = clusters("kill")
    hb = bounds(c)
    done = api.start("worker-a", "hello.sh")
    api.output("worker-a", done["job_id"])
    assert api.get(f"/v1/workers/worker-a/jobs/{done['job_id']}")[2]["state"] == (
        "succeeded"
    )
    running = api.start("worker-a", "sleep.sh", ["300"])
    before = api.worker("worker-a")
    assert before["state"] == "online"

    killed_at, since = time.time(), time.monotonic()
    c.workers["worker-a"].signal(signal.SIGKILL)
    c.workers["worker-a"].proc.wait(5)
    noticed, w, states, timings = watch_until_unreachable(
        api, "worker-a", "worker-b", since, hb.heartbeat_timeout_s + MARGIN_S
    )
    # Online until its heartbeats are overdue, then unreachable: never offline.
    assert set(states) <= {"online", "unreachable"}
    assert w["id"] == before["id"]
    # last_seen_at is its last heartbeat, from before the kill, and it was
    # not declared unreachable before the timeout had passed since then.
    last_seen = ts(w["last_seen_at"])
    assert killed_at - hb.heartbeat_interval_s - MARGIN_S <= last_seen
    assert last_seen <= killed_at + 0.2
    assert time.time() > last_seen + hb.heartbeat_timeout_s
    # The other worker was not slowed down while the scheduler waited.
    assert timings and all(status == 200 for _, status in timings)
    assert max(took for took, _ in timings) < FAST_S, timings

    assert_fast_503s(api, "worker-a", running["job_id"])
    assert_serves_fast(api, "worker-b")
    assert_stale_listing(
        api,
        "worker-a",
        {done["job_id"]: "succeeded", running["job_id"]: "running"},
    )
    listed = {x["name"]: x["state"] for x in api.get("/v1/workers")[2]["workers"]}
    assert listed == {"worker-a": "unreachable", "worker-b": "online"}


# -- a frozen worker -----------------------------------------------------------------


def test_frozen_worker_is_unreachable_then_online_again_with_the_same_id(clusters):
    c, api = clusters("freeze")
    hb = bounds(c)
    job = api.start("worker-a", "sleep.sh", ["300"])
    jid = job["job_id"]
    before = api.worker("worker-a")
    frozen = c.workers["worker-a"]

    since = time.monotonic()
    frozen.signal(signal.SIGSTOP)
    # Calls made before the scheduler noticed hang on an open connection;
    # they must end at the call deadline plus the short health check that
    # tells a hung worker (503) from a busy one, not later.
    bound = hb.rpc_timeout_s + 2.0
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            hung = {
                path: pool.submit(api.timed, "GET", path, timeout=bound + 3)
                for path in (
                    f"/v1/workers/worker-a/jobs/{jid}",
                    "/v1/workers/worker-a/jobs",
                    f"/v1/workers/worker-a/jobs/{jid}/output",
                    f"/v1/workers/worker-a/jobs/{jid}/output?follow=true",
                )
            }
            noticed, w, states, timings = watch_until_unreachable(
                api, "worker-a", "worker-b", since, hb.heartbeat_timeout_s + MARGIN_S
            )
            assert_fast_503s(api, "worker-a", jid)
            assert_serves_fast(api, "worker-b")
            ended = {path: f.result() for path, f in hung.items()}
        assert set(states) <= {"online", "unreachable"}
        assert ts(w["last_seen_at"]) <= time.time() - hb.heartbeat_timeout_s
        assert timings and all(status == 200 for _, status in timings)
        assert max(took for took, _ in timings) < FAST_S, timings
        assert_stale_listing(api, "worker-a", {jid: "running"})
    finally:
        frozen.signal(signal.SIGCONT)

    # Heard from again at its next heartbeat; it was never deregistered.
    back, after = wait_state(
        api, "worker-a", "online", hb.heartbeat_interval_s + MARGIN_S
    )
    assert after["id"] == before["id"]
    assert after["registered_at"] == before["registered_at"]
    assert frozen.running()
    status, _, data = api.get(f"/v1/workers/worker-a/jobs/{jid}")
    assert status == 200 and data["state"] == "running", data
    status, _, data = api.post(f"/v1/workers/worker-a/jobs/{jid}/stop")
    assert status == 200 and data["state"] == "stopped", data

    late = {
        path: (round(took, 2), status, data)
        for path, (took, (status, headers, data)) in ended.items()
        if status != 503 or took > bound or int(headers["Retry-After"]) < 1
    }
    assert not late, f"not a 503 within {bound}s: {late}"


# -- scheduler restarts --------------------------------------------------------------


def test_scheduler_restarted_twice_with_jobs_running_loses_nothing(clusters):
    c, api = clusters("restart")
    hb = bounds(c)
    pids = {n: c.workers[n].pid for n in PAIR}
    ids = {n: api.worker(n)["id"] for n in PAIR}
    lines = 80
    talkers = {n: api.start(n, "count.sh", [str(lines), "0.1"]) for n in PAIR}
    status, _, group = api.post(
        "/v1/jobs",
        {"workers": list(PAIR), "command": "bash", "path": "sleep.sh", "args": ["300"]},
    )
    assert status == 201 and len(group["jobs"]) == 2, group
    sleepers = {j["worker_name"]: j["job_id"] for j in group["jobs"]}
    started = {n: {talkers[n]["job_id"], sleepers[n]} for n in PAIR}

    for _ in range(2):
        for n in PAIR:
            started[n].add(api.start(n, "hello.sh")["job_id"])
        old = c.scheduler.pid
        restarted_at = time.time()
        c.restart_scheduler()
        assert c.scheduler.pid != old
        for n in PAIR:
            # Back on its own: the restarted scheduler hears from the very
            # same process, under the same id.
            assert wait_for(
                lambda n=n, t=restarted_at: ts(api.worker(n)["last_seen_at"]) > t,
                timeout=hb.heartbeat_timeout_s + MARGIN_S,
            ), f"{n} not heard from after the restart"
            w = api.worker(n)
            assert w["state"] == "online"
            assert w["id"] == ids[n]
            assert c.workers[n].pid == pids[n] and c.workers[n].running()

            status, _, listing = api.get(f"/v1/workers/{n}/jobs")
            assert status == 200 and listing["stale"] is False
            assert started[n] <= {j["job_id"] for j in listing["jobs"]}
            status, _, sleeper = api.get(f"/v1/workers/{n}/jobs/{sleepers[n]}")
            assert status == 200 and sleeper["state"] == "running", sleeper

        # The group, from the scheduler's own record, survived too.
        status, _, g = api.get(f"/v1/groups/{group['group_id']}")
        assert status == 200
        assert {j["job_id"] for j in g["jobs"]} == set(sleepers.values())
        assert g["summary"]["states"] == {"running": 2}, g["summary"]

    for n in PAIR:
        jid = talkers[n]["job_id"]
        # Followed to its end, the output is whole: nothing lost to restarts.
        expected = "".join(f"{i}\n" for i in range(1, lines + 1))
        assert api.output(n, jid).decode() == expected
        assert api.get(f"/v1/workers/{n}/jobs/{jid}")[2]["state"] == "succeeded"
        api.post(f"/v1/workers/{n}/jobs/{sleepers[n]}/stop")


# -- worker restarts -----------------------------------------------------------------


def test_worker_stopped_mid_job_stops_it_and_returns_with_its_id(clusters):
    c, api = clusters("term", workers=("worker-a",))
    before = api.worker("worker-a")
    ended = api.start("worker-a", "hello.sh")
    api.output("worker-a", ended["job_id"])
    ended_path = f"/v1/workers/worker-a/jobs/{ended['job_id']}"
    status, _, final = api.get(ended_path)
    assert status == 200 and final["state"] == "succeeded"
    job = api.start("worker-a", "sleep.sh", ["300"])
    jid = job["job_id"]

    assert c.workers["worker-a"].stop() == 0
    assert api.worker("worker-a")["state"] == "offline"
    assert wait_for(lambda: not pid_alive(job["pid"]), timeout=5)
    # The ended job's status is final and known; the other one's is not.
    assert api.get(ended_path)[::2] == (200, final)
    assert api.get(f"/v1/workers/worker-a/jobs/{jid}")[0] == 503
    status, _, listing = api.get("/v1/workers/worker-a/jobs")
    assert status == 200 and listing["stale"] is True
    assert jid in {j["job_id"] for j in listing["jobs"]}

    c.start_worker("worker-a")
    after = api.worker("worker-a")
    assert after["state"] == "online"
    assert after["id"] == before["id"]
    status, _, data = api.get(f"/v1/workers/worker-a/jobs/{jid}")
    assert status == 200
    assert data["state"] == "stopped" and data["exit_reason"] == "stopped", data
    assert data["stopped_by"] and "worker" in data["stopped_by"]
    assert data["ended_at"] is not None
    status, _, listing = api.get("/v1/workers/worker-a/jobs")
    assert listing["stale"] is False
    assert {j["job_id"]: j["state"] for j in listing["jobs"]} == {
        jid: "stopped",
        ended["job_id"]: "succeeded",
    }


def restart_killed_worker(c: DevCluster, name: str) -> None:
    old = c.workers[name]
    old.signal(signal.SIGKILL)
    old.proc.wait(5)
    c.start_worker(name)
    assert c.workers[name].pid != old.pid


def keeper_of(job_id: str) -> int:
    """The pid of the job's keeper (it carries the job's environment)."""
    for pid in job_processes({job_id}):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "jobgate-keeper":
                return pid
        except OSError:
            continue
    raise AssertionError(f"no keeper for job {job_id}")


def test_a_job_outlives_a_killed_worker_and_is_adopted_with_its_real_end(clusters):
    c, api = clusters("adopt", workers=("worker-a",))
    before = api.worker("worker-a")
    # 40 lines, one per 100 ms, then exit code 3: about 4 s.
    job = api.start("worker-a", "lastwords.sh", ["40", "0.1", "3"])
    jid = job["job_id"]
    path = f"/v1/workers/worker-a/jobs/{jid}"
    assert wait_for(
        lambda: api.output("worker-a", jid, "follow=false").count(b"\n") >= 3
    )
    seen = api.output("worker-a", jid, "follow=false")

    restart_killed_worker(c, "worker-a")
    after = api.worker("worker-a")
    assert after["state"] == "online" and after["id"] == before["id"]
    status, _, data = api.get(path)
    assert status == 200 and data["state"] == "running", data
    assert data["pid"] == job["pid"]
    # A follower resuming where it was cut gets the rest, and the job's end.
    rest = api.output("worker-a", jid, f"follow=true&offset={len(seen)}")
    whole = seen + rest
    lines = whole.split(b"\n")
    assert lines[-1] == b"last words"
    assert [int(line.split()[1]) for line in lines[:-1]] == list(range(1, 41))
    assert api.output("worker-a", jid) == whole
    status, _, data = api.get(path)
    assert status == 200, data
    assert data["state"] == "failed" and data["exit_code"] == 3, data
    assert data["output_bytes"] == len(whole)


def test_a_timeout_that_passed_while_the_worker_was_away_ends_the_job(clusters):
    c, api = clusters("adopt-timeout", workers=("worker-a",))
    job = api.start("worker-a", "sleep.sh", ["300"], timeout_s=2)
    jid = job["job_id"]
    c.workers["worker-a"].signal(signal.SIGKILL)
    c.workers["worker-a"].proc.wait(5)
    time.sleep(2.5)
    assert pid_alive(job["pid"])  # nobody ended it meanwhile
    c.start_worker("worker-a")
    path = f"/v1/workers/worker-a/jobs/{jid}"
    assert wait_for(lambda: api.get(path)[2]["state"] != "running", timeout=5)
    data = api.get(path)[2]
    assert data["state"] == "timed_out" and data["exit_reason"] == "timed_out", data
    assert not pid_alive(job["pid"])


def test_a_job_whose_keeper_died_with_the_worker_is_lost(clusters):
    c, api = clusters("lost", workers=("worker-a",))
    job = api.start("worker-a", "lastwords.sh", ["100000", "0.05"])
    jid = job["job_id"]
    assert wait_for(
        lambda: api.output("worker-a", jid, "follow=false").count(b"\n") >= 3
    )
    seen = api.output("worker-a", jid, "follow=false")
    keeper = keeper_of(jid)
    c.workers["worker-a"].signal(signal.SIGKILL)
    c.workers["worker-a"].proc.wait(5)
    os.kill(keeper, signal.SIGKILL)
    end_jobs({jid})
    c.start_worker("worker-a")

    status, _, data = api.get(f"/v1/workers/worker-a/jobs/{jid}")
    assert status == 200
    assert data["state"] == "lost" and data["exit_reason"] == "lost", data
    assert data["ended_at"] is not None and "keeper" in data["reason"], data
    # What it wrote before the worker died is kept, and following ends.
    assert api.output("worker-a", jid).startswith(seen)
    status, _, listing = api.get("/v1/workers/worker-a/jobs")
    assert listing["stale"] is False
    assert {j["job_id"]: j["state"] for j in listing["jobs"]} == {jid: "lost"}


# -- a worker that starts first ------------------------------------------------------


def retry_waits(proc: Process) -> list[float]:
    """The waits the worker announced between registration attempts."""
    text = proc.log_path.read_text(errors="replace")
    return [
        float(m)
        for m in re.findall(r"registration failed .*retrying in ([\d.]+)s", text)
    ]


def test_worker_started_before_the_scheduler_retries_then_registers(clusters):
    c, api = clusters("early", workers=(), start=False)
    # Start and stop the scheduler once: its port is then fixed, and no one
    # listens on it.
    c.start_scheduler()
    c.scheduler.stop()
    early = c.start_worker("worker-a", wait=False)
    retry = worker_config.load(c.dir / "worker-a.toml").scheduler
    retry_max = retry.retry_max_s

    # It keeps trying, waiting twice as long each time up to the cap, and
    # stays up.
    assert wait_for(lambda: retry_waits(early).count(retry_max) >= 2, timeout=20), (
        early.log_tail()
    )
    waits = retry_waits(early)
    expected = [retry.retry_initial_s]
    while len(expected) < len(waits):
        expected.append(min(expected[-1] * 2, retry_max))
    assert waits == [round(x, 1) for x in expected], waits
    assert early.running()
    assert not early.ready_file.exists()

    c.start_scheduler()
    since = time.monotonic()
    info = early.wait_ready(timeout=retry_max + 10)
    assert time.monotonic() - since <= retry_max + MARGIN_S
    assert early.running() and c.workers["worker-a"] is early
    w = api.worker("worker-a")
    assert w["state"] == "online"
    assert w["id"] == info["worker_id"]
    job = api.start("worker-a", "hello.sh")
    assert api.output("worker-a", job["job_id"]) == b"hello from worker-a\n"


# -- a network cut -------------------------------------------------------------------


@dataclass(frozen=True)
class Netns:
    name: str
    host_if: str
    host_ip: str
    ns_ip: str

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def must(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)}: {result.stderr}"


def free_test_subnet() -> tuple[str, str]:
    """Two addresses of a /30 in 198.18.0.0/24 that this host does not use."""
    used_text = ip("-o", "-4", "addr", "show").stdout + ip("-4", "route").stdout
    used = {int(x) // 4 for x in re.findall(r"198\.18\.0\.(\d+)", used_text)}
    free = [b for b in range(64) if b not in used]
    assert free, "every /30 of 198.18.0.0/24 is in use on this host"
    base = 4 * random.choice(free)  # noqa: S311 - not a secret
    return f"198.18.0.{base + 1}", f"198.18.0.{base + 2}"


def add_netns(name: str) -> str | None:
    """Make network namespace ``name``; if that is not permitted here, why."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating a network namespace needs root"
    made = ip("netns", "add", name)
    if made.returncode != 0:
        if not re.search(r"not permitted|permission denied", made.stderr, re.I):
            pytest.fail(f"ip netns add {name}: {made.stderr}")
        return f"ip netns add is not permitted here: {made.stderr.strip()}"
    return None


@pytest.fixture
def netns():
    """A network namespace linked to this one by a veth pair; gone afterwards."""
    tag = secrets.token_hex(4)
    name, host_if, ns_if = f"jobgate-test-{tag}", f"jgh{tag}", f"jgn{tag}"
    reason = add_netns(name)
    if reason is not None:
        skip_unless_required(reason, "JOBGATE_REQUIRE_NETNS")
    try:
        ns = Netns(name, host_if, *free_test_subnet())
        must(ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns_if))
        must(ip("link", "set", ns_if, "netns", ns.name))
        must(ip("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if))
        must(ip("link", "set", ns.host_if, "up"))
        must(ip("-n", ns.name, "addr", "add", f"{ns.ns_ip}/30", "dev", ns_if))
        must(ip("-n", ns.name, "link", "set", ns_if, "up"))
        must(ip("-n", ns.name, "link", "set", "lo", "up"))
        yield ns
    finally:
        # Whatever still runs inside (normally nothing: the cluster stopped it).
        for pid in ip("netns", "pids", name).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        ip("link", "del", host_if)
        ip("netns", "del", name)


def test_worker_cut_off_by_the_network_is_unreachable_then_online_again(
    netns, clusters
):
    # The scheduler's gRPC server listens on the host end of the link (a local
    # worker reaches that address too); HTTP stays on 127.0.0.1.
    c, api = clusters("netcut", workers=(), start=False, grpc_host=netns.host_ip)
    c.start_scheduler()
    c.start_worker("worker-near")
    far = c.start_worker("worker-far", host=netns.ns_ip, prefix=netns.exec_prefix())
    hb = bounds(c)
    assert os.readlink(f"/proc/{far.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    before = api.worker("worker-far")
    assert before["address"].startswith(f"{netns.ns_ip}:")
    job = api.start("worker-far", "sleep.sh", ["300"])  # calls cross the link
    jid = job["job_id"]

    since = time.monotonic()
    must(ip("link", "set", netns.host_if, "down"))
    try:
        noticed, w, states, timings = watch_until_unreachable(
            api, "worker-far", "worker-near", since, hb.heartbeat_timeout_s + MARGIN_S
        )
        assert set(states) <= {"online", "unreachable"}
        assert far.running()
        assert timings and all(status == 200 for _, status in timings)
        assert max(took for took, _ in timings) < FAST_S, timings
        assert_fast_503s(api, "worker-far", jid)
        assert_serves_fast(api, "worker-near")
        assert_stale_listing(api, "worker-far", {jid: "running"})
    finally:
        must(ip("link", "set", netns.host_if, "up"))

    # Once its heartbeats get through again it is online, same id, same job.
    _, after = wait_state(
        api, "worker-far", "online", hb.heartbeat_timeout_s + hb.rpc_timeout_s
    )
    assert after["id"] == before["id"]
    assert after["registered_at"] == before["registered_at"]
    status, _, data = api.get(f"/v1/workers/worker-far/jobs/{jid}")
    assert status == 200 and data["state"] == "running", data
    status, _, data = api.post(f"/v1/workers/worker-far/jobs/{jid}/stop")
    assert status == 200 and data["state"] == "stopped", data


# -- a full disk -------------------------------------------------------------------


def test_a_full_disk_names_the_failure_degrades_the_worker_and_it_recovers(
    clusters,
):
    if os.geteuid() != 0:
        skip_unless_required("mounting a tmpfs needs root", "JOBGATE_REQUIRE_ROOT")
    c, api = clusters(
        "disk",
        workers=("disk-1",),
        start=False,
        worker_extra="alive_interval_s = 0.2\nmin_free_bytes = 65536\n",
    )
    state = c.dir / "state" / "disk-1"
    state.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(state)],
        check=True,
    )
    try:
        c.start_scheduler()
        c.start_worker("disk-1")
        # 20 MB of output on a 4 MB disk.
        job = api.start("disk-1", "big.sh", ["200000"])
        api.output("disk-1", job["job_id"])
        status, _, final = api.get(f"/v1/workers/disk-1/jobs/{job['job_id']}")
        assert status == 200
        assert (final["state"], final["exit_reason"]) == ("failed", "output_failed")
        # The job itself ran to its end: no SIGPIPE of the worker's making.
        assert (final["exit_code"], final["signal"]) == (0, None)
        assert "No space left on device" in final["reason"]
        assert final["output_bytes"] < 4 * 1024 * 1024
        # The worker says why it starts no jobs; the scheduler refuses them.
        deadline = time.monotonic() + 5
        while not api.worker("disk-1")["degraded"]:
            assert time.monotonic() < deadline, "the worker never said it is degraded"
            time.sleep(0.05)
        worker = api.worker("disk-1")
        assert worker["state"] == "online"
        # It names the full disk: a write that failed, or the space left.
        assert str(state) in worker["degraded"]
        assert re.search(r"No space left on device|0 bytes free", worker["degraded"])
        status, headers, body = api.post(
            "/v1/workers/disk-1/jobs", {"command": "bash", "path": "hello.sh"}
        )
        assert status == 503
        assert "Retry-After" in headers
        assert "degraded" in body["description"]
        assert str(state) in body["description"]
        # A fan-out skips it and says why.
        status, _, body = api.post(
            "/v1/jobs",
            {"workers": ["disk-1"], "command": "bash", "path": "hello.sh"},
        )
        assert status == 201, body
        assert body["jobs"] == []
        assert "degraded" in json.dumps(body["errors"])
        # Space comes back: the worker recovers by itself.
        shutil.rmtree(state / "jobs" / job["job_id"])
        deadline = time.monotonic() + 5
        while api.worker("disk-1")["degraded"]:
            assert time.monotonic() < deadline, "the worker never recovered"
            time.sleep(0.05)
        again = api.start("disk-1", "hello.sh", ["back"])
        assert api.output("disk-1", again["job_id"]) == (
            b"hello from disk-1\narg: back\n"
        )
        _, _, final = api.get(f"/v1/workers/disk-1/jobs/{again['job_id']}")
        assert final["state"] == "succeeded"
    finally:
        c.stop()
        subprocess.run(["umount", "-l", str(state)], check=False)
