"""A lab of real systemd hosts, for the appliance tests and for ``make lab``.

Each node is a Debian root booted with ``systemd-nspawn --boot``: systemd runs
as PID 1 in it, so units, ``sd_notify``, the journal and ``systemctl`` behave
as on a real host. The nodes share one read-only Debian root (made with
``debootstrap`` and cached as a tarball between runs) through overlayfs, each
with its own writable upper layer, machine-id, SSH host keys and cgroup.

Networking: a network namespace made for the run holds a bridge with the
lab's first address (``198.18.0.1/24``); each node has its own network
namespace with one end of a veth pair, the other end on the bridge. There is
no default route anywhere, so nothing can leave the lab. Ansible runs inside
the lab namespace (``nsenter --net``) and reaches the nodes over SSH with a
key made for the run; the test process reaches the nodes through sockets it
creates inside the lab namespace (:func:`Lab.connect`).

Everything started is recorded by PID and stopped by PID in :meth:`Lab.close`,
which also unmounts, deletes the namespaces and cgroups, and removes the run
directory (set ``JOBGATE_APPLIANCE_KEEP=1`` to keep the directory for a look
after a failure). The nodes outlive the process that booted them:
:meth:`Lab.save` writes what :meth:`Lab.close` needs into a JSON file, and
:meth:`Lab.load` takes the lab over from it in another process. A PID is only
ever signalled while ``/proc/PID/cgroup`` shows it in the lab's own cgroup, so
a PID reused by something else is left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import ipaddress
import json
import os
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
# What every node has before Ansible touches it: systemd as PID 1, SSH for
# Ansible, python3 and python3-apt for Ansible's modules (without python3-apt
# the apt module tries to install it and hangs without a network).
BASE_PACKAGES = (
    "dbus",
    "iproute2",
    "libpam-systemd",
    "openssh-server",
    "procps",
    "python3",
    "python3-apt",
    "systemd",
    "systemd-sysv",
)
# Bump when customise_base() changes, so cached tarballs are rebuilt.
IMAGE_REVISION = "1"

SUBNET = ipaddress.ip_network("198.18.0.0/24")
BRIDGE_ADDRESS = "198.18.0.1"

CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}

CLONE_NEWNET = 0x40000000


class LabError(Exception):
    """The lab could not be set up; the message says what failed."""


def run(cmd, *, check: bool = True, timeout: float = 120, **kw):
    """Run a host command, text mode, output captured; raise with its output."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    res = subprocess.run([str(c) for c in cmd], timeout=timeout, check=False, **kw)
    if check and res.returncode != 0:
        raise LabError(
            f"{shlex.join(str(c) for c in cmd)} exited {res.returncode}:\n"
            f"{res.stdout or ''}{res.stderr or ''}"
        )
    return res


def cache_dir() -> Path:
    """Where the debootstrap tarball is kept between runs (outside the repo)."""
    env = os.environ.get("JOBGATE_APPLIANCE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "jobgate-appliance"


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian mirror this machine's apt already uses for ``suite``."""
    env = os.environ.get("JOBGATE_APPLIANCE_MIRROR")
    if env:
        return env
    candidates: list[tuple[str, list[str]]] = []
    one_line = [Path("/etc/apt/sources.list")]
    one_line += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for path in one_line:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) >= 3 and words[0] == "deb":
                    words = [w for w in words[1:] if not w.startswith("[")]
                    if len(words) >= 2:
                        candidates.append((words[0], [words[1]]))
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in path.read_text().split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    key, sep, value = line.partition(":")
                    if sep and not line.startswith((" ", "#")):
                        fields[key.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split():
                    for uri in fields.get("uris", "").split():
                        candidates.append((uri, fields.get("suites", "").split()))
    for uri, suites in candidates:
        if suite in suites:
            return uri
    raise LabError(
        f"no apt source for {suite!r} on this machine; "
        "set JOBGATE_APPLIANCE_MIRROR to a Debian mirror"
    )


def mask_units(root: Path, *units: str) -> None:
    """Mask systemd ``units`` in the root file system at ``root``."""
    masked = root / "etc/systemd/system"
    for unit in units:
        link = masked / unit
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to("/dev/null")


def customise_base(root: Path) -> None:
    """Make a fresh debootstrap root fit to be shared by several nodes."""
    # Each node gets its own machine-id and SSH host keys.
    (root / "etc/machine-id").write_text("")
    with contextlib.suppress(FileNotFoundError):
        (root / "var/lib/dbus/machine-id").unlink()
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # Nothing in a node may reach for the network on its own, nor hold the
    # dpkg lock while Ansible installs packages; no getty on the pipe console.
    mask_units(
        root,
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
        "console-getty.service",
    )
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/lab.conf").write_text(
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
    )
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def image_key(extra: tuple[str, ...] = ()) -> str:
    """The cache key of a root with BASE_PACKAGES and ``extra`` packages.

    The root of BASE_PACKAGES alone keeps the key it always had, so that a
    cached tarball stays valid when images with more packages are added.
    """
    packages = sorted(set(BASE_PACKAGES) | set(extra))
    return hashlib.sha256(
        repr((SUITE, "minbase", packages, IMAGE_REVISION)).encode()
    ).hexdigest()[:12]


def base_tarball(log=print, extra: tuple[str, ...] = ()) -> Path:
    """The cached Debian root tarball, made with debootstrap if missing.

    ``extra``: packages some nodes need beyond BASE_PACKAGES (the database
    node's PostgreSQL server); they make a tarball of their own, so that the
    other nodes' root stays as it was. They are installed as apt installs
    them on any host (the server's cluster made and enabled), and Ansible
    finds them there, as it would on a second run: the nodes have no network
    to install from.

    The tarball's name carries a hash of everything that goes into it, and it
    is only ever read, so one made by an earlier run is safe to reuse. A lock
    keeps two runs from building it at the same time; it is renamed into
    place only once complete.
    """
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    key = image_key(extra)
    tarball = directory / f"rootfs-{SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
        try:
            root = work / "root"
            mirror = apt_mirror()
            log(f"debootstrap {SUITE} from {mirror} (cached afterwards)")
            t0 = time.monotonic()
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=" + ",".join(sorted(set(BASE_PACKAGES) | set(extra))),
                    SUITE,
                    root,
                    mirror,
                ],
                timeout=900,
            )
            customise_base(root)
            partial = work / "rootfs.tar"
            run(
                ["tar", "-C", root, "--numeric-owner", "-cf", partial, "."], timeout=300
            )
            os.replace(partial, tarball)
            log(f"base root ready in {time.monotonic() - t0:.0f}s: {tarball}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tarball


def node_address(index: int) -> str:
    """The address of a lab's node ``index`` (0: the first), 198.18.0.11 on."""
    return str(SUBNET.network_address + 11 + index)


def cgroup_roots() -> list[Path]:
    """The cgroup hierarchies a node must get its own cgroup in."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():  # pure cgroup v2
        return [base]
    return [base / h for h in ("systemd", "unified") if (base / h).is_dir()]


@dataclass
class Node:
    """One booted systemd host."""

    name: str
    address: str
    root: Path  # the merged overlay, the node's /
    netns: str
    nspawn: subprocess.Popen | None = None
    nspawn_pid: int = 0  # systemd-nspawn's PID, also when another process started it
    leader: int = 0  # the node's PID 1, as seen from the host
    cgroups: list[Path] = field(default_factory=list)
    console: Path | None = None

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw):
        """Run ``cmd`` inside the node (all its namespaces), as root."""
        if not self.leader:
            raise LabError(f"{self.name} is not running")
        return run(
            ["nsenter", "-t", str(self.leader), "-a", *cmd],
            check=check,
            timeout=timeout,
            env=CLEAN_ENV,
            **kw,
        )

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120):
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def journal(self, *args: str) -> str:
        return self.run(
            "journalctl", "--no-pager", "-o", "cat", *args, check=False
        ).stdout

    def unit_property(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()


class Lab:
    """Nodes on a private bridge; a context manager that always cleans up."""

    def __init__(
        self,
        names: list[str],
        *,
        ssh_public_key: str,
        log=print,
        directory: Path | None = None,
        packages: dict[str, tuple[str, ...]] | None = None,
        capabilities: dict[str, tuple[str, ...]] | None = None,
    ):
        """Nodes ``names`` (not booted yet), in ``directory`` or a new temporary one.

        ``directory`` must not exist or be empty: it gets the nodes' roots.
        ``packages``: node name -> Debian packages its root has beyond
        BASE_PACKAGES (see :func:`base_tarball`).
        """
        self.names = names
        self.packages = {n: tuple(p) for n, p in (packages or {}).items() if p}
        # Node name -> capabilities its root keeps beyond nspawn's default
        # set, e.g. CAP_NET_ADMIN for keepalived to add an address to its
        # interface (each node has a network namespace of its own).
        self.capabilities = {n: tuple(c) for n, c in (capabilities or {}).items()}
        self.ssh_public_key = ssh_public_key
        self.log = log
        self.id = secrets.token_hex(3)
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix=f"jobgate-lab-{self.id}-"))
        else:
            self.dir = Path(directory).resolve()
            self.dir.mkdir(parents=True, exist_ok=True)
            if any(self.dir.iterdir()):
                raise LabError(f"{self.dir} is not empty")
        self.netns = f"jglab-{self.id}"
        self.nodes: dict[str, Node] = {}
        self._netns_made: list[str] = []
        self._mounts: list[Path] = []
        self._cgroup_parents: list[Path] = []
        # Other processes of the lab (the port forwarder): name -> PID.
        self.helpers: dict[str, int] = {}
        for i, name in enumerate(names):
            self.nodes[name] = Node(
                name=name,
                address=node_address(i),
                root=self.dir / "nodes" / name / "merged",
                netns=f"jglab-{self.id}-{i}",
            )

    # -- context manager -----------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- set-up ----------------------------------------------------------------

    def start(self) -> None:
        lowers: dict[tuple[str, ...], Path] = {}
        for node in self.nodes.values():
            extra = self.packages.get(node.name, ())
            if extra in lowers:
                continue
            tarball = base_tarball(self.log, extra)
            # The root of BASE_PACKAGES alone is "rootfs", as it always was.
            lower = self.dir / ("rootfs-" + image_key(extra) if extra else "rootfs")
            lower.mkdir()
            run(["tar", "-C", lower, "--numeric-owner", "-xf", tarball], timeout=300)
            lowers[extra] = lower
        self._make_network()
        for node in self.nodes.values():
            self._prepare_root(node, lowers[self.packages.get(node.name, ())])
        for node in self.nodes.values():
            self._boot(node)
        for node in self.nodes.values():
            self._wait_booted(node)

    def _ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self._netns_made.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _make_network(self) -> None:
        self._ns(self.netns)
        ip = ["ip", "-n", self.netns]
        run([*ip, "link", "add", "br0", "type", "bridge"])
        run([*ip, "addr", "add", f"{BRIDGE_ADDRESS}/{SUBNET.prefixlen}", "dev", "br0"])
        run([*ip, "link", "set", "br0", "up"])
        for i, node in enumerate(self.nodes.values()):
            self._ns(node.netns)
            veth = f"veth{i}"
            run(
                [
                    *ip,
                    "link",
                    "add",
                    veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    node.netns,
                ]
            )
            run([*ip, "link", "set", veth, "master", "br0", "up"])
            run(
                [
                    "ip",
                    "-n",
                    node.netns,
                    "addr",
                    "add",
                    f"{node.address}/{SUBNET.prefixlen}",
                    "dev",
                    "eth0",
                ]
            )
            run(["ip", "-n", node.netns, "link", "set", "eth0", "up"])
            # Deliberately no default route: the lab cannot reach anything else.

    def _prepare_root(self, node: Node, lower: Path) -> None:
        base = node.root.parent
        for d in ("upper", "work", "merged"):
            (base / d).mkdir(parents=True)
        run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={lower},upperdir={base / 'upper'},workdir={base / 'work'}",
                node.root,
            ]
        )
        self._mounts.append(node.root)
        r = node.root
        (r / "etc/hostname").write_text(node.name + "\n")
        hosts = ["127.0.0.1 localhost", f"127.0.1.1 {node.name}"]
        hosts += [f"{n.address} {n.name}" for n in self.nodes.values()]
        (r / "etc/hosts").write_text("\n".join(hosts) + "\n")
        (r / "etc/machine-id").write_text(run(["systemd-id128", "new"]).stdout)
        run(["ssh-keygen", "-q", "-A", "-f", r])
        ssh = r / "root/.ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh / "authorized_keys").write_text(self.ssh_public_key.strip() + "\n")
        os.chmod(ssh / "authorized_keys", 0o600)

    def _boot(self, node: Node) -> None:
        procs = []
        for hierarchy in cgroup_roots():
            parent = hierarchy / f"jglab-{self.id}"
            parent.mkdir(exist_ok=True)
            if parent not in self._cgroup_parents:
                self._cgroup_parents.append(parent)
            cg = parent / node.name
            cg.mkdir()
            node.cgroups.append(cg)
            procs.append(str(cg / "cgroup.procs"))
        # Each node needs a cgroup of its own (its units would collide with
        # another node's otherwise); the shell moves itself there, then execs.
        script = 'for p in "$@"; do echo $$ > "$p"; done; exec ' + shlex.join(
            [
                "systemd-nspawn",
                "--quiet",
                f"--directory={node.root}",
                "--boot",
                f"--machine={node.name}",
                "--console=pipe",
                "--register=no",
                "--keep-unit",
                f"--network-namespace-path=/run/netns/{node.netns}",
                *(f"--capability={c}" for c in self.capabilities.get(node.name, ())),
            ]
        )
        node.console = self.dir / f"{node.name}.console"
        with open(node.console, "wb") as out:
            node.nspawn = subprocess.Popen(
                ["sh", "-c", script, "sh", *procs],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=CLEAN_ENV,
            )
        node.nspawn_pid = node.nspawn.pid
        deadline = time.monotonic() + 20
        children = Path(f"/proc/{node.nspawn.pid}/task/{node.nspawn.pid}/children")
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                for kid in children.read_text().split():
                    if _is_namespace_init(int(kid)):
                        node.leader = int(kid)
                        return
            if node.nspawn.poll() is not None:
                break
            time.sleep(0.05)
        raise LabError(f"{node.name} did not boot:\n{self.console_text(node)}")

    def _wait_booted(self, node: Node) -> None:
        deadline = time.monotonic() + 90
        state = ""
        while time.monotonic() < deadline:
            res = node.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=90
            )
            state = (res.stdout + res.stderr).strip()
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = node.systemctl("--failed", "--plain", check=False)
                    self.log(f"{node.name} is degraded:\n{failed.stdout}")
                return
            if "bus" not in state and state not in ("initializing", "starting"):
                break
            time.sleep(0.1)
        raise LabError(
            f"{node.name} did not finish booting ({state!r}):\n"
            f"{self.console_text(node)}"
        )

    def console_text(self, node: Node, tail: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return node.console.read_text(errors="replace")[-tail:]
        return ""

    # -- use -------------------------------------------------------------------

    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    def in_netns(self, *cmd: str) -> list[str]:
        """``cmd`` wrapped to run in the lab network (for Ansible)."""
        return ["nsenter", f"--net={self.netns_path()}", *cmd]

    def connect(self, address: str, port: int, timeout: float = 10) -> socket.socket:
        """A TCP connection to ``address:port`` made inside the lab network.

        A thread joins the lab's network namespace (namespaces are per
        thread), makes the socket, and ends; the socket stays in the lab.
        """
        result: dict = {}

        def make() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(self.netns_path(), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    result["error"] = OSError(err, os.strerror(err))
                    return
                result["sock"] = socket.create_connection((address, port), timeout)
            except OSError as exc:
                result["error"] = exc
            finally:
                os.close(fd)

        t = threading.Thread(target=make, name="lab-netns-connect")
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]
        return result["sock"]

    # -- another process takes over ------------------------------------------

    def state(self) -> dict:
        """What another process needs to use and to tear down this lab."""
        return {
            "id": self.id,
            "dir": str(self.dir),
            "netns": self.netns,
            "netns_made": self._netns_made,
            "mounts": [str(m) for m in self._mounts],
            "cgroup_parents": [str(c) for c in self._cgroup_parents],
            "helpers": self.helpers,
            "nodes": {
                n.name: {
                    "address": n.address,
                    "root": str(n.root),
                    "netns": n.netns,
                    "nspawn_pid": n.nspawn_pid,
                    "leader": n.leader,
                    "cgroups": [str(c) for c in n.cgroups],
                    "console": str(n.console) if n.console else None,
                }
                for n in self.nodes.values()
            },
        }

    def save(self, path: Path) -> None:
        """Write :meth:`state` to ``path``, atomically."""
        partial = Path(f"{path}.partial")
        partial.write_text(json.dumps(self.state(), indent=2) + "\n")
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path, log=print) -> Lab:
        """The lab described by a file :meth:`save` wrote."""
        state = json.loads(Path(path).read_text())
        lab = cls.__new__(cls)
        lab.names = list(state["nodes"])
        lab.ssh_public_key = ""
        lab.packages = {}
        lab.capabilities = {}
        lab.log = log
        lab.id = state["id"]
        lab.dir = Path(state["dir"])
        lab.netns = state["netns"]
        lab._netns_made = list(state["netns_made"])
        lab._mounts = [Path(m) for m in state["mounts"]]
        lab._cgroup_parents = [Path(c) for c in state["cgroup_parents"]]
        lab.helpers = {k: int(v) for k, v in state.get("helpers", {}).items()}
        lab.nodes = {}
        for name, n in state["nodes"].items():
            lab.nodes[name] = Node(
                name=name,
                address=n["address"],
                root=Path(n["root"]),
                netns=n["netns"],
                nspawn_pid=n["nspawn_pid"],
                leader=n["leader"],
                cgroups=[Path(c) for c in n["cgroups"]],
                console=Path(n["console"]) if n["console"] else None,
            )
        return lab

    def running(self) -> dict[str, bool]:
        """Node name -> whether its PID 1 is still a process of this lab."""
        return {
            n.name: bool(n.leader) and self.owns(n.leader) for n in self.nodes.values()
        }

    def start_helper(self, name: str, cmd: list[str], log_file: Path, **popen) -> int:
        """Start ``cmd`` detached, in a cgroup of the lab; its PID is kept.

        ``popen`` goes to :class:`subprocess.Popen` (``pass_fds``, ``cwd``).
        """
        parent = self._cgroup_parents[0]
        cg = parent / f"helper-{name}"
        cg.mkdir(exist_ok=True)
        script = 'echo $$ > "$1"; shift; exec "$@"'
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                ["sh", "-c", script, "sh", str(cg / "cgroup.procs"), *cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **popen,
            )
        self.helpers[name] = proc.pid
        return proc.pid

    def stop_helper(self, name: str) -> None:
        pid = self.helpers.pop(name, 0)
        if pid and self.owns(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_pid(pid, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_pid(pid, 10)

    # -- teardown --------------------------------------------------------------

    def close(self) -> None:
        for name in list(self.helpers):
            self.stop_helper(name)
        for node in self.nodes.values():
            self._stop(node)
        for mount in reversed(self._mounts):
            if run(["umount", mount], check=False).returncode != 0:
                run(["umount", "-l", mount], check=False)
        self._mounts.clear()
        for name in reversed(self._netns_made):
            run(["ip", "netns", "del", name], check=False)
        self._netns_made.clear()
        for node in self.nodes.values():
            for cg in node.cgroups:
                _rmdir_tree(cg)
            node.cgroups.clear()
        for parent in self._cgroup_parents:
            _rmdir_tree(parent)
        self._cgroup_parents.clear()
        if os.environ.get("JOBGATE_APPLIANCE_KEEP") == "1":
            self.log(f"kept the lab directory {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _stop(self, node: Node) -> None:
        proc = node.nspawn
        if proc is not None:
            if proc.poll() is None:
                # nspawn turns SIGTERM into an orderly poweroff of the node.
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    if node.leader and self.owns(node.leader):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(node.leader, signal.SIGKILL)
                    proc.kill()
                    proc.wait(timeout=30)
        elif node.nspawn_pid and self.owns(node.nspawn_pid):
            # Started by another process: not ours to reap, but to wait for.
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.nspawn_pid, signal.SIGTERM)
            if not _wait_pid(node.nspawn_pid, 30):
                if node.leader and self.owns(node.leader):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(node.leader, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.nspawn_pid, signal.SIGKILL)
                _wait_pid(node.nspawn_pid, 30)
        if node.leader and self.owns(node.leader):
            # Killing the node's PID 1 ends every process of its PID namespace.
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.leader, signal.SIGKILL)
            _wait_pid(node.leader, 30)
        node.leader = 0
        node.nspawn = None
        node.nspawn_pid = 0

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is still a process of this lab (not a reused PID)."""
        try:
            return f"/jglab-{self.id}/" in Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return False


def _wait_pid(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has ended; False if it still runs after ``timeout``.

    A pidfd becomes readable when the process ends, whoever its parent is.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def _is_namespace_init(pid: int) -> bool:
    """Whether ``pid`` is PID 1 of a PID namespace of its own (a node's init).

    nspawn forks short-lived helpers too; only the container's init has a
    PID of 1 in its own namespace.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) > 1 and ids[-1] == "1"
    return False


def _rmdir_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted(
        (p for p in path.rglob("*") if p.is_dir()),
        key=lambda p: len(p.parts),
        reverse=True,
    ):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()
