"""Starting a job through jobgate-keeper, so that it outlives the worker.

A job started by :func:`~worker.spawn.spawn` is the worker's child and dies
with it (its output pipe does). :func:`spawn_kept` starts it through
``jobgate-keeper`` (``keeper.c``, built with the package) instead: the keeper
is the job's parent, copies its output into a file and tells how it ended:
to the worker on a channel, or, with no worker there to take it, into another
file (:func:`read_exit`). The job's process reports its start first of all: a
step of it that fails, the exec included, is in the exit record
(``start_error``), and :func:`start_failure` makes of it the OSError
:func:`~worker.spawn.spawn` would have raised. The worker has the keeper
forked by a :class:`KeeperServer` (a keeper it started once) rather than
execute it for every job.
"""

from __future__ import annotations

import array
import dataclasses
import errno
import fcntl
import functools
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

from worker.keeper_exit import EXIT_FILE, KeeperExit, parse_exit, read_exit
from worker.spawn import WAIT_MAX_DELAY_S, Child, _spawn, above_stdio, available

# The exit file's reader (worker.keeper_exit) belongs to this interface too.
__all__ = [
    "EXIT_FILE",
    "KeeperExit",
    "Kept",
    "KeeperServer",
    "ServerGone",
    "keeper_available",
    "keeper_path",
    "parse_exit",
    "read_exit",
    "spawn_kept",
    "start_failure",
]

_KEEPER = "jobgate-keeper"
# The keeper's report of the start: the step that failed (0: none) and errno,
# or 0 and the job's pid; then the keeper's own start time (clock ticks since
# boot, 0 if unknown). Native byte order: the keeper runs on this host.
_REPORT = struct.Struct("=iiq")
# A KeeperServer's answer: the keeper's pid (its pidfd along), or -errno.
_ANSWER = struct.Struct("=i")
# What the keeper takes (keeper.c): sizes far from overflowing an offset, a
# drain of at most a day.
_MAX_BYTES = 1 << 60
_MAX_DRAIN_S = 86400


def keeper_path() -> str:
    """Where the keeper is: next to ``worker._spawn``, in this package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), _KEEPER)


@functools.cache
def keeper_available() -> str:
    """Empty if jobs can be started through the keeper here, else why not.

    Asked once per process, like :func:`~worker.spawn.available`, which it
    needs too: the worker starts the keeper with ``worker._spawn``.
    """
    if why := available():
        return why
    path = keeper_path()
    if not os.path.isfile(path):
        return f"{_KEEPER} is not built (no {path})"
    if not os.access(path, os.X_OK):
        return f"{path} is not executable"
    return ""


@dataclasses.dataclass
class Kept:
    """A job started through the keeper."""

    # The job's parent: the worker's child when the worker executed it, None
    # when a KeeperServer forked it (then ``pidfd`` watches it).
    keeper: Child | None
    pid: int  # the job's main process
    keeper_pid: int = 0
    pidfd: int | None = None  # the caller's to close
    # The keeper's start time as it read it (linux.start_time), None if it
    # could not: with its pid, what names the keeper after a restart.
    keeper_start: int | None = None
    # The worker's end of the keeper's channel (spawn_kept(channel=True)),
    # the caller's to close: the job's exit record comes on it, and the
    # keeper waits for a byte back before it exits.
    channel: int | None = None

    def __post_init__(self) -> None:
        if self.keeper is not None:
            self.keeper_pid = self.keeper.pid


def spawn_kept(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str],
    user: int | None,
    group: int | None,
    cgroup_procs: list[str] | None,
    cgroup_kill: str | None,
    job_dir: str,
    make_dir: Callable[[str], None] | None = None,
    output_fd: int | None = None,
    output_name: str | None = None,
    head_bytes: int,
    tail_bytes: int,
    drain_s: float,
    hold_fds: tuple[int, ...] = (),
    server: KeeperServer | None = None,
    channel: bool = False,
) -> Kept:
    """Start ``argv`` as :func:`~worker.spawn.spawn` sets it up, but as the
    keeper's child.

    The job's stdout and stderr go to the keeper, which writes them into
    ``output_fd`` (the caller's; it stays open here), or else into the file
    ``output_name`` in ``job_dir``, which it makes (0640) with the job's
    first byte, at the offsets where the job wrote them, keeping the first
    ``head_bytes`` and the last ``tail_bytes`` and freeing the space between.
    Once the job's main process has exited, the keeper ends what the job left
    running (its cgroup, through ``cgroup_kill``, and its process group),
    reads its output for at most ``drain_s`` more seconds, reaps the main
    process and writes ``exit`` into ``job_dir`` (:func:`read_exit`), then
    exits. The job's pid, and so its process group's id, stays reserved until
    that reaping: while the keeper runs (bar the moment it takes to write the
    exit file), a signal to the group by that id reaches no other process.

    ``job_dir`` is there already, unless ``make_dir`` is given: then it
    must not be. When ``server`` makes directories where ``job_dir`` is
    (``KeeperServer(jobs_dir=...)``), the keeper makes it the first time it
    needs it: for the job's first byte of output, or for its exit file; a
    job that writes nothing and whose end is heard on the channel (below)
    leaves none. Else ``make_dir(job_dir)`` makes it here first.

    With ``channel`` and ``server``, the Kept comes with a ``channel``: the
    keeper sends the exit record there (:func:`parse_exit`) instead of
    writing the exit file, and waits for one byte back (the caller has
    recorded the job's end) before it exits. If the caller closes its end
    without that byte (it stops, or could not record), or is gone, the
    keeper writes the exit file after all.

    The keeper is executed, as the worker's child, unless ``server`` is
    given: then ``server`` forks it, and the Kept that comes back has no
    ``keeper`` but its ``keeper_pid`` and a ``pidfd`` of it. Should
    ``server`` fail (not the keeper it started), ServerGone is raised with
    nothing started: the caller may start the job without it.

    ``hold_fds`` (the caller's; they stay open here) are held by the keeper,
    untouched, for as long as it runs (a lock, say, released when the keeper
    exits), and not by the job.

    Returns once the keeper has forked the job's process, before that process
    is set up: for a moment it may not be in its cgroups yet, nor lead its
    process group (a signal to the group finds none, ESRCH), but a signal to
    its pid is never lost (if it comes before the process has put its
    handlers back to default, it is delivered after). A step of its set-up
    that fails, the exec included, ends it with status 127 and is in the exit
    file's ``start_error`` (:func:`start_failure`). Raises OSError if the
    keeper could not be started or could not start the job's process, with
    nothing left running.
    """
    assert keeper_available() == "", "spawn_kept() without keeper_available()"
    if (user is None) != (group is None):
        raise ValueError("user and group go together")
    if not (0 <= head_bytes <= _MAX_BYTES and 0 <= tail_bytes <= _MAX_BYTES):
        raise ValueError(f"head_bytes and tail_bytes go from 0 to {_MAX_BYTES}")
    if not 0 <= drain_s <= _MAX_DRAIN_S:
        raise ValueError(f"drain_s goes from 0 to {_MAX_DRAIN_S}")
    if (output_fd is None) == (output_name is None):
        raise ValueError("either output_fd or output_name")
    if output_name is not None and (
        "/" in output_name or output_name in ("", ".", "..")
    ):
        raise ValueError(f"output_name {output_name!r} is not a file name")
    opened: list[int] = []
    passed: list[int] = []

    def open_fd(path: str, flags: int) -> int:
        opened.append(above_stdio(os.open(path, flags | os.O_CLOEXEC)))
        return opened[-1]

    def ref(fd: int) -> str:
        """How the keeper's arguments name a descriptor it is passed."""
        return str(fd) if server is None else f"@{passed.index(fd)}"

    keeper: Child | _Forked
    ours: int | None = None  # the channel's end that is the caller's
    try:
        report_r, report_w = os.pipe()  # both close-on-exec
        opened += [report_r, report_w]
        report_w = opened[1] = above_stdio(report_w)
        passed.append(report_w)
        args = ["--report", ref(report_w)]
        if channel and server is not None:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours = mine.detach()
            opened.append(theirs.detach())
            passed.append(opened[-1])
            args += ["--channel", ref(opened[-1])]
        if (
            make_dir is not None
            and server is not None
            and server.jobs_dir == os.path.dirname(job_dir)
        ):
            args += ["--dir-name", os.path.basename(job_dir)]
        else:
            if make_dir is not None:
                make_dir(job_dir)
            passed.append(open_fd(job_dir, os.O_PATH | os.O_DIRECTORY))
            args += ["--dir", ref(passed[-1])]
        if output_fd is not None:
            output = output_fd
            if output < 3:  # the caller's own descriptor is never moved
                output = fcntl.fcntl(output_fd, fcntl.F_DUPFD_CLOEXEC, 3)
                opened.append(output)
            passed.append(output)
            args += ["--output", ref(output)]
        else:
            args += ["--output-name", output_name]
        for held in hold_fds:
            if held < 3:  # the keeper's stdio: held under another number
                held = fcntl.fcntl(held, fcntl.F_DUPFD_CLOEXEC, 3)
                opened.append(held)
            passed.append(held)
        args += ["--head", str(head_bytes)]
        args += ["--tail", str(tail_bytes), "--drain-ms", str(round(drain_s * 1000))]
        for procs in cgroup_procs or ():
            passed.append(open_fd(procs, os.O_WRONLY))
            args += ["--cgroup-procs", ref(passed[-1])]
        if cgroup_kill is not None:
            passed.append(open_fd(cgroup_kill, os.O_WRONLY))
            args += ["--cgroup-kill", ref(passed[-1])]
        if user is not None:
            args += ["--uid", str(user), "--gid", str(group)]
        args += ["--cwd", cwd, "--", argv[0], *argv]
        environment = [os.fsencode(f"{k}={v}") for k, v in env.items()]
        if server is not None:
            try:
                keeper = server.fork(
                    [os.fsencode(a) for a in args], environment, passed
                )
            except ServerGone:
                # Gone before it answered, perhaps after it forked: a keeper
                # it started holds the report's write end, and reports.
                os.close(report_w)
                opened.remove(report_w)
                if _read_report(report_r):
                    _kill_cgroup(cgroup_kill)
                    raise OSError(
                        errno.EIO,
                        "the keeper server failed while it started the job's keeper",
                    ) from None
                raise
        else:
            devnull = open_fd(os.devnull, os.O_RDWR)
            keeper = Child(
                _spawn.spawn(
                    os.fsencode(keeper_path()),
                    [os.fsencode(a) for a in [_KEEPER, *args]],
                    environment,
                    b"/",  # the keeper holds no directory of the job's
                    devnull,
                    devnull,
                    (),
                    -1,
                    -1,
                    tuple(passed),
                    _worker_stderr(),
                ),
                None,
            )
        # Only the keeper may hold the write end now: if it dies before it
        # reports, the read ends instead of waiting forever.
        os.close(report_w)
        opened.remove(report_w)
        try:
            report = _read_report(report_r)
        except BaseException:
            _abandon(keeper, cgroup_kill)
            raise
    except BaseException:
        if ours is not None:
            os.close(ours)
        raise
    finally:
        for fd in opened:
            os.close(fd)
    try:
        if len(report) != _REPORT.size:
            keeper.wait()
            _kill_cgroup(cgroup_kill)
            raise OSError(
                errno.EIO,
                f"{_KEEPER} ended ({_ended(keeper.returncode)}) before it "
                "reported the job's start",
            )
        step, value, start = _REPORT.unpack(report)
        if step != 0:
            keeper.wait()  # it started no process, and exits
            raise start_failure(step, value, argv[0])
    except BaseException:
        if isinstance(keeper, _Forked):
            keeper.close()
        if ours is not None:
            os.close(ours)
        raise
    started = start or None
    if isinstance(keeper, _Forked):
        return Kept(
            keeper=None,
            pid=value,
            keeper_pid=keeper.pid,
            pidfd=keeper.pidfd,
            keeper_start=started,
            channel=ours,
        )
    return Kept(keeper=keeper, pid=value, keeper_start=started)


class ServerGone(Exception):
    """The KeeperServer started nothing: it is gone or failed, or (``usable``)
    this one start was too big for it."""

    def __init__(self, text: str, usable: bool = False):
        super().__init__(text)
        self.usable = usable


class _Forked:
    """A keeper a KeeperServer forked: not the worker's child, so it is
    watched, waited for and killed through its pidfd. Its exit status is not
    known here (its parent reaped it): ``returncode`` stays None."""

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self.pidfd = pidfd
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> None:
        select.select([self.pidfd], [], [], timeout)

    def kill(self) -> None:
        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        os.close(self.pidfd)


class KeeperServer:
    """A keeper that forks the keepers of jobs (``jobgate-keeper --serve``).

    Started once, with the worker, as its child; asked for each kept job's
    keeper over a unix socket, with the job's descriptors passed along. Each
    start then costs a fork() of a small process instead of an exec of the
    keeper and its dynamic linking. On the bench host (300 sequential starts
    of a script that exits at once, in-process) the CPU of the keeper and
    the job went from 2.36-2.43 ms per job to 2.03-2.23 ms.

    The server forks each keeper ahead, as a spare that waits on the socket
    (``keeper.c``), so that the start does not wait for the fork either.
    Given ``jobs_dir``, its keepers make jobs' directories there when they
    need them (spawn_kept's ``make_dir``). ``JobRunner.start`` went from
    1.79-1.96 ms to 1.44-1.48 ms (p50 of ``bench.worker_micro start``, three
    pairs of runs back to back), the worker's CPU per start from 3.1-3.9 ms
    to 2.1-3.5 ms (1,000 sequential starts through HTTP, three pairs). The
    keepers it forks are no child of the worker's: they run on whether the
    worker or this server exits, and are watched through the pidfd each
    start gets back.

    A keeper whose job is over and whose end the caller answered on the
    job's channel waits up to ``idle_s`` to keep another job, and the server
    forks a spare only when none waits: sequential starts then fork no
    keeper, and none exits. The keepers' CPU per start went from 1.05-1.18
    ms to 0.33-0.48 ms (``perf record -a`` during 1,000 sequential starts
    through HTTP, three pairs of runs back to back).

    The server exits once the socket's other end closes: when :meth:`close`
    is called or the worker exits, however.
    """

    # The server's arguments and environment are made this long: a keeper
    # it forks writes its job's there, so that its /proc/PID/cmdline and
    # environ read as an executed keeper's (the job's processes are found by
    # JOBGATE_JOB_ID in their environment). A start whose environment is
    # longer is executed instead; arguments longer are cut in cmdline only.
    ARGV_ROOM = 4096
    ENV_ROOM = 16384

    def __init__(
        self,
        answer_timeout_s: float = 10.0,
        jobs_dir: str | None = None,
        idle_s: float = 10.0,
    ) -> None:
        """``idle_s``: how long a keeper whose job is over (and whose end the
        caller answered on the job's channel) waits to keep another before
        it exits; 0: it exits at once."""
        assert keeper_available() == "", "KeeperServer without keeper_available()"
        # Where the server's keepers make jobs' directories when they need
        # them (spawn_kept's make_dir), None if they make none.
        self.jobs_dir = jobs_dir
        self._lock = threading.Lock()
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A server that does not answer in time is killed and given up.
        self._sock.settimeout(answer_timeout_s)
        devnull = jobs_fd = -1
        try:
            theirs_fd = above_stdio(os.dup(theirs.fileno()))
            devnull = above_stdio(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
            args = [b"--serve", str(theirs_fd).encode()]
            args += [b"--idle-ms", str(round(idle_s * 1000)).encode()]
            if jobs_dir is not None:
                flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
                jobs_fd = above_stdio(os.open(jobs_dir, flags))
                args += [b"--jobs-dir", str(jobs_fd).encode()]
            self.pid = _spawn.spawn(
                os.fsencode(keeper_path()),
                [
                    os.fsencode(_KEEPER),
                    *args,
                    b" " * self.ARGV_ROOM,  # blank where ps shows it
                ],
                [b"JOBGATE_KEEPER_ROOM=" + b" " * (self.ENV_ROOM - 21)],
                b"/",
                devnull,
                devnull,
                (),
                -1,
                -1,
                (theirs_fd,) if jobs_fd < 0 else (theirs_fd, jobs_fd),
                _worker_stderr(),
            )
            os.close(theirs_fd)
        except BaseException:
            self._sock.close()
            raise
        finally:
            theirs.close()
            for fd in (devnull, jobs_fd):
                if fd >= 0:
                    os.close(fd)
        self.closed = False

    def fork(self, args: list[bytes], env: list[bytes], fds: list[int]) -> _Forked:
        """A keeper with arguments ``args`` (descriptors named "@I", the
        I-th of ``fds``) and environment ``env``; raises ServerGone if the
        server cannot start one, OSError if it could not fork."""
        if sum(len(e) + 1 for e in env) > self.ENV_ROOM:
            raise ServerGone("the job's environment is too big to be served", True)
        message = b"\0".join([str(len(args)).encode(), *args, *env]) + b"\0"
        with self._lock:
            if self.closed:
                raise ServerGone("the keeper server is closed")
            try:
                self._sock.sendmsg(
                    [message],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                    socket.MSG_NOSIGNAL,
                )
                data, ancdata, _flags, _ = self._sock.recvmsg(
                    _ANSWER.size,
                    socket.CMSG_SPACE(_ANSWER.size),
                    socket.MSG_CMSG_CLOEXEC,
                )
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    raise ServerGone(
                        "the job's start is too big for the keeper server", True
                    ) from None
                if isinstance(exc, TimeoutError):
                    # Dead, it forks nothing more: what it may have started
                    # is found through the report (spawn_kept).
                    os.kill(self.pid, signal.SIGKILL)
                raise ServerGone(f"the keeper server failed: {exc!r}") from None
        pidfds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                pidfds.frombytes(
                    payload[: len(payload) - len(payload) % pidfds.itemsize]
                )
        if len(data) != _ANSWER.size:
            for fd in pidfds:
                os.close(fd)
            raise ServerGone("the keeper server ended")
        (answer,) = _ANSWER.unpack(data)
        if answer == -errno.EMSGSIZE:
            raise ServerGone("the job's start is too big for the keeper server", True)
        if answer <= 0 or len(pidfds) != 1:
            for fd in pidfds:
                os.close(fd)
            err = -answer if answer < 0 else errno.EIO
            raise OSError(err, f"the keeper server could not fork: {os.strerror(err)}")
        return _Forked(answer, pidfds[0])

    def close(self, timeout: float = 5.0) -> None:
        """Close the socket: the server exits (its keepers run on)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._sock.close()
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid or time.monotonic() > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, WAIT_MAX_DELAY_S)
        if not pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


def start_failure(step: int, err: int, path: str) -> OSError:
    """The OSError :func:`~worker.spawn.spawn` raises for a child that failed
    at ``step`` with errno ``err``, for a failure reported by number: a kept
    job's ``start_error`` (:class:`KeeperExit`), or the keeper's report.

    ``path`` is the job's program (``argv[0]``), named (as bytes, as by
    :func:`~worker.spawn.spawn`) when the exec failed; the steps before it are
    told in words: ``"changing to the working directory: No such file or
    directory"``. The subclass follows errno (FileNotFoundError...).
    """
    assert _spawn is not None, "start_failure() without available()"
    try:
        return _spawn.failure(step, err, os.fsencode(path))
    except ValueError:  # a step this module does not know
        return OSError(errno.EIO, f"{_KEEPER} reported an unknown step {step}")


def _worker_stderr() -> int:
    """The keeper's stderr: the worker's own, where it has one, else stdout's
    (/dev/null: -1 tells worker._spawn so)."""
    try:
        os.fstat(2)
    except OSError:
        return -1
    return 2


def _read_report(fd: int) -> bytes:
    """The keeper's report, or less if the keeper ended without one."""
    report = b""
    while len(report) < _REPORT.size:
        got = os.read(fd, _REPORT.size - len(report))  # retried on EINTR
        if not got:
            break
        report += got
    return report


def _kill_cgroup(cgroup_kill: str | None) -> None:
    """A keeper that died before it reported may have started the job; only
    the job's cgroup can still find it."""
    if cgroup_kill is None:
        return
    try:
        with open(cgroup_kill, "w") as f:
            f.write("1")
    except OSError:
        pass


def _abandon(keeper: Child | _Forked, cgroup_kill: str | None) -> None:
    """The start was interrupted: end the keeper and whatever it started."""
    try:
        if isinstance(keeper, _Forked):
            keeper.kill()
        else:
            os.kill(keeper.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    keeper.wait()
    if isinstance(keeper, _Forked):
        keeper.close()
    _kill_cgroup(cgroup_kill)


def _ended(returncode: int | None) -> str:
    if returncode is None:  # forked by a KeeperServer, which reaped it
        return "how is not known"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"
