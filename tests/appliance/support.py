"""What the appliance tests share: requirements, the deployment, an API client.

These tests need root, systemd-nspawn, debootstrap and the Debian packaging
tools (``make appliance-deps`` installs them). Where something is missing they
skip, naming it; with ``JOBGATE_REQUIRE_APPLIANCE=1`` (set by ``.ci/run``)
they fail instead, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import skip_unless_required

from lab import cluster as lab_cluster
from lab import nodes as lab_nodes

REPO = lab_cluster.REPO
ANSIBLE_DIR = lab_cluster.ANSIBLE_DIR
LAB_TOKEN = lab_cluster.LAB_TOKEN
SCHEDULER, WORKERS, PKGTEST = lab_cluster.SCHEDULER, lab_cluster.WORKERS, "pkgtest"
HTTP_PORT = lab_cluster.HTTP_PORT
tools_env = lab_cluster.tools_env
# The user ids the lab's jobs run under (worker_job_uid_min/max in
# ansible/inventories/lab/group_vars/all.yml), apart from the default range
# that jobs of workers on the machine itself use.
LAB_JOB_UIDS = range(70000, 71000)


def need(ok: bool, reason: str) -> None:
    """Skip (or, under JOBGATE_REQUIRE_APPLIANCE=1, fail) unless ``ok``."""
    if not ok:
        skip_unless_required(reason, "JOBGATE_REQUIRE_APPLIANCE")


def need_programs(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    need(
        not missing,
        f"missing {', '.join(missing)}; 'make appliance-deps' installs it",
    )


def need_ansible() -> Path:
    tools = lab_cluster.tools_bin()
    need(
        tools is not None,
        "ansible-playbook not found (.venv-appliance or PATH); "
        "'make appliance-deps' installs it",
    )
    return tools


def need_lab_host() -> None:
    """Skip unless this machine can boot systemd-nspawn nodes."""
    missing = lab_cluster.missing_requirements()
    need(not missing, "the lab needs " + "; ".join(missing))


# -- packages -------------------------------------------------------------------


def package_files(debs: Path) -> dict[str, Path]:
    """Package name -> .deb file, for the three packages."""
    found = {}
    for deb in sorted(debs.glob("*.deb")):
        found[deb.name.split("_", 1)[0]] = deb
    assert set(found) == {"jobgate", "jobgate-scheduler", "jobgate-worker"}, found
    return found


# -- the lab ----------------------------------------------------------------------


@dataclass
class Deployment:
    """A lab brought up by ``python -m lab up``, taken over by the tests."""

    cluster: lab_cluster.Cluster
    lab: lab_nodes.Lab
    up: subprocess.CompletedProcess  # the `python -m lab up` that booted it
    job_ids: dict[str, str] = field(default_factory=dict)  # worker -> a finished job

    @property
    def pki(self) -> Path:
        return self.cluster.pki

    @property
    def runs(self) -> list[lab_cluster.PlaybookRun]:
        return self.cluster.runs()

    @property
    def scheduler(self) -> lab_nodes.Node:
        """The (first) scheduler's node."""
        return self.lab.nodes[self.cluster.scheduler]

    def node(self, name: str) -> lab_nodes.Node:
        return self.lab.nodes[name]

    def playbook(self, *extra: str) -> lab_cluster.PlaybookRun:
        """Run ``ansible-playbook site.yml`` against the lab, from its network."""
        return self.cluster.playbook(self.lab, *extra)

    def api(self, scheduler: str | None = None) -> LabApi:
        """A client of the API of ``scheduler`` (a node name; the first one)."""
        node = self.lab.nodes[scheduler] if scheduler else self.scheduler
        return LabApi(self.lab, node.address, HTTP_PORT, self.pki / "ca.pem")

    def diagnostics(self) -> str:
        """The services' journals on every node, for a failure message."""
        out = []
        for node in self.lab.nodes.values():
            if not node.leader:
                continue
            text = node.run(
                "journalctl",
                "--no-pager",
                "-n",
                "60",
                "-u",
                "jobgate-scheduler",
                "-u",
                "jobgate-worker",
                "-u",
                "postgresql@*",
                check=False,
            ).stdout
            out.append(f"--- journal of {node.name}\n{text}")
        return "\n".join(out)


def lab_command(directory: Path, *args: str, timeout: float = 900):
    """``python -m lab --dir DIRECTORY ARGS``, as ``make lab`` runs it."""
    return subprocess.run(
        [sys.executable, "-m", "lab", "--dir", str(directory), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP counters of an ansible-playbook run, by host."""
    hosts = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", output, re.M):
        hosts[m.group(1)] = {
            k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))
        }
    return hosts


# -- HTTP API from inside the lab network -------------------------------------------


class _LabHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, lab: lab_nodes.Lab, host: str, port: int, context, timeout):
        super().__init__(host, port, context=context, timeout=timeout)
        self._lab = lab

    def connect(self) -> None:
        sock = self._lab.connect(self.host, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class LabApi:
    """A small HTTPS client of the scheduler's API, verifying the cluster CA."""

    def __init__(
        self, lab, host: str, port: int, ca_file: Path, token: str = LAB_TOKEN
    ):
        self.lab, self.host, self.port, self.token = lab, host, port, token
        self.context = ssl.create_default_context(cafile=str(ca_file))

    def call(self, method: str, path: str, body=None, timeout: float = 30):
        conn = _LabHTTPSConnection(
            self.lab, self.host, self.port, self.context, timeout
        )
        try:
            headers = {"Authorization": f"Bearer {self.token}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("Content-Type", "")
            if raw and ctype.startswith("application/json"):
                return resp.status, json.loads(raw)
            return resp.status, raw
        finally:
            conn.close()

    def get(self, path: str, **kw):
        return self.call("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.call("POST", path, body, **kw)

    def wait_for(self, path: str, predicate, timeout: float = 30):
        """GET ``path`` until ``predicate(body)`` holds; the last body."""
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            status, body = self.get(path)
            if status == 200 and predicate(body):
                return body
            time.sleep(0.5)
        raise AssertionError(f"GET {path} never matched; last answer: {body!r}")


class OutputFollower:
    """A client that follows a job's output (``?follow=true``) in a thread.

    ``data`` grows as the bytes come. Once the stream is over (:meth:`join`),
    ``complete`` says whether it ended as a whole answer (the job ended and
    every byte was sent) or was cut; ``error`` is what cut it.
    """

    def __init__(self, api: LabApi, path: str, timeout: float = 120):
        self.data = bytearray()
        self.status: int | None = None
        self.complete = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._follow, args=(api, path, timeout), daemon=True
        )
        self._thread.start()

    def _follow(self, api: LabApi, path: str, timeout: float) -> None:
        conn = _LabHTTPSConnection(api.lab, api.host, api.port, api.context, timeout)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {api.token}"})
            resp = conn.getresponse()
            self.status = resp.status
            if resp.status != 200:
                self.error = AssertionError(f"{resp.status}: {resp.read()[:500]!r}")
                return
            while True:
                # A chunk at a time, as it comes (read() would wait for more).
                chunk = resp.read1(65536)
                if not chunk:
                    break
                self.data += chunk
            self.complete = True
        except Exception as exc:  # noqa: BLE001 - a cut stream is an outcome
            self.error = exc
        finally:
            conn.close()

    def wait_for_bytes(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.data) < count and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(self.data) >= count, (self.status, bytes(self.data), self.error)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the follower still reads"
