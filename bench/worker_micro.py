"""In-process measurements of the worker's JobRunner, without gRPC or HTTP.

    .venv/bin/python -m bench.worker_micro start [--n 200] [--profile]
    .venv/bin/python -m bench.worker_micro jobs [--n 200] [--seconds 10]
    .venv/bin/python -m bench.worker_micro chain [--n 200]

``start``: N sequential starts of a script that exits at once; p50/p90/p99 of
``JobRunner.start`` and, with ``--profile``, the top functions by cumulative
time (cProfile). ``jobs``: N jobs each printing a line every 50 ms while 8
threads call ``JobRunner.get`` on one of them: the calls' latency, the
process's CPU and its thread count. ``chain`` (as root): what the processes
of one job that exits at once cost, started each way a job could be started
(the exec chain the runner uses, and the alternatives), N times each: the CPU
of the children (``getrusage``), and how long spawning (``Popen``, or
``worker.spawn``) takes in a process of the worker's size.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from worker import spawn
from worker.config import JobsSection
from worker.runner import JobRunner

SCRIPTS = Path(__file__).parent / "scripts"


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def _runner(args, state: Path, **settings) -> JobRunner:
    scripts = Path(tempfile.mkdtemp(prefix="jobgate-micro-scripts-"))
    os.chmod(scripts, 0o755)  # noqa: S103 - the job account reads the scripts
    for name in ("exit0.sh", "steady.sh"):
        shutil.copy(SCRIPTS / name, scripts / name)
        os.chmod(scripts / name, 0o644)
    cfg = JobsSection(
        scripts_dir=scripts,
        state_dir=state,
        isolation=args.isolation,
        max_concurrent=args.n + 50,
        **settings,
    )
    return JobRunner(cfg, worker_name="micro")


def start(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runner = _runner(args, Path(tmp))
        print("isolation:", runner.isolation.name)
        for _ in range(10):
            runner.start("bash", "exit0.sh")
        times = []
        prof = cProfile.Profile() if args.profile else None
        for _ in range(args.n):
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            runner.start("bash", "exit0.sh")
            if prof:
                prof.disable()
            times.append(time.perf_counter() - t0)
            time.sleep(0.005)
        ms = [t * 1000 for t in times]
        print(
            f"start: n={len(ms)} p50={_pct(ms, 0.5):.2f} ms p90={_pct(ms, 0.9):.2f} ms "
            f"p99={_pct(ms, 0.99):.2f} ms mean={statistics.mean(ms):.2f} ms"
        )
        if prof:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
        runner.shutdown(grace_s=1)


def jobs(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runner = _runner(args, Path(tmp))
        print("isolation:", runner.isolation.name)
        ids = [
            runner.start("bash", "steady.sh", ["0.05", "600"])[0].job_id
            for _ in range(args.n)
        ]
        time.sleep(1)
        target = ids[0]
        stop = time.monotonic() + args.seconds
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(args.seconds / 2)
        idle_cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0) * 100
        print(f"jobs={args.n} without calls: process CPU {idle_cpu:.0f}% of one core")
        stop = time.monotonic() + args.seconds
        lat: list[list[float]] = [[] for _ in range(8)]

        def client(i: int) -> None:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                runner.get(target)
                lat[i].append(time.perf_counter() - t0)
                time.sleep(0.001)

        cpu0, wall0 = time.process_time(), time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        nthreads = threading.active_count()
        for t in threads:
            t.join()
        cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0) * 100
        ms = [x * 1000 for x in sum(lat, [])]
        print(
            f"jobs={args.n} get: n={len(ms)} p50={_pct(ms, 0.5):.3f} ms "
            f"p99={_pct(ms, 0.99):.3f} ms max={max(ms):.1f} ms; "
            f"process CPU {cpu:.0f}% of one core; {nthreads} threads"
        )
        t0 = time.monotonic()
        runner.shutdown(grace_s=2)
        print(f"shutdown of {args.n} jobs: {time.monotonic() - t0:.2f} s")


def chain(args) -> None:
    if os.geteuid() != 0:
        raise SystemExit("chain: run as root (the chains switch to another user)")
    import resource
    import subprocess

    script = str(SCRIPTS / "exit0.sh")
    nobody = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    shim = 'echo $$ > /dev/null; exec "$@"'  # the runner's shim, minus the cgroup
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    ballast = [bytearray(1024) for _ in range(50_000)]  # about the worker's RSS
    chains = (
        ("bash alone (as root)", ["/bin/bash", script], {}),
        ("setpriv, bash", [setpriv, *nobody, "/bin/bash", script], {}),
        (
            "sh shim, setpriv, bash (cgroup mode, as root)",
            ["/bin/sh", "-c", shim, "shim", setpriv, *nobody, "/bin/bash", script],
            {},
        ),
        (
            "bash, user switched by subprocess (fork, not vfork)",
            ["/bin/bash", script],
            {"user": 65534, "group": 65534, "extra_groups": []},
        ),
    )
    if spawn.available() == "":
        # What the runner uses: the child joins (here: no) cgroup and switches
        # to the job's ids itself, then execs the interpreter.
        chains += (("bash, one exec (worker._spawn)", ["/bin/bash", script], None),)

    def start(argv, kw):
        if kw is None:
            child = spawn.spawn(
                argv, cwd="/", env=env, user=65534, group=65534, cgroup_procs=None
            )
            child.stdout.close()
            return child
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, **kw)

    for label, argv, kw in chains:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        popen = []
        for _ in range(args.n):
            t0 = time.perf_counter()
            proc = start(argv, kw)
            popen.append((time.perf_counter() - t0) * 1000)
            proc.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (
            after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        ) / args.n
        print(
            f"{label}: children's CPU {cpu * 1000:.2f} ms per job; "
            f"spawning p50 {_pct(popen, 0.5):.2f} ms"
        )
    del ballast


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("start", "jobs", "chain"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--isolation", default="auto")
    args = parser.parse_args()
    {"start": start, "jobs": jobs, "chain": chain}[args.what](args)


if __name__ == "__main__":
    main()
