"""Per-job limits: memory, CPU and tasks, enforced through the job's cgroups.

Each limit needs a cgroup controller: ``memory_mb`` the memory controller,
``cpu_percent`` the cpu controller, ``tasks`` the pids controller. The worker
looks once, at start, where it can have each:

* **cgroup v2**: the controller is available in the worker's own cgroup v2
  (the one :mod:`worker.isolation` puts every job in) and can be enabled for
  the jobs below it. The job's limits are written into its own cgroup:
  ``memory.max`` (and ``memory.swap.max`` 0), ``cpu.max``, ``pids.max``.
* **cgroup v1**: a v1 hierarchy with the controller is mounted and the
  worker may make cgroups in it. A job with such a limit gets a cgroup of
  its own in that hierarchy too (``memory.limit_in_bytes`` and
  ``memory.memsw.limit_in_bytes``, ``cpu.cfs_quota_us``, ``pids.max``), and
  its process joins it before it runs, like its v2 cgroup.

Why v1 as well: hosts with the hybrid layout (v1 controllers, a v2 hierarchy
without them) are common on long-term-support distributions still in use,
and CI runs on one. Refusing every limit there would leave the limits
untested where they run; the v1 part is small (three files, one directory
per controller and job) and goes away with the hosts.

A limit that neither can enforce is refused with a clear error (a request
that asks for it, or a worker-wide default that sets it), never ignored.
Whichever applies is reported: :meth:`Enforcer.describe`, and to the
scheduler as the worker's ``enforceable_limits``.

A job the kernel killed for using more memory than its limit is told apart
from other SIGKILLs by the OOM-kill counter of its memory cgroup
(``memory.events`` on v2, ``memory.oom_control`` on v1).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

NAMES = ("memory_mb", "cpu_percent", "tasks")
CONTROLLER = {"memory_mb": "memory", "cpu_percent": "cpu", "tasks": "pids"}
CPU_PERIOD_US = 100_000
# How long the processes a gone worker's job left have to exit once killed,
# before their cgroup is left behind (and said so).
LEFTOVER_REMOVE_S = 5.0


@dataclasses.dataclass(frozen=True)
class Limits:
    """0 in a field: no limit."""

    memory_mb: int = 0
    cpu_percent: int = 0
    tasks: int = 0

    def set(self) -> dict[str, int]:
        """The limits that are set, by name."""
        return {n: getattr(self, n) for n in NAMES if getattr(self, n)}

    def __bool__(self) -> bool:
        return bool(self.set())

    @classmethod
    def from_json(cls, d: dict | None) -> Limits:
        return cls(**{n: int(v) for n, v in (d or {}).items() if n in NAMES})


def _mounts() -> list[tuple[str, Path, set[str]]]:
    """(filesystem type, mount point, super options) of the cgroup mounts."""
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fstype, _, options = right.split()[:3]
                if fstype in ("cgroup", "cgroup2"):
                    found.append(
                        (fstype, Path(left.split()[4]), set(options.split(",")))
                    )
    except OSError:
        pass
    return found


def _own_v1_paths() -> dict[str, str]:
    """The worker's own cgroup in each v1 hierarchy, by controller."""
    paths = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(","):
                    if c:
                        paths[c] = path
    except OSError:
        pass
    return paths


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class Enforcer:
    """Where each limit can be enforced, and doing it for each job."""

    def __init__(self, v2: set[str], v1: dict[str, Path], v2_dir=None):
        self.v2 = v2  # controllers enabled below the jobs' v2 parent
        self.v1 = v1  # controller -> the jobs' parent cgroup in its hierarchy
        # job id -> the job's v2 cgroup directory (worker.isolation)
        self._v2_dir = v2_dir
        self._why_not: dict[str, str] = {}

    @classmethod
    def discover(
        cls,
        instance: str,
        v2_base: Path | None,
        v2_dir=None,
        keep: set[str] = frozenset(),
    ) -> Enforcer:
        """Find the controllers this worker can use; never raises.

        The v1 cgroups of the jobs in ``keep`` (adopted) stay.
        """
        v2: set[str] = set()
        v1: dict[str, Path] = {}
        why_not = {}
        if v2_base is not None:
            try:
                available = set((v2_base / "cgroup.controllers").read_text().split())
                wanted = [c for c in CONTROLLER.values() if c in available]
                for c in wanted:
                    _write(str(v2_base / "cgroup.subtree_control"), f"+{c}")
                    v2.add(c)
            except OSError as exc:
                log.info("cgroup v2 controllers cannot be enabled for jobs: %s", exc)
        own = _own_v1_paths()
        for fstype, mount, options in _mounts():
            if fstype != "cgroup":
                continue
            for c in CONTROLLER.values():
                if c in v2 or c in v1 or c not in options or c not in own:
                    continue
                base = mount / own[c].lstrip("/") / f"jobgate-{instance}"
                try:
                    base.mkdir(exist_ok=True)
                    probe = base / "probe"
                    probe.mkdir(exist_ok=True)
                    probe.rmdir()
                except OSError as exc:
                    why_not[c] = f"cannot make cgroups in {base.parent}: {exc.strerror}"
                    continue
                v1[c] = base
        enforcer = cls(v2, v1, v2_dir)
        for c in CONTROLLER.values():
            if c not in v2 and c not in v1:
                enforcer._why_not[c] = why_not.get(
                    c,
                    f"no {c} controller: neither enabled in the worker's cgroup v2 "
                    f"nor a cgroup v1 {c} hierarchy it may write",
                )
        enforcer.reap_leftovers(keep)
        return enforcer

    # -- what it can do -------------------------------------------------------

    def enforceable(self) -> list[str]:
        return [n for n in NAMES if self.how(n)]

    def how(self, name: str) -> str:
        """ "cgroup v2", "cgroup v1", or "" when ``name`` cannot be enforced."""
        c = CONTROLLER[name]
        if c in self.v2 and self._v2_dir is not None:
            return "cgroup v2"
        if c in self.v1:
            return "cgroup v1"
        return ""

    def why_not(self, name: str) -> str:
        return self._why_not.get(CONTROLLER[name], "no cgroup v2 for the job")

    def describe(self) -> str:
        parts = [f"{n} ({self.how(n)})" for n in NAMES if self.how(n)]
        missing = [n for n in NAMES if not self.how(n)]
        text = "per-job limits: " + (", ".join(parts) or "none")
        if missing:
            text += "; cannot enforce " + ", ".join(
                f"{n} ({self.why_not(n)})" for n in missing
            )
        return text

    # -- per job ----------------------------------------------------------------

    def _v1_dir(self, controller: str, job_id: str) -> str:
        return f"{self.v1[controller]}/{job_id}"

    def prepare(self, job_id: str, limits: Limits) -> list[str]:
        """Set up the job's limits; returns the v1 ``cgroup.procs`` it must join.

        The job's v2 cgroup (if limits go there) must exist already.
        """
        procs = []
        for name, value in limits.set().items():
            c = CONTROLLER[name]
            if self.how(name) == "cgroup v2":
                d = self._v2_dir(job_id)
            else:
                d = self._v1_dir(c, job_id)
                os.mkdir(d)
                procs.append(d + "/cgroup.procs")
            for file, text in _settings(name, value, v2=self.how(name) == "cgroup v2"):
                path = f"{d}/{file}"
                if file in _SWAP and not os.path.exists(path):
                    continue  # swap accounting is off: memory alone is limited
                _write(path, text)
        return procs

    def oom_kills(self, job_id: str, limits: Limits) -> int:
        """How many of the job's processes the OOM killer ended (memory limit)."""
        if not limits.memory_mb:
            return 0
        if self.how("memory_mb") == "cgroup v2":
            path = f"{self._v2_dir(job_id)}/memory.events"
        else:
            path = f"{self._v1_dir('memory', job_id)}/memory.oom_control"
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def release(self, job_id: str, limits: Limits) -> bool:
        """Remove the job's v1 cgroups; False while processes are still in one."""
        done = True
        for name in limits.set():
            c = CONTROLLER[name]
            if self.how(name) != "cgroup v1":
                continue
            d = self._v1_dir(c, job_id)
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.warning("could not remove %s: %s", d, exc)
                    continue
                _kill_members(d)
                done = False
        return done

    def reap_leftovers(self, keep: set[str] = frozenset()) -> None:
        """End and remove what jobs of an earlier run left in the v1 cgroups
        (but for the jobs in ``keep``)."""
        for base in self.v1.values():
            for d in base.iterdir():
                if d.is_dir() and d.name not in keep:
                    _kill_members(str(d))
                    try:
                        _remove_once_empty(str(d), LEFTOVER_REMOVE_S)
                    except OSError as exc:
                        log.warning("could not remove %s left over: %s", d, exc)

    def close(self) -> None:
        for base in self.v1.values():
            try:
                base.rmdir()
            except OSError:
                pass


_SWAP = ("memory.swap.max", "memory.memsw.limit_in_bytes")


def _settings(name: str, value: int, v2: bool) -> list[tuple[str, str]]:
    if name == "memory_mb":
        size = str(value * 1024 * 1024)
        if v2:
            return [("memory.max", size), ("memory.swap.max", "0")]
        # The memory limit first: memsw may never be below it.
        return [("memory.limit_in_bytes", size), ("memory.memsw.limit_in_bytes", size)]
    if name == "cpu_percent":
        quota = str(value * CPU_PERIOD_US // 100)
        if v2:
            return [("cpu.max", f"{quota} {CPU_PERIOD_US}")]
        return [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", quota)]
    return [("pids.max", str(value))]


def _kill_members(directory: str) -> None:
    try:
        with open(directory + "/cgroup.procs") as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _remove_once_empty(directory: str, timeout: float) -> None:
    """Remove a v1 cgroup whose members were just sent SIGKILL, once they
    have exited (v1 has no event for it): raises the last OSError if they
    have not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
