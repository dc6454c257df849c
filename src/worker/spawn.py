"""Starting a job's program with one exec, through the C module ``worker._spawn``.

Without it, a job is a chain of programs: ``/bin/sh`` joins the job's cgroup,
``setpriv`` drops to the job's account, then the interpreter runs. Each exec
of that chain costs CPU on every start, more than the interpreter itself.
``worker._spawn`` does all three in the ``vfork()``ed child before its only
exec; see the comment in ``_spawn.c``. What it buys (bench scenario 1, the
start of a script that exits at once): the job's processes went from 4.3-4.5
to 1.8-2.0 ms of CPU per start, the whole cluster from 11-12 to 8 ms.

The module is built with the package when a C compiler is at hand
(``setup.py``); where it is not, or the kernel lacks ``close_range`` (Linux
5.11), :func:`available` says why and the runner uses the chain.

A job started by :func:`spawn` is the worker's child and dies with it (its
output pipe does); :mod:`worker.kept` starts it so that it outlives the worker.
"""

from __future__ import annotations

import fcntl
import functools
import os
import subprocess
import time

try:
    from worker import _spawn
except ImportError as exc:  # not built: no compiler where it was installed
    _spawn = None
    _MISSING = f"worker._spawn is not built ({exc})"
else:
    _MISSING = ""

# Waiting for a child with a timeout polls it at growing intervals up to this.
WAIT_MAX_DELAY_S = 0.05


@functools.cache
def available() -> str:
    """Empty if jobs can be started with one exec here, else the reason why not.

    Asked once per process: the module and the kernel do not change under it.
    """
    if _spawn is None:
        return _MISSING
    try:
        _spawn.supported()
    except OSError as exc:
        return f"this kernel cannot close descriptors on exec in bulk: {exc.strerror}"
    return ""


class Child:
    """A job's main process, with what the runner uses of ``subprocess.Popen``."""

    def __init__(self, pid: int, stdout):
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if timeout is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(min(delay, left))
            delay = min(delay * 2, WAIT_MAX_DELAY_S)
        return self.returncode


def above_stdio(fd: int) -> int:
    """``fd``, or a close-on-exec copy of it numbered 3 or above.

    The child moves its descriptors to 0, 1 and 2; one already there could be
    overwritten before it is moved (only where the worker itself was started
    with one of them closed).
    """
    if fd >= 3:
        return fd
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return high


def spawn(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str],
    user: int | None,
    group: int | None,
    cgroup_procs: str | list[str] | None,
    pass_fds: tuple[int, ...] = (),
) -> Child:
    """Start ``argv`` (an absolute path first) with stdout and stderr on a pipe.

    The child leads a new session, reads /dev/null, keeps no other descriptor
    of the worker but ``pass_fds`` (at most 16, under the same numbers, 3 or
    above), has every signal at its default, joins the cgroups whose
    ``cgroup.procs`` are given (if any) and, if ``user`` is given, has only the
    ids ``user`` and ``group`` and no supplementary group. Raises OSError if
    any of it fails; nothing is left running then.
    """
    assert _spawn is not None, "spawn() without available()"
    if (user is None) != (group is None):
        raise ValueError("user and group go together")
    opened: list[int] = []
    try:
        read_end, write_end = os.pipe()  # both close-on-exec
        opened += [read_end, write_end]
        stdin = above_stdio(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        opened.append(stdin)
        write_end = opened[1] = above_stdio(write_end)
        if isinstance(cgroup_procs, str):
            cgroup_procs = [cgroup_procs]
        cgroups = []
        for procs in cgroup_procs or ():
            cgroups.append(os.open(procs, os.O_WRONLY | os.O_CLOEXEC))
            opened.append(cgroups[-1])
        pid = _spawn.spawn(
            os.fsencode(argv[0]),
            [os.fsencode(a) for a in argv],
            [os.fsencode(f"{k}={v}") for k, v in env.items()],
            os.fsencode(cwd),
            stdin,
            write_end,
            tuple(cgroups),
            -1 if user is None else user,
            -1 if group is None else group,
            tuple(pass_fds),
        )
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    for fd in opened[1:]:
        os.close(fd)
    return Child(pid, os.fdopen(read_end, "rb", buffering=0))
