"""Starting a job's process: the account, the environment, the spawn.

Two ways, chosen once per worker, and no more:

* one exec (:mod:`worker.spawn`, the C module ``worker._spawn``): the
  ``vfork()``ed child joins the job's cgroups, drops to the job's account and
  execs the interpreter. Used wherever the module is built and the kernel has
  ``close_range`` (Linux 5.11): every supported Debian and Ubuntu, and CI.
* a chain of programs through ``subprocess``: ``/bin/sh`` joins the cgroups
  (a few lines of shell, :data:`SHIM`; none in process-group mode),
  ``setpriv`` drops to the job's account, then the interpreter runs. Used
  where the C module is missing (installed without a C compiler) or the
  kernel is older; CI runs it too (the tests force it). A worker that must
  switch users this way refuses to start without ``setpriv``.

OS effects (spawn, exit notification, clock) go through :class:`ProcessOps`
so tests can replace them; the tests also run the real thing.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import stat
import subprocess
import threading
import time

from worker import kept as through_keeper
from worker import linux
from worker import spawn as one_exec
from worker.accounts import Account
from worker.config import JobsSection
from worker.output import make_job_directory

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# A keeper whose channel ended without the job's exit record is exiting (its
# descriptors close before its pidfd says it has ended): how long to wait
# for that before its exit file is read.
KEEPER_EXIT_S = 5.0
# Joins the job's cgroups ($1 of them, their cgroup.procs next) before
# anything of the job runs, then execs the job (through setpriv when it must
# drop to the job's user). The shim's stdin is a pipe back to the worker,
# used only to report a failure to join; the job itself gets /dev/null.
SHIM = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do '
    'echo $$ > "$1" || { echo cgroup >&0; exit 125; }; shift; n=$((n - 1)); done; '
    'exec 0</dev/null; exec "$@"'
)


class ProcessOps:
    """The runner's seam to the operating system.

    ``native``: jobs start with one exec (:mod:`worker.spawn`), which joins
    the job's cgroup and drops to its user itself; else through ``subprocess``,
    and :class:`Spawner` builds the chain of programs that does it.
    """

    native = not one_exec.available()

    @property
    def kept(self) -> bool:
        """Jobs start through their keeper (worker.kept, ``jobgate-keeper``),
        and so outlive the worker: where both C parts are built."""
        return self.native and not through_keeper.keeper_available()

    def spawn(
        self,
        argv,
        *,
        cwd,
        env,
        user,
        group,
        stdin=subprocess.DEVNULL,
        cgroup_procs: str | None = None,
    ) -> subprocess.Popen | one_exec.Child:
        if self.native:
            return one_exec.spawn(
                argv,
                cwd=cwd,
                env=env,
                user=user,
                group=group,
                cgroup_procs=cgroup_procs,
            )
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
        )

    # The keeper server (worker.kept.KeeperServer) that forks kept jobs'
    # keepers; None until the first kept start, or once it failed. Its
    # keepers make jobs' directories in ``jobs_dir`` (if set before) when
    # the jobs need them.
    _server: through_keeper.KeeperServer | None = None
    jobs_dir: str | None = None
    keeper_idle_s = 10.0  # KeeperServer's idle_s
    _server_failed = False
    _server_lock = threading.Lock()

    def spawn_kept(self, argv, **kwargs) -> through_keeper.Kept:
        """Start a kept job: its keeper forked by the keeper server, or
        executed if there is none (it could not start, or it failed)."""
        server = self.keeper_server()
        if server is not None:
            try:
                return through_keeper.spawn_kept(argv, server=server, **kwargs)
            except through_keeper.ServerGone as exc:
                if kwargs.get("make_dir") and os.path.isdir(kwargs["job_dir"]):
                    kwargs["make_dir"] = None  # its keeper made it, then failed
                if exc.usable:  # this start only: its keeper is executed
                    return through_keeper.spawn_kept(argv, **kwargs)
                log.warning(
                    "%s; jobs' keepers are executed one by one from now on", exc
                )
                with self._server_lock:
                    self._server_failed = True
                    self._server = None
                server.close()
        return through_keeper.spawn_kept(argv, **kwargs)

    def keeper_server(self) -> through_keeper.KeeperServer | None:
        """The keeper server, started on the first call (None if it cannot be)."""
        with self._server_lock:
            if self._server is None and not self._server_failed and self.kept:
                try:
                    self._server = through_keeper.KeeperServer(
                        jobs_dir=self.jobs_dir, idle_s=self.keeper_idle_s
                    )
                except OSError as exc:
                    self._server_failed = True
                    log.warning(
                        "the keeper server could not start (%s); jobs' keepers "
                        "are executed one by one",
                        exc,
                    )
            return self._server

    def close(self) -> None:
        """Stop the keeper server; the keepers it forked run on."""
        with self._server_lock:
            server, self._server = self._server, None
        if server is not None:
            server.close()

    def exit_fd(self, pid: int) -> int:
        """A descriptor that becomes readable once ``pid`` has exited.

        Reading it reaps nothing: the process stays a zombie until the runner
        waits for it. The runner closes the descriptor.
        """
        return os.pidfd_open(pid)

    def check(self) -> None:
        """Raise OSError, saying what is missing, if :meth:`exit_fd` cannot work.

        Jobs are watched through pidfds: Linux 5.3 or newer, and a seccomp
        policy that allows pidfd_open. There is no fallback (a thread per job
        blocked in waitid would bring back what the reactor replaced), so a
        host without them is refused when the worker starts instead of failing
        every job it would start.
        """
        try:
            os.close(os.pidfd_open(os.getpid()))
        except (AttributeError, OSError) as exc:
            detail = getattr(exc, "strerror", None) or str(exc)
            raise OSError(
                "the worker needs pidfd_open (Linux 5.3 or newer, not blocked "
                f"by a seccomp filter) to watch its jobs: {detail}"
            ) from None

    def now(self) -> float:
        return time.time()


class KeptProcess:
    """A kept job: its main process, and the keeper whose end is the job's.

    ``keeper`` is the worker's own child when this run of the worker
    executed the keeper, None when the keeper server forked it
    (:class:`~worker.kept.KeeperServer`) or when the worker adopted the job
    from an earlier run: then the keeper's end is known from ``pidfd`` alone.

    A job this run started through the server comes with a ``channel``: the
    keeper sends the job's exit record there, and waits until
    :meth:`acknowledge` says the worker recorded the end; no exit file is
    written then. Otherwise (no channel, or it was closed first) the job's
    exit status is in the exit file the keeper writes.
    """

    kept = True
    stdout = None  # the keeper, not the worker, reads the job's output
    program = ""  # what the job executes (for a start error's text)

    def __init__(
        self,
        pid: int,
        keeper_pid: int,
        keeper: one_exec.Child | None,
        job_dir: str,
        pidfd: int | None = None,
        keeper_start: int | None = None,
        channel: int | None = None,
    ):
        self.pid = pid
        self.keeper_pid = keeper_pid
        # The keeper's start time (linux.start_time): recorded with its pid.
        self.keeper_start = keeper_start
        self.keeper = keeper
        self.job_dir = job_dir
        self._pidfd = pidfd if pidfd is not None else os.pidfd_open(keeper_pid)
        self._channel = channel
        self.returncode: int | None = None
        self.exit: through_keeper.KeeperExit | None = None
        self.ended = False

    @classmethod
    def find(
        cls, pid: int, keeper: dict, job_dir: str, boot: str
    ) -> KeptProcess | None:
        """The kept job an earlier run of the worker recorded, if it can be had.

        ``keeper`` is what the record names: the keeper's pid, start time and
        boot. A keeper that still runs is known by all three (a pid alone may
        name another process by now) and comes back watchable; one that ended
        since comes back ``ended``, with the job's ``exit`` if it recorded
        one. None: no keeper of this boot, or it ended without a word.
        """
        if not keeper or keeper.get("boot") != boot:
            return None
        try:
            keeper_pid = int(keeper["pid"])
        except (KeyError, TypeError, ValueError):
            return None
        try:
            pidfd = os.pidfd_open(keeper_pid)
        except OSError:
            pidfd = None
        if pidfd is not None:
            if linux.start_time(keeper_pid) == keeper.get("start"):
                return cls(pid, keeper_pid, None, job_dir, pidfd, keeper.get("start"))
            os.close(pidfd)  # its pid names another process now
        gone = cls.gone(pid, keeper_pid, job_dir)
        return gone if gone.exit is not None else None

    @classmethod
    def gone(cls, pid: int, keeper_pid: int, job_dir: str) -> KeptProcess:
        """A kept job whose keeper ended while no worker watched it; its
        ``exit`` is None if the keeper left no record of the job's end."""
        proc = cls.__new__(cls)
        proc.pid, proc.keeper_pid, proc.keeper, proc.job_dir = (
            pid,
            keeper_pid,
            None,
            job_dir,
        )
        proc._pidfd = -1
        proc._channel = None
        proc.keeper_start = None
        proc.returncode, proc.exit, proc.ended = None, None, True
        proc._read_exit()
        return proc

    def _read_exit(self) -> None:
        try:
            self.exit = through_keeper.read_exit(self.job_dir)
        except (OSError, ValueError) as exc:
            log.error("%s: unreadable exit record: %s", self.job_dir, exc)
        if self.exit is not None:
            self.returncode = self.exit.returncode

    def exit_fd(self) -> int:
        """A descriptor readable once the job has ended: its exit record is on
        the channel, or the keeper has ended (the caller's to close)."""
        return os.dup(self._pidfd if self._channel is None else self._channel)

    def poll(self) -> int | None:
        return self.wait(0) if self._gone(0) else None

    def _gone(self, timeout: float | None) -> bool:
        if self.ended:
            return True
        fd = self._pidfd if self._channel is None else self._channel
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the job's end; its exit code (None: not known)."""
        if not self.ended:
            if not self._gone(timeout):
                raise subprocess.TimeoutExpired(str(self.keeper_pid), timeout)
            if self._channel is not None and self._take_record():
                os.close(self._pidfd)
                self.ended = True
                return self.returncode
            # The keeper has ended; whatever it left is in the exit file.
            select.select([self._pidfd], [], [], KEEPER_EXIT_S)
            if self.keeper is not None:
                self.keeper.wait()
            self.ended = True
            os.close(self._pidfd)
            self._read_exit()
        return self.returncode

    def _take_record(self) -> bool:
        """Read the exit record the keeper sent; False if the channel ended
        without one (the keeper died, or wrote its exit file instead)."""
        assert self._channel is not None
        try:
            raw = os.read(self._channel, 4096)  # one message: the whole record
        except OSError as exc:
            log.error("%s: reading the keeper's channel: %s", self.job_dir, exc)
            raw = b""
        if raw:
            try:
                self.exit = through_keeper.parse_exit(raw)
            except ValueError as exc:
                log.error("%s: the keeper's exit record: %s", self.job_dir, exc)
            else:
                self.returncode = self.exit.returncode
                return True
        self.close_channel()
        return False

    def acknowledge(self, recorded: bool) -> None:
        """Tell the keeper the job's end is ``recorded``, or (False) leave the
        exit file to it; either way the channel is closed."""
        if self._channel is not None and recorded and self.exit is not None:
            try:
                os.write(self._channel, b"k")
            except OSError:  # the keeper is gone: it wrote the exit file
                pass
        self.close_channel()

    def close_channel(self) -> None:
        """Close the channel, if any: the keeper writes the exit file instead."""
        channel, self._channel = self._channel, None
        if channel is not None:
            os.close(channel)


class Spawner:
    """Starts a job's process as the job's account, in the job's cgroup."""

    def __init__(
        self,
        cfg: JobsSection,
        ops: ProcessOps,
        worker_name: str,
        switches_user: bool,
        setpriv: str | None = None,
    ):
        self.cfg = cfg
        self.ops = ops
        self.worker_name = worker_name
        self.cwd = str(cfg.scripts_dir.resolve())
        # Without the one-exec spawner, drop privileges with setpriv rather
        # than in the forked child, so that spawning can use vfork, much
        # cheaper from a large process.
        self.setpriv = None
        if switches_user and not ops.native:
            self.setpriv = setpriv or shutil.which(
                "setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin"
            )
            if self.setpriv is None:
                raise OSError(
                    "setpriv (util-linux) is needed to start jobs as their user "
                    f"without the one-exec spawner ({one_exec.available() or 'off'})"
                )
        if ops.native:
            log.info("jobs start with a single exec (worker._spawn)")
        else:
            log.info(
                "jobs start through /bin/sh and setpriv: %s",
                one_exec.available() or "the one-exec spawner is turned off",
            )
        # Whether jobs outlive the worker hangs on one file of the package:
        # say which it is, so that a build without the keeper does not go
        # unnoticed until the first restart stops every job.
        if ops.kept:
            log.info(
                "jobs start through their keeper (%s): they go on running "
                "while the worker restarts",
                through_keeper.keeper_path(),
            )
        else:
            log.warning(
                "jobs start as the worker's own children and end with it: %s",
                through_keeper.keeper_available()
                if ops.native
                else "they start without the one-exec spawner",
            )

    def environment(self, job_id: str, account: Account) -> dict[str, str]:
        env = {
            "PATH": SAFE_PATH,
            # A dynamic user has no home: its private directory stands in.
            "HOME": account.home or account.tmp or self.cwd,
            "LANG": "C.UTF-8",
            "JOBGATE_JOB_ID": job_id,
            "JOBGATE_WORKER": self.worker_name,
        }
        if account.tmp:
            env["TMPDIR"] = account.tmp
        if account.uid is not None:
            env["USER"] = env["LOGNAME"] = account.name
        if account.shell:
            env["SHELL"] = account.shell
        env.update(self.cfg.environment)
        return env

    def spawn(
        self,
        job_id: str,
        argv: list[str],
        procs: list[str],
        account: Account,
        kept=None,
        cgroup_kill: str | None = None,
        hold_fds: tuple[int, ...] = (),
    ):
        """Start ``argv`` as ``account``; returns ``(process, status_fd)``.

        With ``kept`` (a :class:`~worker.output.KeptOutput`), through a
        keeper that writes the job's output there: the process is then a
        :class:`KeptProcess`. ``cgroup_kill`` is the job's ``cgroup.kill``
        (the keeper ends what the job leaves behind with it), ``hold_fds``
        descriptors the keeper holds open for as long as it lives (the lock
        of the job's user id).

        ``procs`` are the ``cgroup.procs`` files the job joins (none: it
        joins none). ``status_fd`` (chain only, else None) is readable once the
        shim has exited: anything on it means the job could not join its
        cgroups and never ran.
        """
        check_executable(argv[0])
        env = self.environment(job_id, account)
        user, group = account.uid, account.gid
        common = {
            "cwd": self.cwd,
            "env": env,
            "user": user,
            "group": group,
            "cgroup_procs": procs or None,
        }
        if kept is not None:
            started = self.ops.spawn_kept(
                argv,
                **common,
                cgroup_kill=cgroup_kill,
                job_dir=str(kept.directory),
                make_dir=make_job_directory,
                output_name=kept.path.name,
                head_bytes=kept.head_bytes,
                tail_bytes=kept.tail_bytes,
                drain_s=self.cfg.drain_timeout_s,
                hold_fds=hold_fds,
                channel=True,
            )
            proc = KeptProcess(
                started.pid,
                started.keeper_pid,
                started.keeper,
                str(kept.directory),
                started.pidfd,
                started.keeper_start,
                started.channel,
            )
            proc.program = argv[0]
            return proc, None
        if self.ops.native:  # one exec, but no keeper (jobgate-keeper missing)
            return self.ops.spawn(argv, **common), None
        # The job's program runs with the job's user only, through setpriv:
        # no uid switch in the forked child lets subprocess use vfork.
        priv = []
        if user is not None:
            priv = [
                self.setpriv,
                f"--reuid={user}",
                f"--regid={group}",
                "--clear-groups",
                "--",
            ]
        status_r, status_w = os.pipe()
        # The shim needs the worker's privileges to join the cgroups.
        shim = ["/bin/sh", "-c", SHIM, "jobgate-job", str(len(procs)), *procs]
        shim += [*priv, *argv]
        try:
            proc = self.ops.spawn(
                shim, cwd=self.cwd, env=env, user=None, group=None, stdin=status_w
            )
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        # Read only once the shim has exited; never wait on it.
        os.set_blocking(status_r, False)
        return proc, status_r


def start_error_text(exc: OSError, program: str) -> str:
    """Why a job never ran, from the OSError of its start."""
    detail = exc.strerror or str(exc)
    if exc.filename:  # the exec itself
        return f"could not execute {program}: {detail}"
    # What the child had to do before it, or a descriptor the worker could
    # not get.
    return f"could not start the job: {detail}"


def read_start_error(status_fd: int) -> str:
    """What the chain's shim reported (it has exited), then close the pipe."""
    try:
        data = os.read(status_fd, 4096).decode(errors="replace")
    except BlockingIOError:
        data = ""
    finally:
        os.close(status_fd)
    return "could not move the job into its cgroup" if data else ""


def check_executable(path: str) -> None:
    """Raise the OSError an exec of ``path`` would meet, before spawning."""
    st = os.stat(path)  # ENOENT, ENOTDIR, ELOOP ...
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
