"""A jobgate cluster on the lab's nodes: the working directory, Ansible, the API port.

A cluster lives in one working directory (``build/lab`` for ``make lab``, a
temporary one for the tests)::

    state.json        the booted nodes (lab.nodes.Lab.save), present while up
    id_ed25519{,.pub} the SSH key Ansible logs in with (root on each node)
    pki/              the cluster CA and certificates, made by site.yml
    extra-vars.json   the variables site.yml is run with
    playbook-N.log    the output of each run of site.yml
    api.port          the port of 127.0.0.1 forwarded to the scheduler's API
    nodes/            the nodes' root file systems and consoles

    topology          which inventory the lab was booted for ("default", "ha")

The nodes are those of the topology's inventory (``ansible/inventories/lab/
hosts.ini``: one scheduler and two workers; ``ha.ini``: two schedulers on one
PostgreSQL database node, and two workers), in its order (their addresses
follow from it), and optionally spare nodes after them that no play touches.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lab.nodes import Lab, LabError, cgroup_roots

REPO = Path(__file__).resolve().parents[1]
ANSIBLE_DIR = REPO / "ansible"
INVENTORY = ANSIBLE_DIR / "inventories" / "lab" / "hosts.ini"
SCRIPTS = REPO / "examples" / "scripts"
DEBS = REPO / "dist" / "deb"
# The lab inventory's API token (ansible/inventories/lab/group_vars/all.yml).
LAB_TOKEN = "lab-token-0123456789abcdef"  # noqa: S105
SCHEDULER, WORKERS = "scheduler", ("worker-1", "worker-2")
NODES = (SCHEDULER, *WORKERS)
HTTP_PORT = 8080
# What the database node's root has beyond the others': the server, and the
# driver Ansible's community.postgresql modules use on the node.
DATABASE_PACKAGES = ("postgresql", "python3-psycopg2")
# What the schedulers' roots have for the keepalived role (its health check
# runs curl), where the topology has a virtual address.
KEEPALIVED_PACKAGES = ("curl", "keepalived")


@dataclass(frozen=True)
class Topology:
    """The hosts of one lab inventory, by role, in the inventory's order."""

    name: str
    inventory: Path
    schedulers: tuple[str, ...]
    workers: tuple[str, ...]
    databases: tuple[str, ...] = ()
    # The schedulers' virtual address (keepalived_virtual_ip in the
    # inventory, without the prefix); the API is forwarded to it.
    virtual_address: str = ""

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node, in the order that gives each its inventory address."""
        return (*self.schedulers, *self.databases, *self.workers)

    def capabilities(self) -> dict[str, tuple[str, ...]]:
        """Node name -> capabilities beyond nspawn's default set it needs."""
        if not self.virtual_address:
            return {}
        # keepalived adds and removes the address on the node's interface.
        return dict.fromkeys(self.schedulers, ("CAP_NET_ADMIN",))

    def packages(self) -> dict[str, tuple[str, ...]]:
        """Node name -> what its root has beyond the lab's base packages."""
        packages = dict.fromkeys(self.databases, DATABASE_PACKAGES)
        if self.virtual_address:
            packages.update(dict.fromkeys(self.schedulers, KEEPALIVED_PACKAGES))
        return packages

    def units(self) -> dict[str, str]:
        """Node name -> the service that node is there to run."""
        units = dict.fromkeys(self.schedulers, "jobgate-scheduler")
        units.update(dict.fromkeys(self.databases, "postgresql"))
        units.update(dict.fromkeys(self.workers, "jobgate-worker"))
        return units


TOPOLOGIES = {
    "default": Topology("default", INVENTORY, (SCHEDULER,), WORKERS),
    # Several schedulers on one database (high availability).
    "ha": Topology(
        "ha",
        INVENTORY.with_name("ha.ini"),
        ("scheduler-1", "scheduler-2"),
        WORKERS,
        databases=("database",),
        virtual_address="198.18.0.10",
    ),
}
HOST_PROGRAMS = (
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


def missing_requirements() -> list[str]:
    """What this machine lacks to boot a lab; empty when it has it all."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, mounts, cgroups)")
    programs = [p for p in HOST_PROGRAMS if shutil.which(p) is None]
    if programs:
        missing.append(
            f"the programs {', '.join(programs)} ('make appliance-deps' installs them)"
        )
    if not (
        "overlay" in Path("/proc/filesystems").read_text()
        or Path("/sys/module/overlay").exists()
        or shutil.which("modprobe") is not None
    ):
        missing.append("overlayfs in the kernel")
    if not cgroup_roots():
        missing.append("a cgroup hierarchy to put nodes in")
    if tools_bin() is None:
        missing.append("ansible-playbook ('make appliance-deps' installs it)")
    return missing


def tools_bin() -> Path | None:
    """The directory of ansible-playbook (and ansible-lint), if installed."""
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


def tools_env(tools: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{tools}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_CONFIG"] = str(ANSIBLE_DIR / "ansible.cfg")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env.pop("ANSIBLE_CALLBACKS_ENABLED", None)
    return env


@dataclass
class PlaybookRun:
    returncode: int
    stdout: str
    duration: float
    log: Path


class Cluster:
    """The working directory of one lab, and what is done with it."""

    def __init__(self, directory: Path, log=print, topology: str | None = None):
        """The lab of ``directory``.

        ``topology`` (a key of TOPOLOGIES): the one to boot; None, the one
        the directory's lab was booted for (``default`` if none was).
        """
        self.dir = Path(directory).resolve()
        self.log = log
        self.state_file = self.dir / "state.json"
        self.key = self.dir / "id_ed25519"
        self.pki = self.dir / "pki"
        self.vars_file = self.dir / "extra-vars.json"
        self.port_file = self.dir / "api.port"
        self.nodes_dir = self.dir / "nodes"
        self.topology_file = self.dir / "topology"
        booted = None
        if self.topology_file.exists():
            booted = self.topology_file.read_text().strip()
        if topology is None:
            topology = booted or "default"
        elif booted and booted != topology and self.state_file.exists():
            raise LabError(
                f"the lab in {self.dir} is up as the {booted!r} topology, not "
                f"{topology!r}: take it down first (python -m lab --dir "
                f"{self.dir} down), or use another --dir"
            )
        if topology not in TOPOLOGIES:
            raise LabError(
                f"no lab topology {topology!r}; there are {', '.join(TOPOLOGIES)}"
            )
        self.topology = TOPOLOGIES[topology]

    @property
    def scheduler(self) -> str:
        """The first scheduler's node."""
        return self.topology.schedulers[0]

    def api_address(self, lab: Lab) -> str:
        """Where the API is forwarded to: the virtual address, or the scheduler."""
        return self.topology.virtual_address or lab.nodes[self.scheduler].address

    # -- set-up ----------------------------------------------------------------

    def prepare(self, debs: Path | None = None, scripts: Path | None = None) -> None:
        """The SSH key (made once) and the variables site.yml runs with.

        ``debs`` and ``scripts`` not given: those of the last run, else
        ``dist/deb`` and ``examples/scripts``.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "jobgate-lab"]
                + ["-f", str(self.key)],
                check=True,
            )
        last = {}
        if self.vars_file.exists():
            last = json.loads(self.vars_file.read_text())
        debs = Path(debs or last.get("common_packages_dir") or DEBS).resolve()
        scripts = Path(scripts or last.get("worker_scripts_src") or SCRIPTS)
        if not list(debs.glob("jobgate_*.deb")):
            raise LabError(f"no jobgate_*.deb in {debs}; 'make deb' builds them")
        extra_vars = {
            "common_pki_local_dir": str(self.pki),
            "common_packages_dir": str(debs),
            "worker_scripts_src": str(scripts.resolve()),
        }
        self.vars_file.write_text(json.dumps(extra_vars, indent=2) + "\n")
        self.topology_file.write_text(self.topology.name + "\n")

    def boot(self, spare: tuple[str, ...] = ()) -> Lab:
        """Boot the inventory's nodes (and ``spare`` ones); the state is saved."""
        if self.state_file.exists():
            raise LabError(f"a lab is already up in {self.dir}")
        if self.nodes_dir.exists():
            # What a lab taken down with JOBGATE_APPLIANCE_KEEP=1 left behind.
            shutil.rmtree(self.nodes_dir)
        lab = Lab(
            [*self.topology.nodes, *spare],
            ssh_public_key=Path(f"{self.key}.pub").read_text(),
            log=self.log,
            directory=self.nodes_dir,
            packages=self.topology.packages(),
            capabilities=self.topology.capabilities(),
        )
        t0 = time.monotonic()
        try:
            lab.start()
            lab.save(self.state_file)
        except BaseException:
            lab.close()
            raise
        self.log(f"{len(lab.nodes)} nodes booted in {time.monotonic() - t0:.0f}s")
        return lab

    def load(self) -> Lab | None:
        """The lab that is up in this directory, if any."""
        if not self.state_file.exists():
            return None
        return Lab.load(self.state_file, log=self.log)

    def save(self, lab: Lab) -> None:
        lab.save(self.state_file)

    # -- Ansible ---------------------------------------------------------------

    def playbook(self, lab: Lab, *extra: str, echo: bool = False) -> PlaybookRun:
        """Run ``ansible-playbook site.yml`` against the lab, from its network.

        The output goes to ``playbook-N.log`` and, with ``echo``, to stdout
        as it comes.
        """
        tools = tools_bin()
        if tools is None:
            raise LabError("ansible-playbook not found; 'make appliance-deps'")
        number = len(list(self.dir.glob("playbook-*.log"))) + 1
        log_path = self.dir / f"playbook-{number}.log"
        cmd = lab.in_netns(
            str(tools / "ansible-playbook"),
            "-i",
            str(self.topology.inventory),
            "--private-key",
            str(self.key),
            "-e",
            f"@{self.vars_file}",
            *extra,
            str(ANSIBLE_DIR / "site.yml"),
        )
        env = tools_env(tools)
        # SSH connections are shared per host address; another lab with the
        # same addresses (a parallel run) must not get this one's.
        env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = str(self.dir / "cp")
        env["ANSIBLE_LOCAL_TEMP"] = str(self.dir / "tmp")
        t0 = time.monotonic()
        lines = []
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                cmd,
                cwd=ANSIBLE_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                log_file.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            returncode = proc.wait()
        return PlaybookRun(returncode, "".join(lines), time.monotonic() - t0, log_path)

    def runs(self) -> list[PlaybookRun]:
        """The runs of site.yml so far, from their logs (duration unknown: 0)."""
        logs = sorted(
            self.dir.glob("playbook-*.log"), key=lambda p: int(p.stem.split("-")[1])
        )
        return [PlaybookRun(0, p.read_text(), 0.0, p) for p in logs]

    # -- the API from the machine -------------------------------------------------

    def forward(self, lab: Lab, port: int) -> int:
        """Forward 127.0.0.1:``port`` (0: any) to the API; the port in use.

        The socket is made here, so that a port in use is reported at once,
        and handed to the forwarder, which outlives this process.
        """
        listener = socket.create_server(("127.0.0.1", port))
        try:
            port = listener.getsockname()[1]
            fd = listener.fileno()
            cmd = [
                sys.executable,
                "-m",
                "lab.forward",
                "--netns",
                lab.netns_path(),
                "--listen-fd",
                str(fd),
                "--to",
                f"{self.api_address(lab)}:{HTTP_PORT}",
            ]
            lab.start_helper(
                "forward", cmd, self.dir / "forward.log", pass_fds=(fd,), cwd=REPO
            )
        finally:
            listener.close()
        self.port_file.write_text(f"{port}\n")
        self.save(lab)
        return port

    def forwarded_port(self, lab: Lab) -> int | None:
        """The forwarded port, if its forwarder still runs."""
        pid = lab.helpers.get("forward")
        if not pid or not lab.owns(pid) or not self.port_file.exists():
            return None
        return int(self.port_file.read_text())

    # -- teardown ----------------------------------------------------------------

    def down(self) -> bool:
        """Stop and remove the lab of this directory; False if there was none."""
        lab = self.load()
        if lab is None:
            return False
        lab.close()
        self.state_file.unlink(missing_ok=True)
        self.port_file.unlink(missing_ok=True)
        return True

    # -- for people --------------------------------------------------------------

    def howto(self, lab: Lab, port: int | None) -> str:
        """How to reach the API and the nodes, as printed by ``make lab``."""

        def rel(path: Path) -> str:
            try:
                return str(path.relative_to(Path.cwd()))
            except ValueError:
                return str(path)

        ca = rel(self.pki / "ca.pem")
        python = rel(Path(sys.executable))
        if shutil.which("python3") == sys.executable:
            python = "python3"
        me = f"{python} -m lab --dir {rel(self.dir)}"
        nodes = ", ".join(f"{n.name} {n.address}" for n in lab.nodes.values())
        out = [f"The jobgate lab is up: {nodes} (network namespace {lab.netns})."]
        if port:
            url = f"https://127.0.0.1:{port}"
            out += [
                "",
                f"API    {url}  (forwarded to {self.api_address(lab)}:"
                f"{HTTP_PORT} in the lab)",
                f"token  {LAB_TOKEN}",
                f"CA     {ca}",
                "",
                f'  curl --cacert {ca} -H "Authorization: Bearer {LAB_TOKEN}" '
                f"{url}/v1/workers",
                f"  export JOBGATE_URL={url} JOBGATE_TOKEN={LAB_TOKEN} "
                f"JOBGATE_CA_FILE={self.pki / 'ca.pem'}",
                "  .venv/bin/jobgate workers",
                "  .venv/bin/jobgate run worker-1 count.sh --follow",
            ]
            if self.topology.virtual_address:
                out.append(
                    f"  {self.topology.virtual_address} is the schedulers' virtual "
                    "address (keepalived): it moves to another when one stops"
                )
            for other in self.topology.schedulers:
                out.append(
                    f"  the scheduler {other} serves the API at "
                    f"https://{lab.nodes[other].address}:{HTTP_PORT} in the lab"
                )
        else:
            out += ["", "The API is not forwarded (the forwarder is not running)."]
        example = lab.nodes[self.topology.workers[0]]
        unit = "jobgate-worker"
        out += [
            "",
            "On the nodes (as root):",
            f"  {me} shell {example.name}        # a shell",
            f"  {me} journal {example.name} -u {unit} -f",
            f"  nsenter -t {example.leader} -a journalctl -u {unit}   "
            "# the same by hand (the node's PID 1)",
            f"  ip netns exec {lab.netns} ssh -i {rel(self.key)} "
            f"root@{example.address}",
            "",
        ]
        make = "lab" if self.topology.name == "default" else f"lab-{self.topology.name}"
        out += [
            f"make {make:{len(make) + 8}} provisions again (site.yml)",
            f"make {make + '-status':{len(make) + 8}} what runs",
            f"make {make + '-down':{len(make) + 8}} stops and removes it all",
        ]
        return "\n".join(out)

    def node_command(self, lab: Lab, name: str, *cmd: str) -> list[str]:
        """``cmd`` run on node ``name``, as a command line for the machine."""
        node = lab.nodes.get(name)
        if node is None:
            raise LabError(f"no node {name!r}; the nodes: {', '.join(lab.nodes)}")
        return ["nsenter", "-t", str(node.leader), "-a", *cmd]
