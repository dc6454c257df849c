"""The cluster a benchmark runs against, and what is measured about its processes.

:class:`BenchCluster` is :class:`jobgate.dev.cluster.DevCluster` (real processes
on 127.0.0.1, mutual TLS between scheduler and workers, bearer tokens on HTTP)
with the product's defaults where the development cluster departs from them
for quick tests, plus what a scenario needs (more threads, larger output caps).
Its CA and certificates come from ``bench/.cache``, so clusters start quickly
and the simulated workers' certificates (see :mod:`bench.simworkers`) are
signed by the same CA.

:class:`ProcSampler` samples the RSS and CPU time of a process and its
descendants from ``/proc``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from jobgate.dev.cluster import DEVCA, DevCluster
from jobgate.dev.postgres import PostgresServer

BENCH = Path(__file__).resolve().parent
SCRIPTS = BENCH / "scripts"
CACHE = BENCH / ".cache"
CLUSTER = "bench"
WORKER = "worker-1"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")

# Set by ``bench.run --profile``: where py-spy records each cluster's processes,
# and the file name prefix (scenario and run).
PROFILE_DIR: Path | None = None
PROFILE_TAG = "cluster"
# Set by ``bench.run --scheduler-setting/--worker-setting``: "section.key" ->
# TOML value, applied to every cluster after the scenario's own settings.
EXTRA_SCHEDULER: dict[str, str] = {}
EXTRA_WORKER: dict[str, str] = {}
# Set by ``bench.run --postgres``: the server whose databases keep the state of
# every cluster's scheduler (a new database each), instead of SQLite.
POSTGRES: PostgresServer | None = None
# The PostgreSQL server running for this run of ``bench.run``: that of
# ``--postgres``, or one started for the scenarios that need it (several
# schedulers share one database), else None.
SERVER: PostgresServer | None = None

# Set by ``bench.run --scheduler-cpus``: the CPUs each scheduler (its main and
# HTTP processes together) may use, as on a host of its own; None: no cap.
SCHEDULER_CPUS: float | None = None

# CPU time of processes the benchmark started that none of its own processes
# waits for: a killed scheduler's HTTP processes, which init reaps. bench.run
# counts it as the benchmark's, not as other processes'.
UNREAPED_CPU_S = 0.0

# The product's defaults ([workers] heartbeats and call deadline), which the
# development cluster shortens for its tests.
HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TIMEOUT_S = 15.0
RPC_TIMEOUT_S = 10.0


def devca():
    """``certs/devca.py`` as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("jobgate_devca", DEVCA)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def pki_cache() -> Path:
    """The cached CA with the scheduler's and worker-1's certificates."""
    pki = CACHE / "pki"
    ca = devca()
    if not (pki / "ca.pem").exists():
        ca.init_ca(pki, CLUSTER, force=True)
    if not (pki / "scheduler.pem").exists():
        ca.issue(pki, "scheduler")
    if not (pki / f"{WORKER}.pem").exists():
        ca.issue(pki, "worker", WORKER)
    return pki


def sim_worker_name(i: int) -> str:
    return f"sim-{i:05d}"


def sim_worker_certs(count: int) -> Path:
    """Certificates of simulated workers sim-00000 ... (made once, then cached)."""
    pki = pki_cache()
    out = pki / "sim"
    ca = None
    for i in range(count):
        name = sim_worker_name(i)
        if not (out / f"{name}.key").exists():
            ca = ca or devca()
            ca.issue(pki, "worker", name, out=out)
    return out


def public_dir(prefix: str) -> Path:
    """A temporary directory that jobs running as 'nobody' can read."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)  # noqa: S103 - jobs run as another user must read it
    return path


def _set(text: str, section: str, key: str, value: str) -> str:
    """``text`` (TOML) with ``key`` of ``[section]`` set to ``value``."""
    head, sep, rest = text.partition(f"\n[{section}]\n")
    if not sep:  # a table the generated config leaves out
        return f"{text.rstrip()}\n\n[{section}]\n{key} = {value}\n"
    body, nxt, tail = rest.partition("\n[")
    line = re.compile(rf"^{re.escape(key)} = .*$", re.M)
    if line.search(body):
        body = line.sub(f"{key} = {value}", body, count=1)
    else:
        body = f"{key} = {value}\n{body}"
    return head + sep + body + nxt + tail


class BenchCluster(DevCluster):
    """A development cluster configured for one scenario.

    ``scheduler`` and ``worker`` map ``"section.key"`` to a TOML value (as
    text) that is set in the generated configs. Several ``schedulers`` share
    a new database on the running PostgreSQL server (:data:`SERVER`).
    """

    def __init__(
        self,
        scheduler: dict[str, str] | None = None,
        worker: dict[str, str] | None = None,
        schedulers: int = 1,
    ):
        self.scheduler_settings = {
            "workers.heartbeat_interval_s": str(HEARTBEAT_INTERVAL_S),
            "workers.heartbeat_timeout_s": str(HEARTBEAT_TIMEOUT_S),
            "workers.rpc_timeout_s": str(RPC_TIMEOUT_S),
            **(scheduler or {}),
            **EXTRA_SCHEDULER,
        }
        self.worker_settings = {**(worker or {}), **EXTRA_WORKER}
        self._recorders: list = []
        self._caps: CpuCaps | None = None
        self._scripts = public_dir("jobgate-bench-scripts-")
        for f in SCRIPTS.iterdir():
            if f.is_file():
                shutil.copy(f, self._scripts / f.name)
                os.chmod(self._scripts / f.name, 0o755)  # noqa: S103
        directory = public_dir("jobgate-bench-")
        shutil.copytree(pki_cache(), directory / "pki", ignore=lambda *_: ["sim"])
        self._server = POSTGRES
        if schedulers > 1:
            if SERVER is None:
                raise RuntimeError(
                    "several schedulers share a PostgreSQL database: run this "
                    "scenario through python -m bench.run (it starts a server)"
                )
            self._server = SERVER
        self._database = self._server.create_database() if self._server else ""
        super().__init__(
            directory,
            cluster=CLUSTER,
            http_processes=2,
            scripts_dir=self._scripts,
            store_url=self._database,
            schedulers=schedulers,
        )

    def settings(self) -> dict[str, dict[str, str]]:
        """What this cluster sets beyond the configs' defaults (for the report)."""
        return {"scheduler": self.scheduler_settings, "worker": self.worker_settings}

    @staticmethod
    def _apply(path: Path, settings: dict[str, str]) -> Path:
        text = path.read_text()
        for dotted, value in settings.items():
            section, key = dotted.rsplit(".", 1)
            text = _set(text, section, key, value)
        path.write_text(text)
        return path

    def scheduler_config(self, index: int = 0) -> Path:
        return self._apply(super().scheduler_config(index), self.scheduler_settings)

    def worker_config(self, name, labels=None, host="127.0.0.1") -> Path:
        return self._apply(
            super().worker_config(name, labels, host), self.worker_settings
        )

    def start(self, workers: tuple[str, ...] = (WORKER,)) -> None:
        super().start(workers)
        if SCHEDULER_CPUS is not None:
            self._caps = CpuCaps(SCHEDULER_CPUS)
            for i, proc in enumerate(self.schedulers, 1):
                assert proc is not None
                self._caps.confine(f"scheduler-{i}", [proc.pid, *descendants(proc.pid)])
        if PROFILE_DIR is not None:
            from bench.profile import Recorder

            PROFILE_DIR.mkdir(parents=True, exist_ok=True)
            out = PROFILE_DIR / f"{PROFILE_TAG}-scheduler.txt"
            self._recorders.append(Recorder(self.scheduler.pid, out, True))
            for name, proc in self.workers.items():
                out = PROFILE_DIR / f"{PROFILE_TAG}-{name}.txt"
                self._recorders.append(Recorder(proc.pid, out))

    def stop(self) -> None:
        for recorder in self._recorders:
            recorder.stop()
        self._recorders = []
        try:
            super().stop()
        finally:
            if self._caps is not None:
                self._caps.release()
                self._caps = None
            shutil.rmtree(self.dir, ignore_errors=True)
            shutil.rmtree(self._scripts, ignore_errors=True)
            if self._database and self._server is not None:
                self._server.drop_database(self._database.rsplit("/", 1)[1])

    def kill_scheduler(self, index: int = 0, timeout: float = 10.0) -> None:
        global UNREAPED_CPU_S
        proc = self.schedulers[index]
        if proc is not None and proc.running():
            # The main process is ours to wait for; its children are not.
            children = [p for p in descendants(proc.pid) if _ppid(p) == proc.pid]
            UNREAPED_CPU_S += sum(tree_cpu_s(p) for p in children)
        super().kill_scheduler(index, timeout)

    # -- helpers ----------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.scheduler_info["http_port"]

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.scheduler_info['grpc_port']}"

    @property
    def ports(self) -> list[int]:
        """Every scheduler's HTTP port."""
        return [info["http_port"] for info in self.scheduler_infos]

    @property
    def grpc_targets(self) -> list[str]:
        """Every scheduler's gRPC address."""
        return [f"127.0.0.1:{info['grpc_port']}" for info in self.scheduler_infos]

    @property
    def postgres_pid(self) -> int | None:
        """The PostgreSQL server's main process, if the state is kept there."""
        return self._server.pid if self._server is not None else None

    @property
    def database(self) -> str:
        """The URL of the schedulers' PostgreSQL database ("" with SQLite)."""
        return self._database

    def start_job(self, path: str, args=(), worker: str = WORKER) -> dict:
        import json

        status, _, body = self.request(
            "POST",
            f"/v1/workers/{worker}/jobs",
            {"command": "bash", "path": path, "args": [str(a) for a in args]},
        )
        if status != 201:
            raise RuntimeError(f"starting {path} failed: {status} {body[:300]!r}")
        return json.loads(body)

    def job(self, job_id: str, worker: str = WORKER) -> dict:
        import json

        status, _, body = self.request("GET", f"/v1/workers/{worker}/jobs/{job_id}")
        if status != 200:
            raise RuntimeError(f"job {job_id}: {status} {body[:300]!r}")
        return json.loads(body)

    def wait_job(self, job_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] != "running":
                return job
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} still running after {timeout}s")
            time.sleep(0.05)  # polling the API under test: nothing to block on

    def scheduler_pids(self) -> list[int]:
        return [self.scheduler.pid, *descendants(self.scheduler.pid)]

    def worker_pid(self, name: str = WORKER) -> int:
        return self.workers[name].pid


@contextlib.contextmanager
def running(cluster: BenchCluster, workers=(WORKER,)) -> Iterator[BenchCluster]:
    """The cluster, started; when the block fails, its logs' ends are printed."""
    try:
        cluster.start(tuple(workers))
        yield cluster
    except BaseException:
        procs = [*cluster.schedulers, *cluster.workers.values()]
        for proc in procs:
            if proc is not None:
                name = proc.name
                print(f"--- {name} log (end) ---\n{proc.log_tail(30)}", file=sys.stderr)
        raise
    finally:
        cluster.stop()


# -- /proc ---------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after it.
    return data[data.rindex(")") + 2 :].split()


def _ppid(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


class CpuCaps:
    """Groups of processes, each held to ``cpus`` CPUs together: a cgroup of
    its own with a CPU quota, made as the worker makes a job's for
    ``cpu_percent`` (:mod:`worker.limits`). Processes they start later
    (gunicorn replacing an HTTP process) are held with them."""

    def __init__(self, cpus: float):
        from worker.limits import Enforcer, Limits

        self.enforcer = Enforcer.discover(f"bench-{os.getpid()}", None)
        if not self.enforcer.how("cpu_percent"):
            self.enforcer.close()
            raise RuntimeError(
                "--scheduler-cpus needs a cgroup v1 cpu hierarchy this process "
                f"may write: {self.enforcer.why_not('cpu_percent')}"
            )
        self.limits = Limits(cpu_percent=round(cpus * 100))
        self.names: list[str] = []

    def confine(self, name: str, pids: list[int]) -> None:
        procs = self.enforcer.prepare(name, self.limits)
        self.names.append(name)
        for path in procs:
            for pid in pids:
                Path(path).write_text(str(pid))

    def release(self) -> None:
        for name in self.names:
            self.enforcer.release(name, self.limits)
        self.enforcer.close()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu_s(pid: int) -> float:
    """CPU time of process ``pid`` and of every descendant, living or reaped.

    For a daemon the benchmark started but does not wait for (the PostgreSQL
    server of ``--postgres``), whose time ``os.times`` does not include.
    """
    ticks = 0
    for p in [pid, *descendants(pid)]:
        fields = _stat(p)
        if fields is not None:
            # utime, stime, and cutime, cstime of children it has reaped
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / TICKS


def rss_bytes(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[21]) * PAGE if fields else 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages divided among their sharers."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` itself (not its children)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS if fields else 0.0


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks.

    Busy is time spent running processes (user, nice, system) plus time the
    hypervisor gave to others (steal); interrupt time is left out, since the
    benchmark's own loopback traffic causes most of it.
    """
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (
            int(x) for x in f.readline().split()[1:9]
        )
    busy = user + nice + system + steal
    return busy, busy + idle + iowait + irq + softirq


def machine_busy_pct(seconds: float = 1.0) -> float:
    """How busy all CPUs together were over ``seconds``, in percent."""
    busy0, total0 = cpu_jiffies()
    time.sleep(seconds)
    busy1, total1 = cpu_jiffies()
    return round(100 * (busy1 - busy0) / max(total1 - total0, 1), 1)


class ProcSampler:
    """Samples the memory of two groups of processes every ``interval`` seconds.

    ``scheduler`` is the scheduler's main process, whose descendants (the
    gunicorn master and workers) are added up with it; ``worker`` is the
    worker process alone (its jobs are not part of it). RSS counts pages the
    gunicorn processes share once in each of them; PSS (sampled less often,
    it costs more to read) divides them among their sharers.
    """

    def __init__(self, scheduler: int, worker: int, interval: float = 0.1):
        self.scheduler = scheduler
        self.worker = worker
        self.interval = interval
        self.scheduler_peak = 0
        self.scheduler_pss_peak = 0
        self.worker_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sched_pids = [scheduler, *descendants(scheduler)]

    def sample(self, pss: bool = True) -> None:
        self.scheduler_peak = max(
            self.scheduler_peak, sum(rss_bytes(p) for p in self._sched_pids)
        )
        self.worker_peak = max(self.worker_peak, rss_bytes(self.worker))
        if pss:
            self.scheduler_pss_peak = max(
                self.scheduler_pss_peak, sum(pss_bytes(p) for p in self._sched_pids)
            )

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            n += 1
            if n % 20 == 0:  # gunicorn may have replaced a worker process
                self._sched_pids = [self.scheduler, *descendants(self.scheduler)]
            self.sample(pss=n % 5 == 0)

    def __enter__(self) -> ProcSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def figures(self) -> dict[str, float]:
        return {
            "scheduler_rss_peak_mb": round(self.scheduler_peak / 1e6, 1),
            "scheduler_pss_peak_mb": round(self.scheduler_pss_peak / 1e6, 1),
            "worker_rss_peak_mb": round(self.worker_peak / 1e6, 1),
        }


class CpuMeter:
    """CPU time of groups of processes over a span, in percent of one core.

    ``groups`` maps a name to a function that returns the group's CPU
    seconds so far (e.g. :func:`cpu_seconds` of a pid). The figures also give
    the whole machine's busy time (200 % is both cores of a 2-core machine)
    and what is left of it beyond the groups (``rest``: the client, other
    processes).
    """

    def __init__(self, groups: dict[str, Callable[[], float]]):
        self.groups = groups
        self.used: dict[str, float] = {}
        self.seconds = 0.0
        self.busy_s = 0.0

    def __enter__(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._busy0 = cpu_jiffies()[0]
        self._cpu0 = {name: f() for name, f in self.groups.items()}
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.monotonic() - self._t0
        self.busy_s = (cpu_jiffies()[0] - self._busy0) / TICKS
        self.used = {n: f() - self._cpu0[n] for n, f in self.groups.items()}

    def figures(self, prefix: str = "") -> dict[str, float]:
        def pct(seconds: float) -> float:
            return round(100 * seconds / max(self.seconds, 1e-9))

        out = {f"{prefix}cpu_{n}_pct": pct(used) for n, used in self.used.items()}
        out[f"{prefix}cpu_machine_pct"] = pct(self.busy_s)
        out[f"{prefix}cpu_rest_pct"] = pct(self.busy_s - sum(self.used.values()))
        return out
