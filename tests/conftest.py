"""Shared fixtures: a development CA and a live local cluster of real processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobgate.dev import postgres as devpg
from jobgate.dev.cluster import DEVCA, DevCluster

REPO = Path(__file__).resolve().parents[1]
TEST_SCRIPTS = Path(__file__).resolve().parent / "scripts"


def make_public_dir(prefix: str) -> Path:
    """A temporary directory that jobs running as 'nobody' can read."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


@contextlib.contextmanager
def cluster_of_its_own(
    name: str,
    scripts_dir: Path | None,
    workers: tuple[str, ...] = ("worker-1",),
    cluster_class: type[DevCluster] = DevCluster,
    **settings,
) -> Iterator[DevCluster]:
    """A cluster for the tests that need settings of their own: started with
    ``workers``, stopped and removed afterwards whatever happened."""
    directory = make_public_dir(f"jobgate-test-{name}-")
    if scripts_dir is not None:
        settings["scripts_dir"] = scripts_dir
    c = cluster_class(directory, **settings)
    try:
        c.start(workers)
        yield c
    finally:
        c.stop()
        shutil.rmtree(directory, ignore_errors=True)


def children() -> dict[int, str]:
    """This process's children, zombies included: pid -> state letter."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if int(fields[1]) == os.getpid():
                found[int(entry)] = fields[0]
    return found


def skip_unless_required(reason: str, variable: str) -> None:
    """Skip for ``reason``, or fail where ``variable`` is "1".

    CI sets the ``JOBGATE_REQUIRE_*`` variables (``.ci/run``): there a test
    that needs root, a cgroup or a network namespace must run, not skip.
    """
    if os.environ.get(variable) == "1":
        pytest.fail(f"{variable}=1 but {reason}")
    pytest.skip(reason)


def need_postgres() -> None:
    """Skip where PostgreSQL's server binaries are missing, or fail where
    JOBGATE_REQUIRE_POSTGRES=1."""
    if devpg.find_bindir() is None:
        skip_unless_required(
            "PostgreSQL's server binaries are missing (make postgres-deps)",
            "JOBGATE_REQUIRE_POSTGRES",
        )


@pytest.fixture(scope="session")
def postgres() -> Iterator[devpg.PostgresServer]:
    """One PostgreSQL server for the test session (Debian's package binaries),
    on a unix socket and 127.0.0.1 (TLS optional there); stopped and removed
    at the end.

    Skips when the binaries are missing, unless JOBGATE_REQUIRE_POSTGRES=1.
    """
    need_postgres()
    directory = make_public_dir("jobgate-test-postgres-")
    # TLS over TCP, with a certificate for 127.0.0.1 from a CA of its own.
    devca("init", "--dir", str(directory / "pki"), "--cluster", "postgres")
    devca(
        *("issue", "--dir", str(directory / "pki"), "--role", "scheduler"),
        *("--ip", "127.0.0.1", "--out", str(directory / "tls")),
    )
    server = devpg.PostgresServer(
        directory,
        tcp=True,
        tls_cert=directory / "tls" / "scheduler.pem",
        tls_key=directory / "tls" / "scheduler.key",
        tls_ca=directory / "pki" / "ca.pem",
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def devca(*args: str) -> None:
    subprocess.run(
        [sys.executable, str(DEVCA), *args], check=True, stdout=subprocess.DEVNULL
    )


@pytest.fixture(scope="session")
def scripts_dir() -> Path:
    """The test scripts, copied where an unprivileged job user can read them."""
    path = make_public_dir("jobgate-test-scripts-")
    for f in TEST_SCRIPTS.iterdir():
        shutil.copy(f, path / f.name)
        os.chmod(path / f.name, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(scripts_dir: Path) -> DevCluster:
    """One scheduler (2 gunicorn processes) and workers worker-1 and worker-2."""
    directory = make_public_dir("jobgate-test-cluster-")
    with DevCluster(directory, scripts_dir=scripts_dir, http_processes=2) as c:
        yield c
    shutil.rmtree(directory, ignore_errors=True)


class Api:
    """A tiny HTTP client for the tests, returning (status, headers, json or bytes)."""

    def __init__(self, cluster: DevCluster):
        self.c = cluster

    def call(self, method: str, path: str, body=None, **kw):
        status, headers, raw = self.c.request(method, path, body, **kw)
        ctype = headers.get("Content-Type", "")
        data = json.loads(raw) if raw and ctype.startswith("application/json") else raw
        return status, headers, data

    def get(self, path: str, **kw):
        return self.call("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.call("POST", path, body, **kw)

    def start(self, worker: str, path: str, args=(), command: str = "bash", **extra):
        status, headers, data = self.post(
            f"/v1/workers/{worker}/jobs",
            {"command": command, "path": path, "args": list(args), **extra},
        )
        assert status == 201, (status, data)
        return data

    def output(self, worker: str, job_id: str, query: str = "follow=true") -> bytes:
        status, _, data = self.get(f"/v1/workers/{worker}/jobs/{job_id}/output?{query}")
        assert status == 200, (status, data)
        return data


@pytest.fixture(scope="session")
def api(cluster: DevCluster) -> Api:
    return Api(cluster)
