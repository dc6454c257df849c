"""The scheduler's ``scheduler.toml`` schema (see ``examples/scheduler.toml``)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from jobgate import config
from jobgate.config import Invalid, parse_hostport, setting
from jobgate.identity import NAME_PATTERN
from jobgate.logs import LogSection
from jobgate.tls import TLSConfig


@dataclass(frozen=True)
class ClusterSection:
    name: str = setting(
        pattern=NAME_PATTERN, help="cluster name, as in the certificates"
    )


@dataclass(frozen=True)
class HttpTLSSection:
    cert_file: Path | None = setting(
        None, exists="file", help="PEM certificate the HTTP API serves (HTTPS)"
    )
    key_file: Path | None = setting(None, exists="file", help="PEM key of cert_file")
    client_ca_file: Path | None = setting(
        None,
        exists="file",
        help="CA of client certificates accepted instead of tokens; unset: tokens only",
    )
    client_scopes: dict[str, str] = setting(
        default_factory=dict,
        help='scope of each client certificate name, e.g. { ops = "run" }',
    )

    def __post_init__(self) -> None:
        for name, scope in self.client_scopes.items():
            if scope not in ("read", "run"):
                raise Invalid(
                    f"client_scopes.{name}", f"{scope!r} is not one of 'read', 'run'"
                )


@dataclass(frozen=True)
class HttpSection:
    RETIRED: ClassVar[dict[str, str]] = {
        "threads": "the HTTP gateway serves every connection from an event loop",
        "linger_ms": "the HTTP gateway serves every connection from an event loop",
    }

    bind: str = setting(
        "127.0.0.1:8080", help="host:port of the HTTP API; port 0 picks one"
    )
    processes: int = setting(2, min=1, max=64, help="gunicorn worker processes")
    max_body_bytes: int = setting(
        65536, min=1024, help="largest request body; larger is 413"
    )
    max_json_depth: int = setting(
        32, min=2, max=1000, help="deepest nesting of a JSON body; deeper is 400"
    )
    timeout_s: int = setting(30, min=1, help="gunicorn worker heartbeat timeout")
    graceful_timeout_s: int = setting(10, min=1, help="time to finish requests on stop")
    max_restarts: int = setting(
        5,
        min=1,
        help="HTTP processes that may exit and be replaced within "
        "restart_window_s; one more stops the scheduler (exit status 1)",
    )
    restart_window_s: float = setting(
        60.0, min=1.0, max=86400, help="the window of max_restarts"
    )
    keepalive_s: int = setting(
        5, min=0, help="idle keep-alive time of client connections"
    )
    request_timeout_s: float = setting(
        10.0,
        min=0.5,
        max=3600,
        help="time a request's head and body have to arrive; then 408",
    )
    max_connections: int = setting(
        10_000,
        min=16,
        max=1_000_000,
        help="open client connections per process; more are refused with 503",
    )
    max_followers: int = setting(
        20_000, min=1, help="output streams following a job, per process; then 503"
    )
    max_followers_per_caller: int = setting(
        10_000,
        min=1,
        help="output streams following a job, per token or client certificate "
        "and process; then 503",
    )
    max_request_line_bytes: int = setting(
        8192, min=256, max=1_048_576, help="longest request line; longer is 414"
    )
    max_head_bytes: int = setting(
        32768, min=1024, max=1_048_576, help="largest request head; larger is 431"
    )
    access_log: bool = setting(True, help="log one line per HTTP request")
    console: bool = setting(
        True, help="serve the web console at /ui/ (and redirect / there)"
    )
    scheme: str = setting(
        "https", choices=("https", "http"), help="https, or plain http (see below)"
    )
    allow_plain_http_off_loopback: bool = setting(
        False, help='let scheme = "http" bind an address other than loopback'
    )
    original_path_prefix: str = setting(
        "",
        help="a prefix the original API's /start strips from a script's path "
        '(e.g. "worker/scripts/"); empty: none',
    )
    tls: HttpTLSSection = field(default_factory=HttpTLSSection)

    def __post_init__(self) -> None:
        host, _ = parse_hostport(self.bind, "bind")
        prefix = self.original_path_prefix
        if prefix and (
            not prefix.endswith("/")
            or prefix.startswith("/")
            or any(part in ("", ".", "..") for part in prefix[:-1].split("/"))
            or "\0" in prefix
        ):
            raise Invalid(
                "original_path_prefix",
                f"{prefix!r} must be a relative directory path ending in '/', "
                'without "." or ".." parts, e.g. "worker/scripts/"',
            )
        if self.scheme == "https":
            for key in ("cert_file", "key_file"):
                if getattr(self.tls, key) is None:
                    raise Invalid(
                        ("tls", key),
                        'required for HTTPS (or set [http].scheme = "http" to serve '
                        "plain HTTP on loopback)",
                    )
        else:
            if self.tls.client_ca_file is not None:
                raise Invalid(
                    ("tls", "client_ca_file"),
                    'client certificates need [http].scheme = "https"',
                )
            if not _is_loopback(host) and not self.allow_plain_http_off_loopback:
                raise Invalid(
                    "bind",
                    f"plain HTTP on {host!r} would send tokens in the clear; use "
                    'scheme = "https", bind 127.0.0.1, or set '
                    "allow_plain_http_off_loopback = true",
                )


@dataclass(frozen=True)
class GrpcSection:
    bind: str = setting(
        "0.0.0.0:7443", help="host:port of the gRPC server workers call"
    )
    max_threads: int = setting(
        64,
        min=2,
        max=8192,
        help="threads serving worker RPCs (registrations, heartbeats)",
    )
    max_message_bytes: int = setting(
        4 * 1024 * 1024, min=65536, help="largest gRPC message accepted"
    )

    def __post_init__(self) -> None:
        parse_hostport(self.bind, "bind")


@dataclass(frozen=True)
class AuthSection:
    tokens_file: Path = setting(
        exists="file",
        help="file of SHA-256 token hashes ('jobgate-scheduler hash-token')",
    )


@dataclass(frozen=True)
class StateSection:
    path: Path = setting(
        Path("/var/lib/jobgate/scheduler.db"),
        help="SQLite database of workers and jobs (when url is empty)",
    )
    busy_timeout_s: float = setting(
        5.0, min=0.1, help="wait for a locked database (SQLite)"
    )
    url: str = setting(
        "",
        help='PostgreSQL database URL ("postgresql://user@host:port/dbname?...", '
        "no password); empty: SQLite at path",
    )
    password_file: Path | None = setting(
        None, exists="file", help="file holding the PostgreSQL role's password"
    )
    pool_min: int = setting(
        1, min=0, max=1000, help="PostgreSQL connections each process keeps open"
    )
    pool_max: int = setting(
        8, min=1, max=1000, help="most PostgreSQL connections of each process"
    )
    pool_timeout_s: float = setting(
        5.0, min=0.1, max=600, help="wait for a free PostgreSQL connection"
    )
    connect_timeout_s: int = setting(
        5, min=2, max=600, help="wait for a new PostgreSQL connection"
    )
    statement_timeout_s: float = setting(
        10.0, min=0.1, max=86400, help="longest a PostgreSQL statement may run"
    )
    cached_ended_jobs: int = setting(
        10_000,
        min=0,
        max=10_000_000,
        help="final statuses of ended jobs each HTTP process keeps in memory "
        "(answered without a database read); 0: none",
    )
    cached_worker_s: float = setting(
        1.0,
        min=0,
        max=60,
        help="how long each HTTP process asks a worker for its running jobs' "
        "status without reading the worker's row again (a stale row costs "
        "one more call, never a wrong answer); 0: read it every time",
    )
    network_timeout_s: float = setting(
        10.0,
        min=2,
        max=3600,
        help="silence after which a PostgreSQL connection counts as lost (TCP "
        "keepalives and user timeout)",
    )

    def __post_init__(self) -> None:
        if self.pool_max < self.pool_min:
            raise Invalid(
                "pool_max",
                f"{self.pool_max} is less than pool_min ({self.pool_min})",
            )
        if not self.url:
            return  # SQLite: the PostgreSQL keys mean nothing
        # Imported here: a scheduler on SQLite never loads the driver.
        from scheduler.store.postgres import check_url

        try:
            check_url(self.url)
        except ValueError as exc:
            raise Invalid("url", str(exc)) from None


@dataclass(frozen=True)
class WorkersSection:
    heartbeat_interval_s: float = setting(
        5.0,
        min=0.1,
        help="shortest heartbeat interval handed to workers (small fleets get it)",
    )
    heartbeat_timeout_s: float = setting(
        15.0,
        min=0.2,
        help="silence after which an online worker is unreachable, for a worker "
        "given heartbeat_interval_s; scaled in proportion for longer intervals",
    )
    max_heartbeats_per_s: float = setting(
        200.0,
        min=0.01,
        max=1_000_000,
        help="heartbeat rate the scheduler aims at: the interval handed out grows "
        "to online workers / this",
    )
    heartbeat_jitter: float = setting(
        0.2,
        min=0.0,
        max=1.0,
        help="each interval handed out is up to this fraction longer, at random, "
        "so heartbeats do not arrive in waves",
    )
    heartbeat_flush_s: float = setting(
        0.5, min=0.01, max=60, help="heartbeats are written to the database this often"
    )
    rpc_timeout_s: float = setting(
        10.0, min=0.1, help="deadline of each call to a worker"
    )
    stop_timeout_s: float = setting(
        60.0, min=1, help="deadline of a stop call (covers the job's grace period)"
    )
    stream_timeout_s: float = setting(
        86400.0, min=1, help="longest an output stream to one client may last"
    )
    follow_window_bytes: int = setting(
        4 * 1024 * 1024,
        min=0,
        help="newest output kept per followed job and HTTP process; 0: no sharing",
    )
    follow_buffer_bytes: int = setting(
        64 * 1024 * 1024,
        min=0,
        help="output kept for followers by one HTTP process, all jobs together",
    )
    follow_write_bytes: int = setting(
        16384,
        min=1024,
        help="largest write to a follower that lags, joined from chunks",
    )
    retry_after_s: int = setting(
        5, min=1, help="Retry-After of a 503 (worker down) or 429 (worker full)"
    )
    max_wait_s: float = setting(
        3600.0, min=1, help="longest a ?wait=true start waits for the job to end"
    )

    def __post_init__(self) -> None:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise Invalid(
                "heartbeat_timeout_s",
                f"{self.heartbeat_timeout_s} must be greater than heartbeat_interval_s "
                f"({self.heartbeat_interval_s})",
            )


@dataclass(frozen=True)
class FanoutSection:
    max_parallel: int = setting(
        32, min=1, max=1024, help="worker calls one fan-out request makes at once"
    )
    max_workers: int = setting(
        10_000, min=1, help="most workers one fan-out request may start jobs on"
    )


@dataclass(frozen=True)
class SchedulerConfig:
    cluster: ClusterSection
    tls: TLSConfig
    auth: AuthSection
    http: HttpSection = field(default_factory=HttpSection)
    grpc: GrpcSection = field(default_factory=GrpcSection)
    state: StateSection = field(default_factory=StateSection)
    workers: WorkersSection = field(default_factory=WorkersSection)
    fanout: FanoutSection = field(default_factory=FanoutSection)
    log: LogSection = field(default_factory=LogSection)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load(path: str | Path) -> SchedulerConfig:
    return config.load(path, SchedulerConfig)
