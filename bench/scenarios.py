"""The scenarios of the benchmark suite (see bench/README.md).

Each scenario starts its own cluster (:class:`bench.cluster.BenchCluster`),
measures, stops it, and returns ``(figures, settings)``: a flat dict of
numbers, and the config settings it ran with beyond the defaults.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench import load
from bench.cluster import (
    HEARTBEAT_INTERVAL_S,
    WORKER,
    BenchCluster,
    CpuMeter,
    ProcSampler,
    cpu_seconds,
    descendants,
    running,
    sim_worker_certs,
    tree_cpu_s,
)
from bench.load import Request

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    starts: int = 500
    status_s: float = 10.0
    status_clients: tuple[int, ...] = (1, 8, 32)
    warmup_s: float = 1.0
    output_bytes: int = 1024 * MiB
    follow_lines: int = 1000
    follow_interval_s: float = 0.01
    follow_skip: int = 50  # lines written while the stream was being set up
    followers: int = 10_000
    followers_batches: int = 200  # lines.sh: batches of lines, one every 0.1 s
    followers_lines: int = 5  # 100-byte lines: 100 kB over 20 s
    slow_idle: int = 5000
    slow_partial: int = 1000
    sim_workers: int = 5000
    sim_processes: int = 2
    jobs: int = 200
    job_interval_s: float = 0.05
    ha_clients: tuple[int, ...] = (8, 32)
    kills: int = 20
    kill_timeout_s: float = 10.0  # a kill after which nothing answers so long
    settle_s: float = 1.0  # between a scheduler's restart and the next kill


FULL = Sizes()
TINY = Sizes(
    starts=20,
    status_s=1.0,
    warmup_s=0.3,
    output_bytes=5 * 1000 * 1000,
    follow_lines=100,
    follow_skip=10,
    followers=10,
    followers_batches=10,
    followers_lines=10,
    slow_idle=20,
    slow_partial=10,
    sim_workers=50,
    sim_processes=1,
    jobs=10,
    kills=2,
    settle_s=0.3,
)


def _start_body(path: str, args=()) -> dict:
    return {"command": "bash", "path": path, "args": [str(a) for a in args]}


def finished_job(c: BenchCluster) -> str:
    job = c.start_job("exit0.sh")
    final = c.wait_job(job["job_id"])
    assert final["state"] == "succeeded", final
    return job["job_id"]


def status_request(kind: str, job_id: str) -> Request:
    """``query`` (the original API) or a ``GET`` of the job."""
    if kind == "query":
        return Request("POST", "/query", {"worker_id": WORKER, "job_id": job_id})
    return Request("GET", f"/v1/workers/{WORKER}/jobs/{job_id}")


# -- 1. start latency -------------------------------------------------------------


def start_latency(s: Sizes) -> tuple[dict, dict]:
    c = BenchCluster()
    figures = {}
    with running(c):
        routes = {
            "v1_": Request(
                "POST", f"/v1/workers/{WORKER}/jobs", _start_body("exit0.sh"), 201
            ),
            "legacy_": Request(
                "POST", "/start", {"worker_id": WORKER, **_start_body("exit0.sh")}, 201
            ),
        }
        for prefix, req in routes.items():
            load.sequential(c.port, c.token, req, 10)  # warm-up: channels, caches
            r = load.sequential(c.port, c.token, req, s.starts)
            figures.update(load.latency_figures(r.latencies, prefix))
            figures[f"{prefix}rps"] = round(s.starts / r.duration, 1)
            figures[f"{prefix}errors"] = r.errors
            _raise_on_errors(r)
    return figures, c.settings()


def _raise_on_errors(r: load.LoadResult) -> None:
    if r.errors > len(r.latencies) // 100:  # more than 1 %: not a valid figure
        raise RuntimeError(f"{r.errors} requests failed, e.g. {r.error_samples}")


# -- 2. status throughput ---------------------------------------------------------


def status_throughput(s: Sizes) -> tuple[dict, dict]:
    c = BenchCluster()
    figures = {}
    with running(c):
        job_id = finished_job(c)
        # A running job's status comes from its worker on every call; an
        # ended one's from the scheduler's index (measured without a target).
        running_id = c.start_job("steady.sh", [1, 600])["job_id"]
        http = descendants(c.scheduler.pid)  # the gunicorn master and workers
        for kind in ("query", "get", "running"):
            req = status_request(kind, running_id if kind == "running" else job_id)
            for clients in s.status_clients:
                if kind == "running" and clients != 8:
                    continue
                cpu0 = _cpu_of(http), cpu_seconds(c.worker_pid())
                r = load.closed_loop(
                    c.port, c.token, req, clients, s.status_s, s.warmup_s
                )
                cpu1 = _cpu_of(http), cpu_seconds(c.worker_pid())
                _raise_on_errors(r)
                prefix = f"{kind}_c{clients}_"
                figures.update(load.throughput_figures(r, prefix))
                # CPU per request (over warm-up and measurement alike), in
                # microseconds: the HTTP processes', the worker's, the client's.
                done = len(r.latencies) * (s.warmup_s + s.status_s) / s.status_s
                for name, used in (
                    ("http", cpu1[0] - cpu0[0]),
                    ("worker", cpu1[1] - cpu0[1]),
                    ("client", r.client_cpu_s),
                ):
                    figures[f"{prefix}{name}_cpu_us"] = round(1e6 * used / done)
    return figures, c.settings()


def _cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


# -- 3. output throughput ---------------------------------------------------------


def output_throughput(s: Sizes) -> tuple[dict, dict]:
    # The whole output is kept (head cap above its size): a follower slower
    # than the job would otherwise skip the bytes the cap drops (a gap).
    c = BenchCluster(
        worker={"jobs.output_head_bytes": str(s.output_bytes + MiB)},
    )
    with running(c):
        with ProcSampler(c.scheduler.pid, c.worker_pid()) as sampler:
            cpu0 = os.times()
            t0 = time.time()
            job = c.start_job("flood.sh", [s.output_bytes])
            got = load.follow(
                c.port,
                c.token,
                f"/v1/workers/{WORKER}/jobs/{job['job_id']}/output?follow=true",
                hash_output=False,
            )
            elapsed = got.ended_at - t0
            cpu1 = os.times()
        final = c.wait_job(job["job_id"])
    if got.error or got.status != 200 or got.nbytes != s.output_bytes:
        raise RuntimeError(
            f"follower got {got.nbytes} of {s.output_bytes} bytes "
            f"(status {got.status}) {got.error}"
        )
    if final["state"] != "succeeded" or final["output_bytes"] != s.output_bytes:
        raise RuntimeError(f"flood job ended badly: {final}")
    client_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    figures = {
        "bytes": got.nbytes,
        "seconds": round(elapsed, 3),
        "mb_per_s": round(got.nbytes / elapsed / 1e6, 1),
        **sampler.figures(),
        "client_cpu_pct": round(100 * client_cpu / elapsed),
    }
    return figures, c.settings()


# -- 4. follow latency ------------------------------------------------------------


def follow_latency(s: Sizes) -> tuple[dict, dict]:
    c = BenchCluster()
    delays: list[float] = []
    with running(c):
        # Start and follow in one request, so the stream is open from the start.
        conn = http.client.HTTPConnection(load.HOST, c.port, timeout=120)
        conn.request(
            "POST",
            f"/v1/workers/{WORKER}/jobs?follow=true",
            body=json.dumps(
                _start_body("ticks.sh", [s.follow_lines, s.follow_interval_s])
            ),
            headers={
                "Authorization": f"Bearer {c.token}",
                "Content-Type": "application/json",
            },
        )
        resp = conn.getresponse()
        if resp.status != 201:
            raise RuntimeError(f"start and follow: {resp.status} {resp.read()[:300]}")
        pending = b""
        while chunk := resp.read1(65536):
            arrived = time.time()
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            delays += [arrived - float(line) for line in lines if line]
        conn.close()
    measured = delays[s.follow_skip :]
    if len(delays) != s.follow_lines:
        raise RuntimeError(f"got {len(delays)} of {s.follow_lines} lines")
    figures = {
        "lines": len(measured),
        **load.latency_figures(measured),
    }
    return figures, c.settings()


# -- 5. many followers ------------------------------------------------------------


def expected_lines(batches: int, per_batch: int) -> bytes:
    """What ``lines.sh`` prints (100-byte numbered lines)."""
    return b"".join(b"line %09d %084d\n" % (n, 0) for n in range(batches * per_batch))


def _status_figures(c: BenchCluster, job_id: str, s: Sizes, prefix: str) -> dict:
    """``GET .../jobs/{job}`` with 8 keep-alive clients for ``status_s``."""
    r = load.closed_loop(
        c.port, c.token, status_request("get", job_id), 8, s.status_s, s.warmup_s
    )
    return load.throughput_figures(r, prefix)


def _wait_for_streams(c: BenchCluster, count: int, t0: float) -> float:
    """Seconds from ``t0`` until ``count`` output streams are open (or -1)."""
    import re

    deadline = time.time() + 60
    while time.time() < deadline:
        status, _, body = c.request("GET", "/metrics")
        if status == 200:
            found = re.search(rb"^jobgate_output_streams_open (\S+)$", body, re.M)
            if found and float(found.group(1)) >= count:
                return round(time.time() - t0, 2)
        time.sleep(0.2)
    return -1.0


def _ratios(figures: dict) -> None:
    for q in ("p50", "p99"):
        figures[f"{q}_ratio"] = round(
            figures[f"loaded_{q}_ms"] / max(figures[f"idle_{q}_ms"], 0.001), 2
        )


def many_followers(s: Sizes) -> tuple[dict, dict]:
    import hashlib
    import threading

    from bench import aioload

    # Defaults throughout: a follower costs the scheduler a coroutine, and
    # the followers in one HTTP process share one stream from the worker
    # ([workers].follow_window_bytes).
    c = BenchCluster()
    expected = expected_lines(s.followers_batches, s.followers_lines)
    want = hashlib.sha256(expected).hexdigest()
    figures: dict = {}
    with running(c):
        probe = c.start_job("steady.sh", [1, 600])["job_id"]
        figures.update(_status_figures(c, probe, s, "idle_"))
        with ProcSampler(c.scheduler.pid, c.worker_pid()) as sampler:
            t0 = time.time()
            job = c.start_job("lines.sh", [s.followers_batches, s.followers_lines, 0.1])
            path = f"/v1/workers/{WORKER}/jobs/{job['job_id']}/output?follow=true"
            done: dict = {}
            follow = threading.Thread(
                target=lambda: done.update(
                    result=aioload.many_followers(c.port, c.token, path, s.followers)
                )
            )
            follow.start()
            # Status calls once every follower is attached and following.
            figures["all_attached_s"] = _wait_for_streams(c, s.followers, t0)
            figures.update(_status_figures(c, probe, s, "loaded_"))
            follow.join()
            followed, client_cpu = done["result"]
            t1 = time.time()
        final = c.wait_job(job["job_id"])
    _ratios(figures)
    ended = _parse_time(final["ended_at"])
    good = [f for f in followed if f.status == 200 and f.sha256 == want]
    errors = sorted({f.error for f in followed if f.error})
    statuses: dict[str, int] = {}
    for f in followed:
        statuses[str(f.status)] = statuses.get(str(f.status), 0) + 1
    attached = [f.first_byte_at for f in followed if f.first_byte_at]
    figures.update(
        {
            "followers": s.followers,
            "correct": len(good),
            "incorrect": s.followers - len(good),
            "bytes_each": len(expected),
            # Followers whose first byte came while the job was still running.
            "attached_while_running": sum(1 for t in attached if t <= ended),
            "attach_s": round(max(attached) - t0, 3) if attached else -1,
            "seconds": round(t1 - t0, 3),
            **sampler.figures(),
            "client_cpu_s": round(client_cpu, 1),
        }
    )
    figures["status_codes"] = statuses
    sizes: dict[str, int] = {}
    for f in followed:
        if f.sha256 != want:
            sizes[str(f.nbytes)] = sizes.get(str(f.nbytes), 0) + 1
    if sizes:
        # How much the followers that got the wrong bytes got.
        figures["wrong_sizes"] = dict(sorted(sizes.items())[:5])
    if errors:
        figures["error_samples"] = errors[:3]
    return figures, c.settings()


def slow_clients(s: Sizes) -> tuple[dict, dict]:
    """Idle connections and partial requests held open while 8 clients ask
    for a job's status; the slow ones must be closed by the request deadline
    ([http].request_timeout_s, 10 s by default) and starve nobody."""
    from bench import aioload

    c = BenchCluster()
    figures: dict = {}
    with running(c):
        probe = c.start_job("steady.sh", [1, 600])["job_id"]
        figures.update(_status_figures(c, probe, s, "idle_"))
        with ProcSampler(c.scheduler.pid, c.worker_pid()) as sampler:
            with aioload.SlowClients(c.port, s.slow_idle, s.slow_partial) as slow:
                figures.update(_status_figures(c, probe, s, "loaded_"))
                closed = slow.result()
    _ratios(figures)
    partial = [x for x in closed if x[0] == "partial"]
    idle = [x for x in closed if x[0] == "idle"]
    figures.update(
        {
            "idle_connections": s.slow_idle,
            "partial_requests": s.slow_partial,
            "partial_answered_408": sum(1 for x in partial if x[1] == "408"),
            "idle_closed": sum(1 for x in idle if x[1] == "closed"),
            "connect_errors": sum(1 for x in closed if x[0] == "connect-error"),
            "slowest_close_s": round(max((x[2] for x in closed), default=0), 2),
            **sampler.figures(),
        }
    )
    return figures, c.settings()


def _parse_time(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- 6. many workers --------------------------------------------------------------


def _start_sims(
    c: BenchCluster, s: Sizes, certs: Path, tmp: Path, processes: int = 0
) -> list:
    """``s.sim_workers`` simulated workers in ``processes`` processes (by
    default ``s.sim_processes``), which take the schedulers in turn."""
    processes = processes or s.sim_processes
    per = -(-s.sim_workers // processes)
    procs = []
    for i in range(processes):
        first, count = i * per, min(per, s.sim_workers - i * per)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.simworkers",
                    "--target",
                    c.grpc_targets[i % len(c.grpc_targets)],
                    "--first",
                    str(first),
                    "--count",
                    str(count),
                    "--certs",
                    str(certs),
                    "--stats",
                    str(tmp / f"sim-{i}.json"),
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _stop_sims(procs: list) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def many_workers(s: Sizes) -> tuple[dict, dict]:
    return _fleet(s, 1)


def _fleet(s: Sizes, schedulers: int) -> tuple[dict, dict]:
    """Scenario 6 with ``schedulers`` schedulers: the simulated workers'
    processes and the status clients take them in turn."""
    certs = sim_worker_certs(s.sim_workers)
    c = BenchCluster(schedulers=schedulers)
    figures: dict = {}
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="jobgate-bench-sim-"))
    try:
        with running(c):
            job_id = finished_job(c)
            req = status_request("get", job_id)
            idle = load.closed_loop(c.ports, c.token, req, 8, s.status_s, s.warmup_s)
            _raise_on_errors(idle)
            figures.update(load.throughput_figures(idle, "idle_"))
            t0 = time.monotonic()
            procs = _start_sims(c, s, certs, tmp, max(s.sim_processes, schedulers))
            registered, register_errors = 0, 0
            for p in procs:
                line = p.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    raise RuntimeError("a simulated worker process exited early")
                info = json.loads(line)
                registered += info["registered"]
                register_errors += sum(info["register_errors"].values())
            figures["register_s"] = round(time.monotonic() - t0, 2)
            figures["registered"] = registered
            figures["register_retries"] = register_errors
            if registered != s.sim_workers:
                raise RuntimeError(f"only {registered} workers registered")
            # Each simulated worker sends its first heartbeat within one
            # interval of registering: let the load reach its steady state.
            time.sleep(min(HEARTBEAT_INTERVAL_S, s.status_s))
            sims = [p.pid for p in procs]
            groups = _cluster_cpu(c)
            groups["sim"] = lambda: sum(cpu_seconds(p) for p in sims)
            with (
                ProcSampler(c.scheduler.pid, c.worker_pid()) as sampler,
                CpuMeter(groups) as meter,
            ):
                t_from = time.time()
                loaded = load.closed_loop(
                    c.ports, c.token, req, 8, s.status_s, s.warmup_s
                )
                t_to = time.time()
            _raise_on_errors(loaded)
            figures.update(load.throughput_figures(loaded, "loaded_"))
            mem = sampler.figures()
            for key in ("scheduler_rss_peak_mb", "scheduler_pss_peak_mb"):
                figures[key] = mem[key]
            # The scheduler's main process serves gRPC (the heartbeats).
            cpu = meter.figures()
            figures["scheduler_grpc_cpu_pct"] = sum(
                cpu[f"cpu_grpc{i}_pct"] for i in range(1, schedulers + 1)
            )
            figures["sim_cpu_pct"] = cpu.pop("cpu_sim_pct")
            if schedulers > 1:
                figures.update(cpu)
            _, _, body = c.request("GET", "/v1/workers")
            states = [w["state"] for w in json.loads(body)["workers"]]
            figures["online"] = states.count("online")
            _stop_sims(procs)
    finally:
        _stop_sims(procs)
        beats: list = []
        details: dict[str, str] = {}
        for i in range(len(procs)):
            path = tmp / f"sim-{i}.json"
            if path.exists():
                stats = json.loads(path.read_text())
                beats += stats["beats"]
                details.update(stats["error_details"])
        shutil.rmtree(tmp, ignore_errors=True)
    # Heartbeats that completed while the status load was measured.
    measured = t_to - t_from - s.warmup_s
    window = [b for b in beats if t_from + s.warmup_s <= b[0] < t_to]
    failed: dict[str, int] = {}
    for b in window:
        if b[2]:
            failed[b[2]] = failed.get(b[2], 0) + 1
    figures["heartbeats_per_s"] = round(len(window) / measured, 1)
    figures["heartbeat_errors"] = sum(failed.values())
    figures["heartbeat_error_codes"] = failed
    if failed:
        figures["heartbeat_error_examples"] = details
    ok = [b[1] for b in window if not b[2]]
    figures["heartbeat_p50_ms"] = round(load.percentile(ok, 50) * 1000, 1)
    figures["heartbeat_p99_ms"] = round(load.percentile(ok, 99) * 1000, 1)
    for q in ("p50", "p99"):
        figures[f"{q}_ratio"] = round(
            figures[f"loaded_{q}_ms"] / figures[f"idle_{q}_ms"], 2
        )
    figures["rps_ratio"] = round(figures["loaded_rps"] / figures["idle_rps"], 2)
    settings = c.settings()
    settings["simulated_workers"] = {
        "count": s.sim_workers,
        "processes": max(s.sim_processes, schedulers),
        "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
    }
    return figures, settings


# -- 7. many jobs -----------------------------------------------------------------


def many_jobs(s: Sizes, limits: dict[str, str] | None = None) -> tuple[dict, dict]:
    c = BenchCluster(worker={"jobs.max_concurrent": str(s.jobs + 50), **(limits or {})})
    figures: dict = {}
    with running(c):
        job_id = finished_job(c)
        idle = load.closed_loop(
            c.port, c.token, status_request("get", job_id), 8, s.status_s, s.warmup_s
        )
        _raise_on_errors(idle)
        figures.update(load.throughput_figures(idle, "idle_"))
        t0 = time.monotonic()
        jobs = [
            c.start_job("steady.sh", [s.job_interval_s, 600])["job_id"]
            for _ in range(s.jobs)
        ]
        figures["start_all_s"] = round(time.monotonic() - t0, 2)
        time.sleep(1.0)  # let every job get going
        # Status of one of the running jobs: what a client polling it sees.
        req = status_request("get", jobs[len(jobs) // 2])
        bytes0 = _output_bytes(c, jobs)
        with ProcSampler(c.scheduler.pid, c.worker_pid()) as sampler:
            cpu0 = cpu_seconds(c.worker_pid())
            t_from = time.monotonic()
            busy = load.closed_loop(c.port, c.token, req, 8, s.status_s, s.warmup_s)
            elapsed = time.monotonic() - t_from
            cpu = cpu_seconds(c.worker_pid()) - cpu0
        bytes1 = _output_bytes(c, jobs)
        running_now = sum(1 for j in jobs if c.job(j)["state"] == "running")
    _raise_on_errors(busy)
    figures.update(load.throughput_figures(busy, "status_"))
    figures.update(
        {
            "jobs": s.jobs,
            "running": running_now,
            "worker_cpu_pct": round(100 * cpu / elapsed),
            "worker_rss_peak_mb": sampler.figures()["worker_rss_peak_mb"],
            "jobs_output_kb_per_s": round((bytes1 - bytes0) / elapsed / 1e3, 1),
        }
    )
    return figures, c.settings()


# -- 8. many jobs, each walled off and limited ------------------------------------

# Every job gets these limits (the maxima, as it asks for none). As root, each
# job also runs under a user id of its own (the worker's default).
JOB_LIMITS = {
    "jobs.max_memory_mb": "256",
    "jobs.max_cpu_percent": "50",
    "jobs.max_tasks": "64",
}


def _enforceable() -> set[str]:
    """The limits a worker on this host can enforce (the others are left out)."""
    from worker import isolation
    from worker.limits import Enforcer

    instance = f"bench-probe-{os.getpid()}"
    try:
        groups = isolation.Cgroups.create(instance)
    except OSError:
        groups = None
    base = groups.base if groups else None
    enforcer = Enforcer.discover(instance, base, lambda job_id: f"{base}/{job_id}")
    found = set(enforcer.enforceable())
    enforcer.close()
    if groups:
        groups.close()
    return found


def many_limited_jobs(s: Sizes) -> tuple[dict, dict]:
    can = _enforceable()
    limits = {k: v for k, v in JOB_LIMITS.items() if k.split("_", 1)[1] in can}
    figures, settings = many_jobs(s, limits)
    figures["own_user_per_job"] = int(os.geteuid() == 0)
    figures["limits"] = len(limits)
    return figures, settings


def _output_bytes(c: BenchCluster, jobs: list[str]) -> int:
    status, _, body = c.request("GET", f"/v1/workers/{WORKER}/jobs")
    wanted = set(jobs)
    return sum(
        j["output_bytes"] for j in json.loads(body)["jobs"] if j["job_id"] in wanted
    )


# -- 10. the web console -----------------------------------------------------------


def console_page(s: Sizes) -> tuple[dict, dict]:
    """The console in headless Chromium (:mod:`bench.browser`): the workers
    page with ``sim_workers`` simulated workers, then a job's page following
    ``output_bytes`` of output, all of it kept by the worker (as in 3)."""
    from bench import browser
    from jobgate.dev.browser import missing

    why = missing()
    if why is not None:
        raise RuntimeError(f"the console scenario needs Chromium: {why}")
    certs = sim_worker_certs(s.sim_workers)
    c = BenchCluster(worker={"jobs.output_head_bytes": str(s.output_bytes + MiB)})
    figures: dict = {}
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="jobgate-bench-sim-"))
    try:
        with running(c):
            procs = _start_sims(c, s, certs, tmp)
            registered = 0
            for p in procs:
                line = p.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    raise RuntimeError("a simulated worker process exited early")
                registered += json.loads(line)["registered"]
            figures["workers"] = registered + 1
            with browser.chromium() as driver:
                browser.sign_in(driver, c.url, c.token)
                times = browser.first_render_ms(driver, c.url, 3)
                figures["first_render_ms"] = browser.median(times)
                figures["first_render_max_ms"] = round(max(times), 1)
                job = c.start_job("flood.sh", [s.output_bytes])
                figures["output_bytes"] = s.output_bytes
                figures.update(
                    browser.follow_page(driver, c.url, WORKER, job["job_id"], 900)
                )
    finally:
        _stop_sims(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    return figures, c.settings()


# -- the catalogue ----------------------------------------------------------------


# -- 11. adopting the running jobs of a killed worker ------------------------------


def adoption(s: Sizes) -> tuple[dict, dict]:
    """``s.jobs`` jobs run (a line every ``job_interval_s``) when the worker is
    killed with SIGKILL; a new worker process adopts them. Times from the new
    process's start: its own adoption (from its log), its registration, and
    the API showing every job ``running`` again.
    """
    c = BenchCluster(worker={"jobs.max_concurrent": str(s.jobs + 50)})
    figures: dict = {}
    with running(c):
        jobs = [
            c.start_job("steady.sh", [s.job_interval_s, 600])["job_id"]
            for _ in range(s.jobs)
        ]
        time.sleep(1.0)  # let every job get going
        old = c.workers[WORKER]
        old.signal(signal.SIGKILL)
        old.proc.wait(10)
        t0 = time.monotonic()
        c.start_worker(WORKER)
        figures["ready_s"] = round(time.monotonic() - t0, 3)
        while True:
            states = [c.job(j)["state"] for j in jobs]
            if all(st == "running" for st in states):
                break
            if time.monotonic() - t0 > 60:
                raise RuntimeError(f"not every job is running again: {states}")
            time.sleep(0.05)
        figures["all_running_s"] = round(time.monotonic() - t0, 3)
        found = re.findall(
            r"adopted (\d+) running job.*in ([\d.]+)s",
            c.workers[WORKER].log_path.read_text(errors="replace"),
        )
        if not found or int(found[-1][0]) != s.jobs:
            raise RuntimeError(f"the worker did not adopt {s.jobs} jobs: {found}")
        figures["adopt_s"] = float(found[-1][1])
        figures["jobs"] = s.jobs
        bytes0 = _output_bytes(c, jobs)
        time.sleep(1.0)
        figures["jobs_output_kb_per_s"] = round(
            (_output_bytes(c, jobs) - bytes0) / 1e3, 1
        )
    return figures, c.settings()


# -- 12-14. several schedulers on one PostgreSQL database --------------------------


def _cluster_cpu(c: BenchCluster) -> dict[str, Callable[[], float]]:
    """CPU seconds so far of each part of the cluster, for :class:`CpuMeter`:
    each scheduler's HTTP processes (``http1``, ...) and main process, which
    serves gRPC (``grpc1``, ...); the worker; the PostgreSQL server."""
    groups: dict[str, Callable[[], float]] = {}
    for i, proc in enumerate(c.schedulers, 1):
        assert proc is not None
        groups[f"http{i}"] = partial(_cpu_of, descendants(proc.pid))
        groups[f"grpc{i}"] = partial(cpu_seconds, proc.pid)
    groups["worker"] = partial(cpu_seconds, c.worker_pid())
    if c.postgres_pid is not None:
        groups["postgres"] = partial(tree_cpu_s, c.postgres_pid)
    return groups


def status_two_schedulers(s: Sizes) -> tuple[dict, dict]:
    """Scenario 2's status calls with the clients sent to one scheduler
    (``one``), then spread over two on the same database (``two``), back to
    back; each phase's CPU by process group (:func:`_cluster_cpu`)."""
    c = BenchCluster(schedulers=2)
    figures: dict = {}
    with running(c):
        job_id = finished_job(c)
        running_id = c.start_job("steady.sh", [1, 600])["job_id"]
        groups = _cluster_cpu(c)
        for kind in ("query", "get", "running"):
            req = status_request(kind, running_id if kind == "running" else job_id)
            for clients in s.ha_clients:
                if kind == "running" and clients != 8:
                    continue
                rps = []
                for spread, ports in (("one", c.ports[:1]), ("two", c.ports)):
                    with CpuMeter(groups) as meter:
                        r = load.closed_loop(
                            ports, c.token, req, clients, s.status_s, s.warmup_s
                        )
                    _raise_on_errors(r)
                    prefix = f"{kind}_c{clients}_{spread}_"
                    figures.update(load.throughput_figures(r, prefix))
                    figures.update(meter.figures(prefix))
                    rps.append(figures[f"{prefix}rps"])
                    # CPU per request (warm-up included, as in scenario 2), in
                    # microseconds: every HTTP process's, PostgreSQL's.
                    done = len(r.latencies) * (s.warmup_s + s.status_s) / s.status_s
                    http = sum(v for k, v in meter.used.items() if k.startswith("http"))
                    for name, used in (
                        ("http", http),
                        ("postgres", meter.used.get("postgres", 0.0)),
                    ):
                        figures[f"{prefix}{name}_cpu_us"] = round(1e6 * used / done)
                figures[f"{kind}_c{clients}_ratio"] = round(rps[1] / rps[0], 2)
    return figures, c.settings()


def _longest_interval(c: BenchCluster) -> float:
    """The longest heartbeat interval the schedulers hand a small fleet: the
    configured one, lengthened by up to ``[workers].heartbeat_jitter``."""
    from scheduler.config import WorkersSection

    settings = c.scheduler_settings
    interval = float(settings["workers.heartbeat_interval_s"])
    jitter = float(
        settings.get("workers.heartbeat_jitter", WorkersSection().heartbeat_jitter)
    )
    return interval * (1 + jitter)


def failover(s: Sizes) -> tuple[dict, dict]:
    """Two schedulers; a client with both URLs asks for a finished job's
    status in a loop while the scheduler it talks to is killed (SIGKILL to
    its main process and HTTP processes), ``s.kills`` times, each time
    restarted before the next kill. Per kill: the time until the client has
    an answer from the other one, and until the worker's heartbeat reaches
    the other one (its arrival time in the database)."""
    import psycopg

    from bench.failover import RequestLoop, last_seen, worker_scheduler
    from jobgate.client.api import Client

    c = BenchCluster(schedulers=2)
    recovered: list[float] = []
    heard: list[float] = []
    restarts: list[float] = []
    counts = {"not_recovered": 0, "heartbeats_missed": 0, "worker_elsewhere": 0}
    figures: dict = {}
    with running(c), psycopg.connect(c.database, autocommit=True) as db:
        job_id = finished_job(c)
        longest = _longest_interval(c)
        urls, grpc = c.urls, c.scheduler_addresses
        client = Client(",".join(urls), c.token)
        log = c.workers[WORKER].log_path
        loop = RequestLoop(lambda: client.job(WORKER, job_id), lambda: client.url)
        with loop:
            time.sleep(s.settle_s)
            for _ in range(s.kills):
                victim = urls.index(client.url)
                survivor = urls[1 - victim]
                # The worker moves only when its scheduler dies, as the client
                # does: both should be on the one about to be killed.
                watch = worker_scheduler(log) == grpc[victim]
                counts["worker_elsewhere"] += not watch
                killed_at, t_kill = time.time(), time.monotonic()
                c.kill_scheduler(victim)
                back = loop.answered_by(survivor, t_kill, s.kill_timeout_s)
                if back is None:
                    counts["not_recovered"] += 1
                    back = t_kill + s.kill_timeout_s
                recovered.append(back - t_kill)
                if watch:
                    deadline = time.monotonic() + 2 * longest + 1
                    while (seen := last_seen(db, WORKER)) <= killed_at:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.1)  # the next flush writes it
                    if seen > killed_at:
                        heard.append(seen - killed_at)
                    else:
                        counts["heartbeats_missed"] += 1
                t0 = time.monotonic()
                c.start_scheduler(victim)
                restarts.append(time.monotonic() - t0)
                time.sleep(s.settle_s)
        _, _, body = c.request("GET", "/v1/workers")
        states = {w["name"]: w["state"] for w in json.loads(body)["workers"]}
    figures["kills"] = s.kills
    figures.update(load.latency_figures(recovered, "recover_"))
    figures.update(counts)
    figures["client_requests"] = len(loop.answers)
    figures["client_errors"] = len(loop.errors)
    if loop.errors:
        figures["client_error_samples"] = sorted({e for _, e in loop.errors})[:3]
    figures["heartbeat_interval_max_s"] = round(longest, 2)
    if heard:
        figures["heartbeat_p50_s"] = round(load.percentile(heard, 50), 2)
        figures["heartbeat_max_s"] = round(max(heard), 2)
        figures["heartbeat_max_ratio"] = round(max(heard) / longest, 2)
    figures["restart_p50_s"] = round(load.percentile(restarts, 50), 2)
    figures["worker_online"] = int(states.get(WORKER) == "online")
    return figures, c.settings()


def many_workers_two_schedulers(s: Sizes) -> tuple[dict, dict]:
    return _fleet(s, 2)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Callable[[Sizes], tuple[dict, dict]]
    # figure -> (comparison, value): what issue 7 asks for.
    targets: dict[str, tuple[str, float]] = field(default_factory=dict)
    # Figures shown in the Markdown table (all are in the JSON report).
    show: tuple[str, ...] = ()
    # Needs a PostgreSQL server (several schedulers share its database);
    # bench.run starts one for it.
    postgres: bool = False


def _status_show() -> tuple[str, ...]:
    return tuple(
        f"{kind}_c{n}_{fig}"
        for kind in ("query", "get")
        for n in (1, 8, 32)
        for fig in ("rps", "p50_ms", "p99_ms")
    ) + ("running_c8_rps", "running_c8_p50_ms", "running_c8_p99_ms")


def _status_ha_show() -> tuple[str, ...]:
    rates = tuple(
        f"{kind}_c{n}_{fig}"
        for kind in ("query", "get")
        for n in FULL.ha_clients
        for fig in ("one_rps", "two_rps", "ratio")
    )
    # What a request cost the HTTP processes, one scheduler and two.
    cost = tuple(
        f"{kind}_c{n}_{spread}_http_cpu_us"
        for kind in ("query", "get")
        for n in FULL.ha_clients
        for spread in ("one", "two")
    )
    # Where the 2 cores went with 32 clients, one scheduler and two.
    cpu = tuple(
        f"get_c32_{spread}_{fig}"
        for spread in ("one", "two")
        for fig in (
            "p99_ms",
            "cpu_http1_pct",
            "cpu_http2_pct",
            "cpu_postgres_pct",
            "cpu_worker_pct",
            "client_cpu_pct",
            "cpu_machine_pct",
        )
    )
    running_ = ("running_c8_one_rps", "running_c8_two_rps", "running_c8_ratio")
    return rates + cost + cpu + running_


# Figures scenarios 6 and 14 both show: the simulated fleet's registration
# and heartbeats, then status latency idle and loaded.
_FLEET_HEAD = (
    "registered",
    "register_s",
    "online",
    "heartbeats_per_s",
    "heartbeat_errors",
)
_FLEET_STATUS = (
    "idle_rps",
    "idle_p50_ms",
    "idle_p99_ms",
    "loaded_rps",
    "loaded_p50_ms",
    "loaded_p99_ms",
    "p50_ratio",
    "p99_ratio",
)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "start",
            "1. Start latency (sequential starts of a script that exits at once)",
            start_latency,
            {"v1_p50_ms": ("<=", 3.5), "legacy_p50_ms": ("<=", 3.5)},
            (
                "v1_p50_ms",
                "v1_p90_ms",
                "v1_p99_ms",
                "v1_rps",
                "legacy_p50_ms",
                "legacy_p90_ms",
                "legacy_p99_ms",
                "legacy_rps",
            ),
        ),
        Scenario(
            "status",
            "2. Status throughput (finished job, and `running_`: a running one; "
            "keep-alive clients)",
            status_throughput,
            {
                f"{kind}_c{n}_rps": (">=", 800)
                for kind in ("query", "get")
                for n in (8, 32)
            },
            _status_show(),
        ),
        Scenario(
            "output",
            "3. Output throughput (one job's output to one HTTP follower)",
            output_throughput,
            {"mb_per_s": (">=", 200)},
            (
                "bytes",
                "seconds",
                "mb_per_s",
                "scheduler_rss_peak_mb",
                "scheduler_pss_peak_mb",
                "worker_rss_peak_mb",
                "client_cpu_pct",
            ),
        ),
        Scenario(
            "follow",
            "4. Follow latency (a timestamped line every 10 ms, write to arrival)",
            follow_latency,
            {"p99_ms": ("<=", 20)},
            ("lines", "p50_ms", "p90_ms", "p99_ms", "max_ms"),
        ),
        Scenario(
            "followers",
            "5. Many followers of one job (status with 8 clients meanwhile)",
            many_followers,
            {
                "incorrect": ("<=", 0),
                "scheduler_rss_peak_mb": ("<=", 1024),
                "p99_ratio": ("<=", 2),
            },
            (
                "followers",
                "correct",
                "incorrect",
                "attached_while_running",
                "attach_s",
                "all_attached_s",
                "seconds",
                "idle_p99_ms",
                "loaded_p99_ms",
                "p99_ratio",
                "loaded_errors",
                "scheduler_rss_peak_mb",
                "scheduler_pss_peak_mb",
                "worker_rss_peak_mb",
            ),
        ),
        Scenario(
            "slow",
            "9. Slow and idle clients (status with 8 clients meanwhile)",
            slow_clients,
            {"p99_ratio": ("<=", 2), "loaded_errors": ("<=", 0)},
            (
                "idle_connections",
                "partial_requests",
                "partial_answered_408",
                "idle_closed",
                "connect_errors",
                "slowest_close_s",
                "idle_p99_ms",
                "loaded_p99_ms",
                "p99_ratio",
                "loaded_errors",
                "scheduler_rss_peak_mb",
            ),
        ),
        Scenario(
            "workers",
            "6. Many workers (simulated workers heartbeating; status with 8 clients)",
            many_workers,
            {"p50_ratio": ("<=", 2), "p99_ratio": ("<=", 2)},
            (
                *_FLEET_HEAD,
                "heartbeat_p50_ms",
                "heartbeat_p99_ms",
                *_FLEET_STATUS,
                "scheduler_grpc_cpu_pct",
                "sim_cpu_pct",
                "scheduler_rss_peak_mb",
            ),
        ),
        Scenario(
            "jobs",
            "7. Many jobs running at once on one worker (status of one, 8 clients)",
            many_jobs,
            {"status_p99_ms": ("<=", 50)},
            (
                "jobs",
                "running",
                "worker_cpu_pct",
                "worker_rss_peak_mb",
                "jobs_output_kb_per_s",
                "idle_p50_ms",
                "idle_p99_ms",
                "status_rps",
                "status_p50_ms",
                "status_p99_ms",
            ),
        ),
        Scenario(
            "isolated",
            "8. Many jobs as in 7, each under its own user id and cgroup with "
            "memory, CPU and task limits",
            many_limited_jobs,
            {"status_p99_ms": ("<=", 50)},
            (
                "jobs",
                "running",
                "own_user_per_job",
                "limits",
                "start_all_s",
                "worker_cpu_pct",
                "worker_rss_peak_mb",
                "status_rps",
                "status_p50_ms",
                "status_p99_ms",
            ),
        ),
        Scenario(
            "console",
            "10. The web console in headless Chromium (workers page with the "
            "simulated workers of 6; a job's page following 1 GiB of output)",
            console_page,
            {
                "first_render_ms": ("<=", 500),
                "max_tick_gap_ms": ("<=", 250),
                "renderer_rss_peak_mb": ("<=", 300),
            },
            (
                "workers",
                "first_render_ms",
                "first_render_max_ms",
                "output_bytes",
                "follow_seconds",
                "max_tick_gap_ms",
                "renderer_rss_peak_mb",
                "js_heap_peak_mb",
            ),
        ),
        Scenario(
            "adopt",
            "11. A killed worker's running jobs adopted by its next process "
            "(times from that process's start)",
            adoption,
            {"adopt_s": ("<=", 2.0), "all_running_s": ("<=", 2.0)},
            ("jobs", "adopt_s", "ready_s", "all_running_s", "jobs_output_kb_per_s"),
        ),
        Scenario(
            "status-ha",
            "12. Status throughput of two schedulers on one PostgreSQL database "
            "(`two_`: the clients spread over both) against one (`one_`)",
            status_two_schedulers,
            {
                f"{kind}_c{n}_ratio": (">=", 1.6)
                for kind in ("query", "get")
                for n in FULL.ha_clients
            },
            _status_ha_show(),
            postgres=True,
        ),
        Scenario(
            "failover",
            "13. Failover: a scheduler killed under a client's requests, "
            "restarted, 20 times (times from each kill)",
            failover,
            {"recover_p99_ms": ("<=", 1000), "heartbeat_max_ratio": ("<=", 1)},
            (
                "kills",
                "recover_p50_ms",
                "recover_p99_ms",
                "recover_max_ms",
                "not_recovered",
                "client_requests",
                "client_errors",
                "heartbeat_p50_s",
                "heartbeat_max_s",
                "heartbeat_interval_max_s",
                "heartbeat_max_ratio",
                "heartbeats_missed",
                "worker_elsewhere",
                "worker_online",
                "restart_p50_s",
            ),
            postgres=True,
        ),
        Scenario(
            "workers-ha",
            "14. Many workers as in 6, spread over two schedulers on one "
            "PostgreSQL database (status with 8 clients on both)",
            many_workers_two_schedulers,
            {"p50_ratio": ("<=", 2), "p99_ratio": ("<=", 2)},
            (
                *_FLEET_HEAD,
                "heartbeat_p99_ms",
                *_FLEET_STATUS,
                "cpu_grpc1_pct",
                "cpu_grpc2_pct",
                "cpu_http1_pct",
                "cpu_http2_pct",
                "cpu_postgres_pct",
                "sim_cpu_pct",
                "cpu_machine_pct",
            ),
            postgres=True,
        ),
    )
}
