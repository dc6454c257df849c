"""How a job's processes are kept together, so that stopping it stops them all.

Two mechanisms, chosen at start-up (``[jobs].isolation``):

* ``cgroup``: every job gets its own cgroup v2 below the worker's own cgroup
  (under systemd, ``Delegate=yes`` hands the worker its cgroup). The job joins
  it before its program runs (the child started by :mod:`worker.spawn` joins
  it before its exec; without that module a ``/bin/sh`` shim writes its own
  pid into the cgroup, then execs the job, through ``setpriv`` when it must
  drop to the job's user), and nothing it starts can leave it: not a double
  fork, not ``setsid``. Stopping signals every process in it, and ``cgroup.kill`` ends
  them all at once.
* ``process-group``: every job is the leader of a new session and process
  group, and signals go to the group. A process that calls ``setsid`` escapes
  it; used only where no writable cgroup v2 exists.

``auto`` picks ``cgroup`` when it works and ``process-group`` otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import select
import signal
import time
from pathlib import Path

from worker.limits import Enforcer

log = logging.getLogger(__name__)


def _cgroup2_mount() -> Path | None:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[0] == "cgroup2":
                    return Path(left.split()[4])
    except OSError:
        pass
    return None


def _own_cgroup() -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


class ProcessGroups:
    """Signals go to the job's process group (the job leads a new session)."""

    name = "process-group"

    def prepare(self, job_id: str) -> str:
        return "-"

    def kill_file(self, job_id: str) -> str | None:
        """The job's ``cgroup.kill``, if it has one (for its keeper)."""
        return None

    def signal(self, job_id: str, pgid: int, sig: int) -> None:
        if pgid <= 0:
            return  # no group known: never the worker's own (killpg(0))
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def kill_all(self, job_id: str, pgid: int) -> None:
        self.signal(job_id, pgid, signal.SIGKILL)

    def release(self, job_id: str) -> bool:
        """Free what the job held, without waiting; False: not yet, try again."""
        return True

    def cleanup(self, job_id: str) -> None:
        pass

    def close(self) -> None:
        pass


class Cgroups(ProcessGroups):
    """One cgroup v2 per job under ``base``."""

    name = "cgroup"

    def __init__(self, base: Path):
        self.base = base
        self._base = os.fspath(base)  # per-job paths are made on every start
        self._has_kill = (base / "cgroup.kill").exists()  # Linux 5.14

    def kill_file(self, job_id: str) -> str | None:
        return f"{self._dir(job_id)}/cgroup.kill" if self._has_kill else None

    @classmethod
    def create(cls, instance: str, keep: set[str] = frozenset()) -> Cgroups:
        """Make the jobs' parent cgroup, or raise OSError saying why not.

        ``instance`` names this worker uniquely on the host (several workers
        may share one cgroup when not run by systemd), so that cleaning up
        after an earlier run never touches another worker's jobs.
        """
        mount, own = _cgroup2_mount(), _own_cgroup()
        if mount is None or own is None:
            raise OSError("no cgroup v2 hierarchy is mounted")
        base = mount / own.lstrip("/") / f"jobgate-{instance}"
        base.mkdir(exist_ok=True)
        probe = base / "probe"
        probe.mkdir(exist_ok=True)
        probe.rmdir()
        groups = cls(base)
        groups.reap_leftovers(keep)
        return groups

    def reap_leftovers(self, keep: set[str] = frozenset()) -> None:
        """End what jobs of an earlier run of this worker left behind, but
        for the jobs in ``keep`` (adopted: they still run)."""
        for d in self.base.iterdir():
            if d.is_dir() and d.name not in keep:
                log.warning(
                    "killing what is left of job %s from an earlier run", d.name
                )
                self.cleanup(d.name)

    def _dir(self, job_id: str) -> str:
        return f"{self._base}/{job_id}"

    def prepare(self, job_id: str) -> str:
        d = self._dir(job_id)
        os.mkdir(d)
        return d + "/cgroup.procs"

    def pids(self, job_id: str) -> list[int]:
        try:
            with open(self._dir(job_id) + "/cgroup.procs") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def signal(self, job_id: str, pgid: int, sig: int) -> None:
        for pid in self.pids(job_id):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        super().signal(job_id, pgid, sig)

    def kill_all(self, job_id: str, pgid: int) -> None:
        try:
            fd = os.open(self._dir(job_id) + "/cgroup.kill", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"1")
            finally:
                os.close(fd)
        except OSError:  # kernels before 5.14: signal every member instead
            self.signal(job_id, pgid, signal.SIGKILL)

    def wait_empty(self, job_id: str, timeout: float) -> bool:
        """Wait until no process is left in the job's cgroup."""
        events = self._dir(job_id) + "/cgroup.events"
        deadline = time.monotonic() + timeout
        try:
            with open(events, "rb", buffering=0) as f:
                poller = select.poll()
                poller.register(f, select.POLLPRI | select.POLLERR)
                while True:
                    f.seek(0)
                    if b"populated 0" in f.read():
                        return True
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    # The kernel signals a change of cgroup.events with POLLPRI.
                    poller.poll(left * 1000)
        except OSError:
            return True

    def release(self, job_id: str) -> bool:
        """Remove the job's cgroup if it is empty, else kill what is left in it.

        False while processes are still in it (they were killed, but dying
        takes a moment); a cgroup that is already gone counts as removed.
        The runner has killed the job's processes when its main one exited,
        so the first try usually finds the cgroup empty.
        """
        try:
            os.rmdir(self._dir(job_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                self.kill_all(job_id, 0)
                return False
            log.warning("could not remove the cgroup of job %s: %s", job_id, exc)
        return True

    def cleanup(self, job_id: str) -> None:
        self.kill_all(job_id, 0)
        self.wait_empty(job_id, 5.0)
        try:
            os.rmdir(self._dir(job_id))
        except OSError as exc:
            log.warning("could not remove the cgroup of job %s: %s", job_id, exc)

    def close(self) -> None:
        try:
            self.base.rmdir()
        except OSError:
            pass


def instance_name(worker_name: str, state_dir: Path) -> str:
    """Names a worker uniquely on its host: by its name and its state dir."""
    key = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return f"{worker_name or 'worker'}-{key}"


def remove_leftovers(instance: str) -> None:
    """End and remove what a worker that is gone left in its cgroups.

    For tools that ran a worker on this host (a dev cluster, tests) and
    must not leave a killed worker's jobs or empty cgroups behind.
    """
    # The limits' cgroup v1 hierarchies (cpu, pids...) first: the job's
    # processes are in those too.
    Enforcer.discover(instance, None).close()
    mount, own = _cgroup2_mount(), _own_cgroup()
    if mount is None or own is None:
        return
    base = mount / own.lstrip("/") / f"jobgate-{instance}"
    if base.is_dir():
        groups = Cgroups(base)
        groups.reap_leftovers()
        groups.close()


def choose(mode: str, instance: str, keep: set[str] = frozenset()) -> ProcessGroups:
    """The isolation for ``[jobs].isolation``; raises OSError if it cannot be had.

    The cgroups of the jobs in ``keep`` (adopted from an earlier run) stay.
    """
    if mode == "process-group":
        return ProcessGroups()
    try:
        chosen = Cgroups.create(instance, keep)
    except OSError as exc:
        if mode == "cgroup":
            raise OSError(
                f'[jobs].isolation = "cgroup": cannot use cgroups: {exc}'
            ) from None
        log.info("jobs are kept together by process group (no cgroup: %s)", exc)
        return ProcessGroups()
    log.info("jobs run in their own cgroups under %s", chosen.base)
    return chosen
