"""The Vagrant lab, proven: a Debian 12 libvirt box and a real ``vagrant up``.

    python -m lab.vagrant box    # make vagrant-box: build and `vagrant box add` it
    python -m lab.vagrant test   # make test-vagrant: vagrant up, check, destroy

``box`` builds the box from Debian packages alone (nothing is downloaded but
from the apt mirror the machine already uses): ``debootstrap`` into an ext4
file system inside a raw disk image, Debian's cloud kernel, ``extlinux`` as
the boot loader, systemd-networkd with DHCP on the first interface, and a
``vagrant`` user with password-less sudo and Vagrant's well-known insecure
key (which ``vagrant up`` replaces by a key of its own on first boot). The
image is converted to qcow2 and packed with the ``metadata.json`` the libvirt
provider reads, then added under the name the ``Vagrantfile`` uses.

``test`` makes a network namespace with nothing in it but its loopback, and
runs libvirtd, the VMs, their networks and ``vagrant`` itself in there, in a
mount namespace where ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``
and ``/var/log/libvirt`` are directories of the run: the machine's own
network, libvirt configuration and images are never touched. The VMs run
under software emulation (``JOBGATE_VAGRANT_DRIVER=qemu``) where KVM is not
usable. With no route out of the namespace, nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.nodes import LabError, apt_mirror, mask_units, run

REPO = Path(__file__).resolve().parents[1]
BOX_NAME = "debian/bookworm64"  # config.vm.box in the Vagrantfile
SUITE = "bookworm"
DISK_GIB = 8
PART_OFFSET = 1024 * 1024  # the root partition starts at 1 MiB
BOX_PACKAGES = (
    "dbus",
    "e2fsprogs",
    "iproute2",
    "kmod",
    "libpam-systemd",
    "linux-image-cloud-amd64",
    "openssh-server",
    "procps",
    "python3",
    "python3-apt",
    "sudo",
    "systemd",
    "systemd-sysv",
    "udev",
)
VAGRANT_GEMS = Path("/usr/share/rubygems-integration/all/gems")
# What the Vagrantfile's header comment promises: the API over HTTPS.
SCHEDULER_URL = "https://192.168.56.10:8080"
# The lab token the Vagrantfile gives the scheduler, published there.
LAB_TOKEN = "lab-token-0123456789abcdef"  # noqa: S105
CA_FILE = REPO / "ansible/inventories/vagrant/pki/vagrant/ca.pem"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def insecure_public_key() -> str:
    """Vagrant's well-known insecure public key, from the installed vagrant."""
    for path in sorted(VAGRANT_GEMS.glob("vagrant-*/keys/vagrant.pub")):
        return path.read_text().strip()
    raise LabError("vagrant's keys/vagrant.pub not found; run 'make vagrant-deps'")


# -- the box ------------------------------------------------------------------------


def build_box(out: Path) -> Path:
    """Build the libvirt box file ``out`` (a tar of box.img and metadata.json)."""
    work = Path(tempfile.mkdtemp(prefix="jobgate-box-", dir=out.parent))
    loop = ""
    mnt = work / "mnt"
    mounted: list[Path] = []
    try:
        raw = work / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(DISK_GIB * 1024**3)
        # One bootable Linux partition from 1 MiB to the end.
        run(["sfdisk", "-q", raw], input="label: dos\nstart=2048, type=83, bootable\n")
        size = DISK_GIB * 1024**3 - PART_OFFSET
        loop = run(
            [
                "losetup",
                "--find",
                "--show",
                f"--offset={PART_OFFSET}",
                f"--sizelimit={size}",
                raw,
            ]
        ).stdout.strip()
        # extlinux reads ext4, but not its 64bit and metadata_csum features.
        run(["mkfs.ext4", "-q", "-O", "^64bit,^metadata_csum", "-L", "root", loop])
        uuid = run(["blkid", "-s", "UUID", "-o", "value", loop]).stdout.strip()
        mnt.mkdir()
        run(["mount", loop, mnt])
        mounted.append(mnt)
        mirror = apt_mirror(SUITE)
        log(f"debootstrap {SUITE} with a kernel into the box's disk, from {mirror}")
        run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=" + ",".join(BOX_PACKAGES),
                SUITE,
                mnt,
                mirror,
            ],
            timeout=1800,
        )
        customise(mnt, uuid)
        log("installing extlinux")
        (mnt / "boot/extlinux").mkdir(parents=True, exist_ok=True)
        run(["extlinux", "--install", mnt / "boot/extlinux"])
        run(["umount", mnt])
        mounted.remove(mnt)
        run(["losetup", "-d", loop])
        loop = ""
        mbr = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()
        with open(raw, "r+b") as f:
            f.write(mbr[:440])  # the boot code only, not the partition table
        log("converting to qcow2")
        box_dir = work / "box"
        box_dir.mkdir()
        run(
            ["qemu-img", "convert", "-O", "qcow2", raw, box_dir / "box.img"],
            timeout=900,
        )
        raw.unlink()
        (box_dir / "metadata.json").write_text(
            json.dumps(
                {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GIB}
            )
            + "\n"
        )
        (box_dir / "Vagrantfile").write_text(
            "# A Debian 12 box for vagrant-libvirt, made by `make vagrant-box`.\n"
            'Vagrant.configure("2") do |config|\n'
            "  config.vm.provider :libvirt do |libvirt|\n"
            '    libvirt.disk_bus = "virtio"\n'
            "  end\n"
            "end\n"
        )
        partial = out.with_suffix(".partial")
        run(["tar", "-C", box_dir, "-cf", partial, "."], timeout=900)
        os.replace(partial, out)
        return out
    finally:
        for m in reversed(mounted):
            run(["umount", "-R", m], check=False)
        if loop:
            run(["losetup", "-d", loop], check=False)
        shutil.rmtree(work, ignore_errors=True)


def customise(root: Path, uuid: str) -> None:
    """The box's own configuration: boot, network, the vagrant user."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise LabError("debootstrap installed no kernel")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    (root / "boot/extlinux").mkdir(parents=True, exist_ok=True)
    (root / "boot/extlinux/extlinux.conf").write_text(
        "DEFAULT debian\nTIMEOUT 1\nPROMPT 0\n"
        "LABEL debian\n"
        f"  LINUX /boot/vmlinuz-{version}\n"
        f"  INITRD /boot/initrd.img-{version}\n"
        f"  APPEND root=UUID={uuid} ro console=ttyS0 net.ifnames=0 quiet\n"
    )
    (root / "etc/fstab").write_text(f"UUID={uuid} / ext4 errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("bookworm\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 bookworm\n")
    # Every VM made from the box gets a machine-id of its own on first boot.
    (root / "etc/machine-id").write_text("uninitialized\n")
    with contextlib.suppress(FileNotFoundError):
        (root / "var/lib/dbus/machine-id").unlink()
    # The management interface (eth0) takes DHCP; Vagrant writes the files
    # of the private network's interfaces itself (it sees networkd running).
    network = root / "etc/systemd/network"
    network.mkdir(parents=True, exist_ok=True)
    (network / "10-eth0.network").write_text(
        "[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n"
    )
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ("systemd-networkd.service",):
        link = wants / unit
        if not link.exists():
            link.symlink_to(f"/lib/systemd/system/{unit}")
    # Nothing may reach for the network on its own (there is none), nor
    # hold the dpkg lock while Ansible installs packages.
    mask_units(root, "apt-daily.timer", "apt-daily-upgrade.timer")
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/vagrant.conf").write_text(
        "UseDNS no\nPasswordAuthentication yes\n"
    )
    # New host keys on each VM's first boot, not the box's.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    keygen = root / "etc/systemd/system/ssh-host-keys.service"
    keygen.write_text(
        "[Unit]\nDescription=Make the SSH host keys\nBefore=ssh.service\n"
        "ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key\n\n"
        "[Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    (wants / "ssh-host-keys.service").symlink_to("../ssh-host-keys.service")
    chroot = ["chroot", root]
    run(
        [*chroot, "useradd", "--create-home", "--shell", "/bin/bash", "vagrant"],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    run([*chroot, "chpasswd"], input="vagrant:vagrant\nroot:vagrant\n")
    sudoers = root / "etc/sudoers.d/vagrant"
    sudoers.write_text(
        "vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n"
    )
    os.chmod(sudoers, 0o440)
    ssh = root / "home/vagrant/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text(insecure_public_key() + "\n")
    os.chmod(ssh / "authorized_keys", 0o600)
    run([*chroot, "chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh"])
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def box(args: argparse.Namespace) -> int:
    out = Path(args.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if out.exists() and not args.rebuild:
        log(f"{out} exists (--rebuild to make it anew)")
    else:
        build_box(out)
        log(f"box built in {time.monotonic() - t0:.0f}s: {out}")
    run(
        [
            "vagrant",
            "box",
            "add",
            "--force",
            "--name",
            BOX_NAME,
            "--provider",
            "libvirt",
            out,
        ],
        timeout=900,
    )
    log(f"added as {BOX_NAME} (libvirt) in {time.monotonic() - t0:.0f}s")
    return 0


# -- vagrant up, in a network namespace of its own ----------------------------------

# Directories libvirt keeps its configuration, sockets, images and logs in:
# each is replaced, in the run's mount namespace, by one of the run's own.
LIBVIRT_DIRS = (
    "/etc/libvirt",
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/log/libvirt",
    "/var/cache/libvirt",
)
LIBVIRTD_CONF = """\
# libvirtd of `make test-vagrant`: root only, on its Unix socket only.
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
"""
# No users, cgroups, security drivers or per-VM mount namespaces: the VMs
# run as root in the run's own namespaces, the console goes to a file (no
# virtlogd).
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""


class Transcript:
    """Lines with the time since the start, to stdout and a file."""

    def __init__(self, path: Path):
        self.t0 = time.monotonic()
        self.file = open(path, "a", buffering=1)  # noqa: SIM115
        self.marks: list[tuple[str, float]] = []

    def line(self, text: str) -> None:
        stamp = f"[{time.monotonic() - self.t0:7.1f}s] "
        for part in text.rstrip("\n").split("\n"):
            print(stamp + part, flush=True)
            self.file.write(stamp + part + "\n")

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.t0))
        self.line(f"== {what}")

    def command(self, cmd: list[str], *, timeout: float, **kw) -> int:
        """Run ``cmd``, its output line by line into the transcript."""
        self.line("$ " + " ".join(cmd))
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            **kw,
        )
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for out in proc.stdout:
            self.line(out)
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGTERM)
                self.line(f"!! timed out after {timeout:.0f}s")
                break
        return proc.wait()


def vagrant_env() -> dict[str, str]:
    env = dict(os.environ)
    tools = REPO / ".venv-appliance/bin"
    env["PATH"] = f"{tools}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("JOBGATE_VAGRANT_DRIVER", "qemu")
    env["VAGRANT_DEFAULT_PROVIDER"] = "libvirt"
    # Vagrant would otherwise ask the network for news of itself and its box.
    env["VAGRANT_CHECKPOINT_DISABLE"] = "1"
    env["VAGRANT_BOX_UPDATE_CHECK_DISABLE"] = "1"
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    return env


def api_call(method: str, path: str, body: dict | None = None, timeout=30.0):
    """One request to the scheduler's API, verifying its certificate."""
    context = ssl.create_default_context(cafile=str(CA_FILE))
    host = SCHEDULER_URL.removeprefix("https://")
    conn = http.client.HTTPSConnection(host, context=context, timeout=timeout)
    headers = {"Authorization": f"Bearer {LAB_TOKEN}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_cluster(tr: Transcript) -> None:
    """What the Vagrantfile's header promises: both workers online over HTTPS."""
    deadline = time.monotonic() + 180
    online: list[str] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            status, raw = api_call("GET", "/v1/workers")
            workers = json.loads(raw)["workers"]
            online = sorted(w["name"] for w in workers if w["state"] == "online")
            if online == ["worker-1", "worker-2"]:
                tr.line(f"GET /v1/workers -> {status}: {online} online")
                break
        time.sleep(2)
    else:
        raise LabError(f"the workers never came online over HTTPS: {online}")
    for name in ("worker-1", "worker-2"):
        status, raw = api_call(
            "POST",
            f"/v1/workers/{name}/jobs",
            {"command": "bash", "path": "count.sh", "args": ["3", "0.1"]},
        )
        body = json.loads(raw)
        tr.line(f"POST /v1/workers/{name}/jobs -> {status} {body}")
        _, out = api_call(
            "GET",
            f"/v1/workers/{name}/jobs/{body['job_id']}/output?follow=true",
            timeout=120,
        )
        tr.line(f"its output: {out!r}")
        if out != b"1\n2\n3\n":
            raise LabError(f"unexpected output of the job on {name}: {out!r}")


# The run's own ids: unused on Debian (64055 is what libvirt-daemon-system
# would give libvirt-qemu on a machine that has it).
QEMU_ID = 64055
NOBODY_ID = 64061


def private_accounts(run_dir: Path) -> None:
    """/etc/passwd and /etc/group of the run's mount namespace.

    libvirtd resolves its built-in QEMU user (libvirt-qemu) before it reads
    qemu.conf, so that user must exist; here it does, in this namespace only.
    And dnsmasq, which libvirt starts for each network, drops to "nobody":
    here that is a uid of its own, so that nothing outside the run that
    signals the machine's nobody processes (jobs of a test suite run as
    nobody) takes the VMs' DHCP server down with them.
    """
    for db in ("passwd", "group"):
        lines = []
        for line in Path(f"/etc/{db}").read_text().splitlines():
            fields = line.split(":")
            if fields[0] in ("nobody", "nogroup") and len(fields) > 3:
                fields[2] = str(NOBODY_ID)
                if db == "passwd":
                    fields[3] = str(NOBODY_ID)
                line = ":".join(fields)
            if not line.startswith("libvirt-qemu:"):
                lines.append(line)
        if db == "passwd":
            lines.append(
                f"libvirt-qemu:x:{QEMU_ID}:{QEMU_ID}::/var/lib/libvirt:/usr/sbin/nologin"
            )
        else:
            lines.append(f"libvirt-qemu:x:{QEMU_ID}:")
        own = run_dir / f"etc-{db}"
        own.write_text("\n".join(lines) + "\n")
        run(["mount", "--bind", own, f"/etc/{db}"])


def inner(args: argparse.Namespace) -> int:
    """In the run's network and mount namespaces: libvirtd, vagrant up, checks."""
    run_dir = Path(args.dir)
    # A SIGTERM (from the outer process) still runs the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tr = Transcript(run_dir / "transcript.log")
    env = vagrant_env()
    for d in LIBVIRT_DIRS:
        own = run_dir / d.strip("/").replace("/", "-")
        own.mkdir(exist_ok=True)
        if d == "/etc/libvirt":
            shutil.copytree(d, own, dirs_exist_ok=True)
            (own / "libvirtd.conf").write_text(LIBVIRTD_CONF)
            (own / "qemu.conf").write_text(QEMU_CONF)
        run(["mount", "--bind", own, d])
    private_accounts(run_dir)
    libvirtd = subprocess.Popen(
        ["libvirtd", "--pid-file", str(run_dir / "libvirtd.pid")],
        stdin=subprocess.DEVNULL,
        stdout=open(run_dir / "libvirtd.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rc = 1
    try:
        deadline = time.monotonic() + 60
        while run(["virsh", "-c", "qemu:///system", "version"], check=False).returncode:
            if time.monotonic() > deadline or libvirtd.poll() is not None:
                raise LabError("libvirtd did not come up; see libvirtd.log")
            time.sleep(0.5)
        tr.mark("libvirtd up in the run's namespaces")
        tr.line(run(["ip", "-brief", "address"]).stdout)
        rc = tr.command(
            ["vagrant", "up", "--no-parallel", "--provider=libvirt"],
            timeout=args.timeout,
            cwd=REPO,
            env=env,
        )
        tr.mark(f"vagrant up exited {rc}")
        if rc == 0:
            check_cluster(tr)
            tr.mark("cluster checked over HTTPS")
            rc = tr.command(
                ["vagrant", "provision", "worker-2"], timeout=1800, cwd=REPO, env=env
            )
            tr.mark(f"vagrant provision (second run) exited {rc}")
        tr.line(run(["ip", "-brief", "address"], check=False).stdout)
        tr.line(run(["ip", "route"], check=False).stdout)
    except LabError as exc:
        tr.line(f"!! {exc}")
        rc = 1
    finally:
        if not args.keep:
            tr.command(["vagrant", "destroy", "-f"], timeout=600, cwd=REPO, env=env)
            nets = run(
                ["virsh", "-c", "qemu:///system", "net-list", "--name"], check=False
            ).stdout.split()
            for net in nets:
                run(["virsh", "-c", "qemu:///system", "net-destroy", net], check=False)
            tr.mark("destroyed")
        libvirtd.terminate()
        try:
            libvirtd.wait(timeout=30)
        except subprocess.TimeoutExpired:
            libvirtd.kill()
            libvirtd.wait()
        tr.line("timings: " + ", ".join(f"{w} at {t:.0f}s" for w, t in tr.marks))
    return rc


def pids_in_netns(name: str) -> list[int]:
    """The processes whose network namespace is /run/netns/NAME."""
    try:
        target = os.stat(f"/run/netns/{name}")
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{entry}/ns/net")
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    pids.append(int(entry))
    return pids


def test(args: argparse.Namespace) -> int:
    """Make the namespace, run :func:`inner` in it, and clean up by PID."""
    if os.geteuid() != 0:
        raise LabError("test-vagrant needs root (network and mount namespaces)")
    boxes = run(["vagrant", "box", "list"], check=False).stdout
    if BOX_NAME not in boxes or "libvirt" not in boxes:
        raise LabError(f"no {BOX_NAME} box for libvirt; run 'make vagrant-box'")
    if not list((REPO / "dist/deb").glob("jobgate_*.deb")):
        raise LabError("no packages in dist/deb; run 'make deb'")
    run_id = secrets.token_hex(3)
    run_dir = (REPO / "build/vagrant" / f"run-{run_id}").resolve()
    run_dir.mkdir(parents=True)
    netns = f"jgvag-{run_id}"
    made_dirs = [Path(d) for d in LIBVIRT_DIRS if not Path(d).exists()]
    for d in made_dirs:
        d.mkdir(parents=True)
    run(["ip", "netns", "add", netns])
    t0 = time.monotonic()
    try:
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        cmd = [
            "nsenter",
            f"--net=/run/netns/{netns}",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-m",
            "lab.vagrant",
            "inner",
            "--dir",
            str(run_dir),
            "--timeout",
            str(args.timeout),
        ] + (["--keep"] if args.keep else [])
        log(f"running in network namespace {netns}; transcript {run_dir}")
        proc = subprocess.Popen(cmd, cwd=REPO)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            rc = proc.wait()
        except (KeyboardInterrupt, SystemExit):
            # The inner process destroys the VMs before it ends.
            proc.terminate()
            rc = proc.wait()
        return rc
    finally:
        if not args.keep:
            for pid in pids_in_netns(netns):
                # Typically Ansible's SSH connection masters (ControlPersist).
                try:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    name = "?"
                log(f"stopping what is left in the namespace: pid {pid} ({name})")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            run(["ip", "netns", "del", netns], check=False)
            # The VMs' disks and the box's copy in the pool; the transcript
            # and the logs stay.
            shutil.rmtree(run_dir / "var-lib-libvirt", ignore_errors=True)
            for d in reversed(made_dirs):
                with contextlib.suppress(OSError):
                    d.rmdir()
        log(f"test-vagrant took {time.monotonic() - t0:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.vagrant")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("box", help="build the Debian 12 box and `vagrant box add` it")
    p.add_argument("--output", default=str(REPO / "build/vagrant/bookworm.box"))
    p.add_argument("--rebuild", action="store_true")
    p.set_defaults(func=box)
    for name, func in (("test", test), ("inner", inner)):
        p = sub.add_parser(name, help="vagrant up in a namespace, check, destroy")
        p.add_argument("--timeout", type=float, default=5400)
        p.add_argument("--keep", action="store_true", help="leave the VMs running")
        if name == "inner":
            p.add_argument("--dir", required=True)
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
