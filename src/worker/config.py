"""The worker's ``worker.toml`` schema (see ``examples/worker.toml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jobgate import config
from jobgate.config import Invalid, parse_hostport, setting
from jobgate.identity import NAME_PATTERN
from jobgate.logs import LogSection
from jobgate.tls import TLSConfig


@dataclass(frozen=True)
class WorkerSection:
    name: str = setting(
        pattern=NAME_PATTERN, help="this worker's name; must match its certificate"
    )
    cluster: str = setting(
        pattern=NAME_PATTERN, help="cluster name, as in the certificates"
    )
    advertise_host: str = setting(
        "127.0.0.1",
        help="host or IP the scheduler dials; the port is the bound gRPC port",
    )
    labels: dict[str, str] = setting(
        default_factory=dict, help='free-form labels, e.g. { rack = "a" }'
    )


@dataclass(frozen=True)
class GrpcSection:
    bind: str = setting(
        "0.0.0.0:7444", help="host:port of the gRPC server; port 0 picks one"
    )
    max_threads: int = setting(
        512, min=8, max=8192, help="threads serving RPCs (each output stream holds one)"
    )
    max_streams: int = setting(
        448,
        min=1,
        help="output streams served at once; keep below max_threads so that "
        "status, start and stop calls always find a thread",
    )
    max_message_bytes: int = setting(
        4 * 1024 * 1024, min=65536, help="largest gRPC message accepted"
    )

    def __post_init__(self) -> None:
        parse_hostport(self.bind, "bind")
        if self.max_streams > self.max_threads - 4:
            raise Invalid(
                "max_streams",
                f"{self.max_streams} leaves too few of max_threads "
                f"({self.max_threads}) for other calls; keep it at most "
                f"max_threads - 4",
            )


@dataclass(frozen=True)
class SchedulerSection:
    address: str = setting(
        "",
        help="host:port of the scheduler's gRPC server (one scheduler); "
        "or set addresses",
    )
    addresses: tuple[str, ...] = setting(
        default_factory=tuple,
        help="host:port of every scheduler's gRPC server (several schedulers "
        "on one database): the worker heartbeats to one and fails over to the "
        "next when it does not answer",
    )
    rpc_timeout_s: float = setting(
        5.0, min=0.1, help="deadline of each call to the scheduler"
    )
    retry_initial_s: float = setting(
        0.5, min=0.01, help="first wait before retrying registration"
    )
    retry_max_s: float = setting(
        30.0, min=0.1, help="longest wait between registration attempts"
    )

    def __post_init__(self) -> None:
        if bool(self.address) == bool(self.addresses):
            raise Invalid(
                "address",
                "set either address (one scheduler) or addresses (several), "
                "not both and not neither",
            )
        if self.address:
            parse_hostport(self.address, "address")
        for i, address in enumerate(self.addresses):
            parse_hostport(address, f"addresses[{i}]")
        if len(set(self.addresses)) != len(self.addresses):
            raise Invalid("addresses", "lists an address twice")

    @property
    def all(self) -> tuple[str, ...]:
        """Every scheduler's address, in the order the worker tries them."""
        return self.addresses or (self.address,)


@dataclass(frozen=True)
class JobsSection:
    scripts_dir: Path = setting(
        exists="dir", help="directory holding the scripts jobs may run"
    )
    state_dir: Path = setting(
        help="job records and output live here (created if missing)"
    )
    interpreters: dict[str, str] = setting(
        default_factory=lambda: {"bash": "/bin/bash", "sh": "/bin/sh"},
        help="allow-list: command name -> interpreter executable",
    )
    user_mode: str = setting(
        "dynamic",
        choices=("dynamic", "fixed"),
        help="when the worker runs as root: dynamic, each job under a user id "
        "of its own from uid_min-uid_max; fixed, every job as [jobs].user",
    )
    user: str = setting(
        "nobody",
        help='account jobs run as with user_mode = "fixed" (never root itself)',
    )
    uid_min: int = setting(
        61184, min=1, max=2**31 - 2, help="first user id handed out to jobs"
    )
    uid_max: int = setting(
        65519, min=1, max=2**31 - 2, help="last user id handed out to jobs"
    )
    uid_lock_dir: Path = setting(
        Path("/run/jobgate/job-uids"),
        help="lock files of the user ids in use, shared by every worker on the "
        "host (created if missing)",
    )
    tmp_dir: str = setting(
        "",
        help="where each job's private temporary directory is made; "
        '"": a new directory under the system\'s temporary directory',
    )
    max_concurrent: int = setting(64, min=1, max=100_000, help="jobs running at once")
    default_timeout_s: int = setting(
        0, min=0, help="timeout of jobs that ask for none; 0: none"
    )
    max_timeout_s: int = setting(
        7 * 24 * 3600, min=1, help="largest timeout a job may ask for"
    )
    stop_grace_s: float = setting(
        10.0, min=0, max=3600, help="SIGTERM to SIGKILL delay"
    )
    drain_timeout_s: float = setting(
        2.0,
        min=0,
        help="how long output is still read after a job's main process exits",
    )
    keeper_idle_s: float = setting(
        10.0,
        min=0,
        max=3600,
        help="how long a job's keeper process waits, once its job is over, to "
        "keep the next job before it exits (the next start then forks none); "
        "0: it exits at once",
    )
    keep_on_restart: bool = setting(
        True,
        help="jobs go on running while systemd restarts the worker (systemctl "
        "restart, a package upgrade) and the worker adopts them when it is "
        "back; false: a restart stops them as a stop does",
    )
    max_args: int = setting(256, min=0, help="most arguments a job may have")
    max_arg_bytes: int = setting(
        65536, min=1, help="largest total size of a job's arguments"
    )
    read_chunk_bytes: int = setting(
        262144, min=512, max=4 * 1024 * 1024, help="output chunk size"
    )
    environment: dict[str, str] = setting(
        default_factory=dict, help="extra environment variables for every job"
    )
    isolation: str = setting(
        "auto",
        choices=("auto", "cgroup", "process-group"),
        help="how a job's processes are kept together (auto: cgroup when possible)",
    )
    output_head_bytes: int = setting(
        16 * 1024 * 1024, min=0, help="first bytes of a job's output always kept"
    )
    output_tail_bytes: int = setting(
        16 * 1024 * 1024, min=4096, help="last bytes of a job's output always kept"
    )
    retention_max_jobs: int = setting(
        1000, min=1, help="finished jobs kept (records and output); oldest go first"
    )
    retention_max_age_s: int = setting(
        7 * 24 * 3600, min=60, help="finished jobs older than this are deleted"
    )
    retention_interval_s: float = setting(
        60.0, min=0.1, help="how often retention runs"
    )
    alive_interval_s: float = setting(
        10.0,
        min=0.1,
        help="how often the worker stamps its state directory as alive (a job "
        "lost in a crash ends, as far as is known, at the last stamp) and "
        "checks that it is writable",
    )
    min_free_bytes: int = setting(
        1024 * 1024,
        min=0,
        help="below this much free space in state_dir the worker is degraded "
        "and starts no jobs",
    )
    follow_keepalive_s: float = setting(
        1.0,
        min=0.05,
        help="a follower of a quiet job gets an empty keep-alive message this often",
    )
    max_wait_s: float = setting(3600.0, min=1, help="longest a WaitJob call may block")
    default_memory_mb: int = setting(
        0, min=0, help="memory limit of jobs that ask for none, in MiB; 0: none"
    )
    max_memory_mb: int = setting(
        0, min=0, help="largest memory limit a job may ask for, in MiB; 0: any"
    )
    default_cpu_percent: int = setting(
        0, min=0, help="CPU limit of jobs that ask for none, in % of a CPU; 0: none"
    )
    max_cpu_percent: int = setting(
        0, min=0, help="largest CPU limit a job may ask for, in % of a CPU; 0: any"
    )
    default_tasks: int = setting(
        0, min=0, help="task (process and thread) limit of jobs that ask for none"
    )
    max_tasks: int = setting(0, min=0, help="largest task limit a job may ask for")

    def __post_init__(self) -> None:
        for name in ("memory_mb", "cpu_percent", "tasks"):
            default = getattr(self, f"default_{name}")
            top = getattr(self, f"max_{name}")
            if top and default > top:
                raise Invalid(
                    f"default_{name}",
                    f"{default} is above max_{name} ({top})",
                )
        if self.uid_min > self.uid_max:
            raise Invalid(
                "uid_min",
                f"{self.uid_min} is above uid_max ({self.uid_max}); give a range "
                "low to high",
            )
        ids = self.uid_max - self.uid_min + 1
        if self.user_mode == "dynamic" and ids < self.max_concurrent:
            raise Invalid(
                "uid_max",
                f"uid_min-uid_max holds {ids} user ids, fewer than max_concurrent "
                f"({self.max_concurrent}): widen the range or lower max_concurrent",
            )


@dataclass(frozen=True)
class MetricsSection:
    bind: str = setting(
        "", help='host:port of the Prometheus /metrics listener; "" turns it off'
    )

    def __post_init__(self) -> None:
        if self.bind:
            parse_hostport(self.bind, "bind")


@dataclass(frozen=True)
class WorkerConfig:
    worker: WorkerSection
    scheduler: SchedulerSection
    tls: TLSConfig
    jobs: JobsSection
    grpc: GrpcSection = field(default_factory=GrpcSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self) -> None:
        j = self.jobs
        if j.default_timeout_s > j.max_timeout_s:
            raise Invalid(
                ("jobs", "default_timeout_s"),
                f"{j.default_timeout_s} is above [jobs].max_timeout_s "
                f"({j.max_timeout_s})",
            )
        for name, exe in j.interpreters.items():
            if not exe.startswith("/"):
                raise Invalid(
                    ("jobs", f"interpreters.{name}"),
                    f"{exe!r} must be an absolute path",
                )


def load(path: str | Path) -> WorkerConfig:
    return config.load(path, WorkerConfig)
