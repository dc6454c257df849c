"""A service's life: its steps in order, what it tells systemd, how it ends.

The first tests run :class:`jobgate.lifecycle.Service` in this process with a
service of their own that records its steps; the others run the real
scheduler and worker as processes with a notification socket standing in for
systemd's, and break the scheduler's HTTP side.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

import grpc
import pytest
from conftest import Api, devca, make_public_dir
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_https import HttpsCluster
from test_lifecycle import pid_alive, processes_mentioning, wait_for
from test_mtls import dial, pair

from jobgate import identity
from jobgate.dev.cluster import ClusterError, DevCluster
from jobgate.lifecycle import Service
from jobgate.tls import TLSConfig

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# -- the lifecycle, in this process ---------------------------------------------------


class GrpcSettings:
    bind = "127.0.0.1:0"
    max_threads = 8
    max_message_bytes = 1 << 20


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    devca("init", "--dir", str(directory), "--cluster", "dev")
    devca("issue", "--dir", str(directory), "--role", "scheduler")
    devca("issue", "--dir", str(directory), "--role", "worker", "--name", "w1")
    return directory


def unhandled_hup(*_) -> None:
    """SIGHUP's handler while no service installed one (rather than dying)."""
    unhandled_hup.count += 1


unhandled_hup.count = 0


@pytest.fixture
def own_signals():
    """Give the signal handlers a service installs back to pytest afterwards."""
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    saved = {s: signal.getsignal(s) for s in signums}
    signal.signal(signal.SIGHUP, unhandled_hup)
    unhandled_hup.count = 0
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def health(pki: Path, port: int) -> int:
    """The gRPC health status on ``port``, asked with a worker's certificate."""
    peer = identity.dns_name("dev", identity.SCHEDULER)
    with dial(port, pki / "ca.pem", peer, pair(pki, "w1")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


class Recorder(Service):
    """A service that records its steps and what the gRPC server said at each."""

    def __init__(self, pki: Path, ready_file: Path, **behaviour):
        tls = TLSConfig(
            ca_file=pki / "ca.pem",
            cert_file=pki / "scheduler.pem",
            key_file=pki / "scheduler.key",
        )
        super().__init__(
            "dev",
            {"/jobgate.v1.Worker/": {identity.SCHEDULER}},
            GrpcSettings,
            tls,
            ready_file,
        )
        self.pki = pki
        self.behaviour = behaviour
        self.steps: list[tuple[str, object]] = []
        self.port = 0

    def _health(self):
        try:
            return health(self.pki, self.port)
        except grpc.RpcError as exc:
            return exc.code()

    def prepare(self, creds) -> None:
        self.steps.append(("prepare", creds.cert == self.tls.cert_file.read_bytes()))

    def add_servicers(self, server) -> None:
        self.steps.append(("add_servicers", None))

    def start(self, grpc_port: int) -> None:
        self.port = grpc_port
        self.steps.append(("start", self._health()))
        if "start_raises" in self.behaviour:
            raise OSError(self.behaviour["start_raises"])

    def wait_ready(self):
        self.steps.append(("wait_ready", None))
        if "fail" in self.behaviour:
            self.fail(self.behaviour["fail"])
            return None
        if self.behaviour.get("hup"):
            os.kill(os.getpid(), signal.SIGHUP)
        # Asked to stop the way systemd asks, once the service is waiting.
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return {"grpc_port": self.port}

    def stop_before_grpc(self) -> None:
        self.steps.append(("stop_before_grpc", self._health()))

    def close(self) -> None:
        self.steps.append(("close", self._health()))


class Reloading(Recorder):
    def reload(self) -> None:
        self.steps.append(("reload", None))


def test_service_runs_its_steps_in_order_and_stops_on_sigterm(
    pki, tmp_path, own_signals
):
    ready = tmp_path / "ready"
    service = Recorder(pki, ready)
    assert service.run() == 0
    assert service.steps == [
        ("prepare", True),
        ("add_servicers", None),
        # The gRPC server serves (and says so) before the rest starts ...
        ("start", SERVING),
        ("wait_ready", None),
        # ... still answers, NOT_SERVING, while the service winds down ...
        ("stop_before_grpc", NOT_SERVING),
        # ... and is gone before the last step.
        ("close", grpc.StatusCode.UNAVAILABLE),
    ]
    assert ready.read_text() == f'{{"grpc_port": {service.port}}}'
    # SIGHUP is left alone by a service that does not reload.
    assert signal.getsignal(signal.SIGHUP) is unhandled_hup


def test_sighup_reloads_a_service_that_reloads(pki, tmp_path, own_signals):
    service = Reloading(pki, tmp_path / "ready", hup=True)
    assert service.run() == 0
    assert ("reload", None) in service.steps
    assert unhandled_hup.count == 0
    assert service.steps[-1][0] == "close"


def test_failed_service_exits_1_unready_after_stopping_in_order(
    pki, tmp_path, own_signals, caplog
):
    ready = tmp_path / "ready"
    service = Recorder(pki, ready, fail="the frobnicator is gone")
    assert service.run() == 1
    assert [name for name, _ in service.steps] == [
        "prepare",
        "add_servicers",
        "start",
        "wait_ready",
        "stop_before_grpc",
        "close",
    ]
    assert not ready.exists()
    assert "the frobnicator is gone" in caplog.text


def test_service_whose_start_raises_still_stops_its_grpc_server(
    pki, tmp_path, own_signals
):
    service = Recorder(pki, tmp_path / "ready", start_raises="port 1 is taken")
    with pytest.raises(OSError, match="port 1 is taken"):
        service.run()
    assert service.steps[-2:] == [
        ("stop_before_grpc", NOT_SERVING),
        ("close", grpc.StatusCode.UNAVAILABLE),
    ]


# -- the real services under a stand-in for systemd ---------------------------------


class Systemd:
    """A notification socket that collects what a service sends to it."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="jg-notify-")
        self.path = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except OSError:
                return

    def env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Let the processes started from now on talk to this socket."""
        monkeypatch.setenv("NOTIFY_SOCKET", self.path)
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping every 0.5 s
        monkeypatch.delenv("WATCHDOG_PID", raising=False)

    def wait_for(self, text: str, timeout: float = 10) -> bool:
        return wait_for(lambda: any(text in m for m in self.messages), timeout)

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def systemd():
    made: list[Systemd] = []

    def make() -> Systemd:
        made.append(Systemd())
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def clusters(scripts_dir):
    made: list[DevCluster] = []

    def make(tag: str, kind: type[DevCluster] = DevCluster, **kw) -> DevCluster:
        kw.setdefault("http_processes", 1)
        directory = make_public_dir(f"jobgate-test-service-{tag}-")
        c = kind(directory, scripts_dir=scripts_dir, **kw)
        made.append(c)
        c.prepare()
        return c

    yield make
    for c in made:
        c.stop()
        shutil.rmtree(c.dir, ignore_errors=True)


def children(pid: int) -> list[int]:
    """Pids of the live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def test_scheduler_and_worker_tell_systemd_each_step(clusters, systemd, monkeypatch):
    c = clusters("notify")
    sched_systemd, worker_systemd = systemd(), systemd()
    sched_systemd.env(monkeypatch)
    info = c.start_scheduler()
    worker_systemd.env(monkeypatch)
    worker = c.start_worker("worker-a")
    wid = c.worker_info["worker-a"]["worker_id"]
    assert set(info) == {"http_port", "grpc_port", "pid"}
    assert info["pid"] == c.scheduler.pid
    assert set(c.worker_info["worker-a"]) == {
        "grpc_port",
        "address",
        "worker_id",
        "metrics_port",
    }

    http, grpc_port = info["http_port"], info["grpc_port"]
    assert sched_systemd.wait_for("STATUS=workers: 1 online")
    assert worker_systemd.wait_for("WATCHDOG=1")
    assert c.workers["worker-a"].stop() == 0
    assert c.scheduler.stop() == 0

    sched = sched_systemd.messages
    assert sched[:2] == [
        "STATUS=starting the HTTP gateway\n",
        f"READY=1\nSTATUS=serving HTTP on port {http}, gRPC on port {grpc_port} "
        "for cluster dev\n",
    ]
    assert sched[-1] == "STOPPING=1\nSTATUS=stopping\n"
    pings = sched[2:-1]
    assert "WATCHDOG=1\n" in pings
    assert (
        f"STATUS=workers: 1 online, 0 unreachable, 0 offline; HTTP on port {http} "
        f"(1 of 1 processes up), gRPC on port {grpc_port}\n"
    ) in pings

    assert worker_systemd.messages[:2] == [
        f"STATUS=registering with the scheduler at 127.0.0.1:{grpc_port}\n",
        f"READY=1\nSTATUS=registered as worker-a ({wid}), 0 jobs running\n",
    ]
    assert worker_systemd.messages[-1] == (
        "STOPPING=1\nSTATUS=deregistering and stopping jobs\n"
    )
    assert not worker.running()


def test_scheduler_whose_http_processes_keep_exiting_stops_with_status_1(
    clusters, systemd, monkeypatch
):
    """gunicorn replaces each HTTP process as it dies: the scheduler must notice."""

    class MismatchedKey(HttpsCluster):
        def prepare(self) -> None:
            super().prepare()
            # The key of another certificate: each HTTP process dies as it
            # sets up TLS, after gunicorn counts it as booted.
            self.http_key = "pki/scheduler.key"

    c = clusters(
        "crashloop",
        MismatchedKey,
        http_processes=2,
        http_extra="max_restarts = 3\nrestart_window_s = 30\n",
    )
    notified = systemd()
    notified.env(monkeypatch)
    try:
        c.start_scheduler()  # gunicorn's processes load the app before they die
    except ClusterError:
        pass  # or the scheduler stopped before it wrote its ready file
    scheduler = c.scheduler
    assert scheduler.proc.wait(timeout=20) == 1
    log = scheduler.log_path.read_text()
    assert re.search(
        r"ERROR \d+ scheduler.server: the HTTP gateway's processes keep exiting: "
        r"4 in the last 30 s, more than \[http\].max_restarts \(3\)",
        log,
    ), log[-3000:]
    assert "KEY_VALUES_MISMATCH" in log  # what gunicorn's processes died of
    assert notified.messages[-1] == "STOPPING=1\nSTATUS=stopping\n"
    # Nothing of the HTTP side is left behind.
    assert wait_for(lambda: processes_mentioning(str(c.dir)) == [], timeout=10)


def test_scheduler_exits_1_when_gunicorn_dies(clusters):
    c = clusters("master")
    c.start_scheduler()
    (master,) = children(c.scheduler.pid)
    os.kill(master, signal.SIGKILL)
    assert c.scheduler.proc.wait(timeout=20) == 1
    assert "the HTTP gateway exited unexpectedly (code -9)" in (
        c.scheduler.log_path.read_text()
    )


def test_an_http_process_that_dies_is_replaced_and_the_scheduler_serves_on(
    clusters, systemd, monkeypatch
):
    c = clusters("replaced", http_processes=2)
    notified = systemd()
    notified.env(monkeypatch)
    c.start_scheduler()
    api = Api(c)
    (master,) = children(c.scheduler.pid)
    assert wait_for(lambda: len(children(master)) == 2)
    first = children(master)
    for victim in first:  # two exits: fewer than [http].max_restarts (5)
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda v=victim: not pid_alive(v))
    assert wait_for(lambda: len(set(children(master)) - set(first)) == 2)
    assert notified.wait_for("(2 of 2 processes up)")
    assert c.scheduler.running()
    assert api.get("/v1/workers")[0] == 200
    assert "keep exiting" not in c.scheduler.log_path.read_text()
