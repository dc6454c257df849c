"""What the appliance tests share: requirements, the deployment, an API client.

These tests need root, systemd-nspawn, debootstrap and the Debian packaging
tools (``make appliance-deps`` installs them). Where something is missing they
skip, naming it; with ``JOBGATE_REQUIRE_APPLIANCE=1`` (set by ``.ci/run``)
they fail instead, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import skip_unless_required

from lab import nodes as appliance_lab

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
INVENTORY = ANSIBLE_DIR / "inventories" / "lab" / "hosts.ini"
# The lab inventory's API token (ansible/inventories/lab/group_vars/all.yml).
LAB_TOKEN = "lab-token-0123456789abcdef"
SCHEDULER, WORKERS, PKGTEST = "scheduler", ("worker-1", "worker-2"), "pkgtest"
HTTP_PORT = 8080


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


def tools_bin() -> Path | None:
    """The directory of ansible-playbook and ansible-lint, if installed."""
    env = os.environ.get("JOBGATE_ANSIBLE_BIN")
    candidates = [Path(env)] if env else []
    candidates.append(REPO / ".venv-appliance" / "bin")
    found = shutil.which("ansible-playbook")
    if found:
        candidates.append(Path(found).parent)
    for c in candidates:
        if (c / "ansible-playbook").exists():
            return c
    return None


def need_ansible() -> Path:
    tools = tools_bin()
    need(
        tools is not None,
        "ansible-playbook not found (.venv-appliance or PATH); "
        "'make appliance-deps' installs it",
    )
    return tools


def tools_env(tools: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{tools}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_CONFIG"] = str(ANSIBLE_DIR / "ansible.cfg")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env.pop("ANSIBLE_CALLBACKS_ENABLED", None)
    return env


def need_lab_host() -> None:
    """Skip unless this machine can boot systemd-nspawn nodes."""
    need(os.geteuid() == 0, "the appliance lab needs root (network namespaces)")
    need_programs(
        "systemd-nspawn",
        "debootstrap",
        "ip",
        "nsenter",
        "mount",
        "ssh",
        "ssh-keygen",
        "systemd-id128",
        "tar",
    )
    need(
        "overlay" in Path("/proc/filesystems").read_text()
        or Path("/sys/module/overlay").exists()
        or shutil.which("modprobe") is not None,
        "the kernel has no overlayfs",
    )
    need(bool(appliance_lab.cgroup_roots()), "no cgroup hierarchy to put nodes in")


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
    lab: appliance_lab.Lab
    workdir: Path
    tools: Path
    extra_vars: dict
    key: Path
    runs: list[subprocess.CompletedProcess] = field(default_factory=list)
    job_ids: dict[str, str] = field(default_factory=dict)  # worker -> a finished job

    @property
    def pki(self) -> Path:
        return Path(self.extra_vars["common_pki_local_dir"])

    @property
    def scheduler(self) -> appliance_lab.Node:
        return self.lab.nodes[SCHEDULER]

    def node(self, name: str) -> appliance_lab.Node:
        return self.lab.nodes[name]

    def playbook(self, *extra: str) -> subprocess.CompletedProcess:
        """Run ``ansible-playbook site.yml`` against the lab, from its network."""
        vars_file = self.workdir / "extra-vars.json"
        vars_file.write_text(json.dumps(self.extra_vars))
        cmd = self.lab.in_netns(
            str(self.tools / "ansible-playbook"),
            "-i",
            str(INVENTORY),
            "--private-key",
            str(self.key),
            "-e",
            f"@{vars_file}",
            *extra,
            str(ANSIBLE_DIR / "site.yml"),
        )
        env = tools_env(self.tools)
        # SSH connections are shared per host address; another lab with the
        # same addresses (a parallel run) must not get this one's.
        env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = str(self.workdir / "cp")
        env["ANSIBLE_LOCAL_TEMP"] = str(self.workdir / "tmp")
        t0 = time.monotonic()
        res = subprocess.run(
            cmd,
            cwd=ANSIBLE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        res.duration = time.monotonic() - t0
        (self.workdir / f"playbook-{len(self.runs) + 1}.log").write_text(
            res.stdout + res.stderr
        )
        self.runs.append(res)
        return res

    def api(self) -> LabApi:
        return LabApi(self.lab, self.scheduler.address, HTTP_PORT, self.pki / "ca.pem")

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
                check=False,
            ).stdout
            out.append(f"--- journal of {node.name}\n{text}")
        return "\n".join(out)


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
    def __init__(self, lab: appliance_lab.Lab, host: str, port: int, context, timeout):
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
