"""A local jobgate cluster of real processes on 127.0.0.1, for development.

``make run`` uses it to bring up one scheduler and two workers with a fresh
development CA, start the sample job and follow its output; the integration
tests use the same class, so what the tests exercise is what a developer runs.
Its command line is :mod:`jobgate.dev.run`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobgate.dev.process import ClusterError, Process, alive, descendants
from jobgate.tokens import hash_token
from worker.isolation import instance_name, remove_leftovers

REPO = Path(__file__).resolve().parents[3]
DEVCA = REPO / "certs" / "devca.py"
EXAMPLE_SCRIPTS = REPO / "examples" / "scripts"


def _reachable_by_others(path: Path) -> bool:
    """True if an unprivileged account can read files under ``path``."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            return False
    return bool(path.stat().st_mode & stat.S_IROTH)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DevCluster:
    """Certificates, configs and processes of a local cluster under ``directory``.

    The scheduler's ports are picked on its first start and kept for later
    starts (:meth:`restart_scheduler`), so workers configured with its gRPC
    address find it again. ``grpc_host`` is the address its gRPC server binds
    and workers dial; ``grpc_port`` fixes the port from the start.
    """

    def __init__(
        self,
        directory: Path,
        cluster: str = "dev",
        http_processes: int = 2,
        scripts_dir: Path | None = None,
        http_port: int = 0,
        scheduler_extra: str = "",
        state_extra: str = "",
        worker_extra: str = "",
        http_extra: str = "",
        grpc_host: str = "127.0.0.1",
        grpc_port: int = 0,
        https: bool = False,
        http_tls_extra: str = "",
        store_url: str = "",
        store_password_file: Path | None = None,
        schedulers: int = 1,
    ):
        """``https``: the API on HTTPS, with a certificate from the
        development CA for 127.0.0.1 and localhost; ``http_tls_extra`` adds
        settings to its ``[http.tls]``, ``state_extra`` to its ``[state]``
        (``scheduler_extra`` goes into ``[workers]``). ``store_url``: the
        scheduler keeps its state in this PostgreSQL database
        (``[state].url``, e.g. from
        :meth:`jobgate.dev.postgres.PostgresServer.create_database`), with
        the password in ``store_password_file`` if it needs one; empty:
        SQLite under ``directory``. ``schedulers``: how many schedulers
        share that state (each with ports of its own; workers are given every
        one's gRPC address, and :attr:`urls` their HTTP URLs)."""
        self.dir = directory.resolve()
        self.use_https = https
        self.http_tls_extra = http_tls_extra
        # The HTTPS certificate and key, relative to ``directory``.
        self.http_cert = "http/scheduler.pem"
        self.http_key = "http/scheduler.key"
        self.cluster = cluster
        self.http_processes = http_processes
        self.grpc_host = grpc_host
        self.scheduler_extra = scheduler_extra
        self.state_extra = state_extra
        self.http_extra = http_extra
        self.worker_extra = worker_extra
        self.store_url = store_url
        self.store_password_file = store_password_file
        self.pki = self.dir / "pki"
        self.logs = self.dir / "logs"
        self.scripts_dir = scripts_dir or EXAMPLE_SCRIPTS
        self._tmp_scripts: Path | None = None
        self.token = ""
        if schedulers < 1:
            raise ValueError("schedulers: at least 1")
        # Per scheduler: its process, what it said when ready, its ports
        # (grpc, http; 0 until it first started). The first one is also
        # ``scheduler``, ``scheduler_info``, ``grpc_port`` and ``http_port``.
        self.schedulers: list[Process | None] = [None] * schedulers
        self.scheduler_infos: list[dict] = [{} for _ in range(schedulers)]
        self._ports = [(grpc_port, http_port)] + [(0, 0)] * (schedulers - 1)
        self.workers: dict[str, Process] = {}
        self.worker_info: dict[str, dict] = {}
        self._started: list[Process] = []  # every process, restarted ones too

    # -- set-up ---------------------------------------------------------------

    def devca(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, str(DEVCA), *args], check=True, stdout=subprocess.DEVNULL
        )

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        if not (self.pki / "ca.pem").exists():
            self.devca("init", "--dir", str(self.pki), "--cluster", self.cluster)
        if not (self.pki / "scheduler.pem").exists():
            self.devca("issue", "--dir", str(self.pki), "--role", "scheduler")
        if os.geteuid() == 0 and not _reachable_by_others(self.scripts_dir):
            # Jobs run as other users when the worker is root: give them a copy
            # they can read.
            self._tmp_scripts = Path(tempfile.mkdtemp(prefix="jobgate-scripts-"))
            os.chmod(self._tmp_scripts, 0o755)  # noqa: S103 - jobs must read it
            for f in self.scripts_dir.iterdir():
                if f.is_file():
                    shutil.copy(f, self._tmp_scripts / f.name)
                    os.chmod(self._tmp_scripts / f.name, 0o755)  # noqa: S103
            self.scripts_dir = self._tmp_scripts
        if self.use_https and not (self.dir / "http" / "scheduler.pem").exists():
            self.devca(
                *("issue", "--dir", str(self.pki), "--role", "scheduler"),
                *("--dns", "localhost", "--ip", "127.0.0.1"),
                *("--out", str(self.dir / "http")),
            )
        self.token = secrets.token_urlsafe(32)
        (self.dir / "tokens").write_text(f"{hash_token(self.token)} dev run\n")
        os.chmod(self.dir / "tokens", 0o600)

    # The first scheduler, as with one.
    @property
    def scheduler(self) -> Process | None:
        return self.schedulers[0]

    @scheduler.setter
    def scheduler(self, proc: Process | None) -> None:
        self.schedulers[0] = proc

    @property
    def scheduler_info(self) -> dict:
        return self.scheduler_infos[0]

    @scheduler_info.setter
    def scheduler_info(self, info: dict) -> None:
        self.scheduler_infos[0] = info

    @property
    def grpc_port(self) -> int:
        return self._ports[0][0]

    @grpc_port.setter
    def grpc_port(self, port: int) -> None:
        self._ports[0] = (port, self._ports[0][1])

    @property
    def http_port(self) -> int:
        return self._ports[0][1]

    @http_port.setter
    def http_port(self, port: int) -> None:
        self._ports[0] = (self._ports[0][0], port)

    @staticmethod
    def _scheduler_name(index: int) -> str:
        return "scheduler" if index == 0 else f"scheduler-{index + 1}"

    def scheduler_config(self, index: int = 0) -> Path:
        grpc_port, http_port = self._ports[index]
        path = self.dir / f"{self._scheduler_name(index)}.toml"
        path.write_text(
            f"""# Written by jobgate.dev.cluster (see examples/scheduler.toml).
[cluster]
name = "{self.cluster}"

[http]
bind = "127.0.0.1:{http_port}"
processes = {self.http_processes}
scheme = "{"https" if self.use_https else "http"}"
{self.http_extra}
{self._http_tls()}
[grpc]
bind = "{_hostport(self.grpc_host, grpc_port)}"

[tls]
ca_file = "pki/ca.pem"
cert_file = "pki/scheduler.pem"
key_file = "pki/scheduler.key"

[auth]
tokens_file = "tokens"

[state]
path = "state/scheduler.db"
{self._store()}
{self.state_extra}

[workers]
heartbeat_interval_s = 1.0
heartbeat_timeout_s = 4.0
rpc_timeout_s = 5.0
{self.scheduler_extra}
"""
        )
        return path

    def _store(self) -> str:
        if not self.store_url:
            return ""
        lines = [f"url = {json.dumps(self.store_url)}"]
        if self.store_password_file is not None:
            lines.append(f"password_file = {json.dumps(str(self.store_password_file))}")
        return "\n".join(lines) + "\n"

    def _http_tls(self) -> str:
        if not self.use_https:
            return ""
        return (
            f'[http.tls]\ncert_file = "{self.http_cert}"\n'
            f'key_file = "{self.http_key}"\n{self.http_tls_extra}\n'
        )

    @property
    def scheduler_address(self) -> str:
        """The gRPC address workers are configured to reach the scheduler at."""
        port = self.grpc_port or self.scheduler_info["grpc_port"]
        return _hostport(self.grpc_host, port)

    @property
    def scheduler_addresses(self) -> list[str]:
        """Every scheduler's gRPC address (each started once at least)."""
        return [_hostport(self.grpc_host, grpc) for grpc, _ in self._ports]

    def _scheduler_lines(self) -> str:
        if len(self.schedulers) == 1:
            return f'address = "{self.scheduler_address}"'
        return f"addresses = {json.dumps(self.scheduler_addresses)}"

    def worker_config(
        self, name: str, labels: dict[str, str] | None = None, host: str = "127.0.0.1"
    ) -> Path:
        """The worker's config; it binds and advertises ``host`` (any port)."""
        if not (self.pki / f"{name}.pem").exists():
            self.devca(
                "issue", "--dir", str(self.pki), "--role", "worker", "--name", name
            )
        label_text = ", ".join(f'{k} = "{v}"' for k, v in (labels or {}).items())
        path = self.dir / f"{name}.toml"
        path.write_text(
            f"""# Written by jobgate.dev.cluster (see examples/worker.toml).
[worker]
name = "{name}"
cluster = "{self.cluster}"
advertise_host = "{host}"
labels = {{ {label_text} }}

[grpc]
bind = "{_hostport(host, 0)}"

[scheduler]
{self._scheduler_lines()}
retry_initial_s = 0.2
retry_max_s = 2.0

[tls]
ca_file = "pki/ca.pem"
cert_file = "pki/{name}.pem"
key_file = "pki/{name}.key"

[jobs]
scripts_dir = "{self.scripts_dir}"
state_dir = "state/{name}"
stop_grace_s = 2.0
{self.worker_extra}
"""
        )
        return path

    # -- processes --------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.use_https else "http"
        return f"{scheme}://127.0.0.1:{self.scheduler_info['http_port']}"

    @property
    def urls(self) -> list[str]:
        """Every scheduler's HTTP URL."""
        scheme = "https" if self.use_https else "http"
        return [f"{scheme}://127.0.0.1:{http}" for _, http in self._ports]

    def connection(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        """A connection to the HTTP API (over HTTPS trusting only the
        development CA, where the API serves HTTPS)."""
        port = self.scheduler_info["http_port"]
        if not self.use_https:
            return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        context = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        return http.client.HTTPSConnection(
            "127.0.0.1", port, context=context, timeout=timeout
        )

    def start_scheduler(self, index: int = 0) -> dict:
        name = self._scheduler_name(index)
        proc = Process(
            name,
            [
                sys.executable,
                "-m",
                "scheduler.cli",
                "serve",
                str(self.scheduler_config(index)),
            ],
            self.logs / f"{name}.log",
            self.dir / f"{name}.ready",
        )
        self.schedulers[index] = proc
        self._started.append(proc)
        proc.start()
        info = self.scheduler_infos[index] = proc.wait_ready()
        # Later starts reuse the ports: workers and clients keep finding it.
        self._ports[index] = (info["grpc_port"], info["http_port"])
        return info

    def start_schedulers(self) -> None:
        for index in range(len(self.schedulers)):
            self.start_scheduler(index)

    def restart_scheduler(self, index: int = 0) -> dict:
        """Stop a scheduler and start it again on the same ports and state."""
        proc = self.schedulers[index]
        if proc is not None:
            proc.stop()
        return self.start_scheduler(index)

    def kill_scheduler(self, index: int = 0, timeout: float = 10.0) -> None:
        """SIGKILL scheduler ``index`` with its HTTP processes at once, as when
        its host dies, and wait until they are gone (its ports are free
        again for :meth:`start_scheduler`)."""
        proc = self.schedulers[index]
        if proc is None or not proc.running():
            return
        pids = [proc.pid, *descendants(proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.proc.wait(timeout)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while any(alive(p) for p in pids):  # orphans: init reaps them
            if time.monotonic() > deadline:
                raise ClusterError(f"{proc.name}: processes left after SIGKILL")
            time.sleep(0.01)

    def start_worker(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        wait: bool = True,
        host: str = "127.0.0.1",
        prefix: list[str] | tuple[str, ...] = (),
    ) -> Process:
        """Start (or start again) worker ``name``.

        It binds and advertises ``host``; ``prefix`` is put before its command
        line (e.g. ``["ip", "netns", "exec", NS]``) and must exec the rest, so
        that :attr:`Process.pid` is the worker's own.
        """
        proc = Process(
            name,
            [
                *prefix,
                sys.executable,
                "-m",
                "worker.cli",
                "serve",
                str(self.worker_config(name, labels, host)),
            ],
            self.logs / f"{name}.log",
            self.dir / f"{name}.ready",
        )
        self.workers[name] = proc
        self._started.append(proc)
        proc.start()
        if wait:
            self.worker_info[name] = proc.wait_ready()
        return proc

    def start(self, workers: tuple[str, ...] = ("worker-1", "worker-2")) -> None:
        self.prepare()
        self.start_schedulers()
        for name in workers:
            self.start_worker(name, wait=False)
        for name in workers:
            self.worker_info[name] = self.workers[name].wait_ready()

    def stop(self) -> None:
        current = [*self.workers.values(), *self.schedulers]
        # Workers first (they deregister), then earlier incarnations still
        # running, then the schedulers.
        workers = [
            *self.workers.values(),
            *(p for p in self._started if p not in current),
        ]
        for proc in workers:
            proc.signal(signal.SIGTERM)
        for proc in workers:
            proc.stop()
        for proc in self.schedulers:
            if proc is not None:
                proc.stop()
        # A worker that was killed cannot clean up after its jobs; do it here.
        for name in self.workers:
            remove_leftovers(instance_name(name, self.dir / "state" / name))
        if self._tmp_scripts is not None:
            shutil.rmtree(self._tmp_scripts, ignore_errors=True)
            self._tmp_scripts = None

    def __enter__(self) -> DevCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_env(self) -> Path:
        path = self.dir / "local.env"
        path.write_text(
            f"export JOBGATE_URL={','.join(self.urls)}\n"
            f"export JOBGATE_TOKEN={self.token}\n"
            f"export JOBGATE_WORKERS={','.join(self.workers)}\n"
        )
        os.chmod(path, 0o600)
        return path

    # -- HTTP -------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body=None,
        headers=None,
        token: str | None = None,
        timeout: float = 30.0,
    ):
        """One HTTP request; returns (status, headers, body bytes)."""
        conn = self.connection(timeout)
        try:
            hdrs = {"Authorization": f"Bearer {self.token if token is None else token}"}
            if token == "":
                hdrs = {}
            hdrs.update(headers or {})
            data = None
            if body is not None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()
