"""Runs jobs: spawning, output capture, following, stopping, history.

Each job is a script from the scripts directory run by an allow-listed
interpreter, as an unprivileged user, in its own session and (where the host
allows) its own cgroup (see :mod:`worker.isolation`), with stdin from
/dev/null and a scrubbed environment. Its stdout and stderr share one pipe,
so the output keeps the order in which the job wrote it.

One thread per runner, the :class:`~worker.reactor.Reactor`, watches every
running job, however many there are: it copies each job's pipe into the job's
:class:`~worker.output.OutputLog` as data arrives and wakes the followers
waiting on the job's condition variable (nobody polls), and it holds the
deadlines: timeouts, the SIGTERM to SIGKILL grace, the output drain.

A pidfd tells the reactor that a job's main process exited, without reaping
it: while it is a zombie its pid still names the job, so whatever is left of
the job is killed first, then the main process is reaped, the pipe is drained
(for at most ``drain_timeout_s``), the job's cgroup is removed, and only then
is the end recorded. So a job reported ended has no process left and no
output still to come.

OS effects (spawn, exit notification, clock) go through :class:`ProcessOps`
so tests can replace them; the tests also run the real thing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from jobgate.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from jobgate.jobstate import ExitReason, JobState, check_transition
from worker import isolation, metrics
from worker import spawn as one_exec
from worker.config import JobsSection
from worker.output import OutputLog
from worker.reactor import Reactor, Timer
from worker.records import RecordLog

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# Joins the job's cgroup before anything of the job runs, then execs the job
# (through setpriv when it must drop to the job's user). The shim's stdin is
# a pipe back to the worker, used only to report a failure to join; the job
# itself gets /dev/null.
SHIM = (
    'echo $$ > "$1" || { echo cgroup >&0; exit 125; }; '
    'exec 0</dev/null; shift; exec "$@"'
)
# How long the cgroup of a job that ended may take to empty before it is
# left for the next start of the worker to remove.
CGROUP_REMOVE_S = 5.0
# A job's process that outlived SIGKILL is looked at again after this long,
# then at doubling intervals up to the maximum, until it can be reaped.
REAP_LATER_S = 1.0
REAP_LATER_MAX_S = 60.0


@dataclasses.dataclass
class JobRecord:
    """What is known and persisted about one job (:mod:`worker.records`)."""

    job_id: str
    command: str
    path: str
    args: list[str]
    state: JobState
    pid: int = 0
    exit_code: int | None = None
    signal: int | None = None
    started_at: float = 0.0
    ended_at: float | None = None
    reason: str = ""
    exit_reason: ExitReason | None = None
    stopped_by: str = ""
    stopped_at: float | None = None
    output_bytes: int = 0
    output_dropped_bytes: int = 0
    timeout_s: int = 0
    idempotency_key: str = ""

    def to_json(self) -> dict:
        d = {name: getattr(self, name) for name in _RECORD_FIELDS}
        d["args"] = list(self.args)
        d["state"] = self.state.value
        d["exit_reason"] = self.exit_reason.value if self.exit_reason else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> JobRecord:
        d = dict(d)
        d["state"] = JobState(d["state"])
        d["exit_reason"] = (
            ExitReason(d["exit_reason"]) if d.get("exit_reason") else None
        )
        return cls(**d)


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))


class ProcessOps:
    """The runner's seam to the operating system.

    ``native``: jobs start with one exec (:mod:`worker.spawn`), which joins
    the job's cgroup and drops to its user itself; else through ``subprocess``,
    and the runner builds the chain of programs that does it.
    """

    native = not one_exec.available()

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


class _Job:
    """A job and the synchronisation around it."""

    def __init__(self, record: JobRecord, directory: Path, output: OutputLog):
        self.record = record
        self.dir = directory
        self.output = output
        self.cond = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self.status_fd: int | None = None
        self.out_fd: int | None = None  # the output pipe, while it is read
        self.exit_fd: int | None = None  # readable once the main process exits
        self.returncode: int | None = None
        self.reaped = True  # no live processes unless spawned
        self.sealed = True  # no more output unless spawned
        self.drained = False  # the pipe was read to its end (or given up)
        self.concluded = False  # the end is being recorded
        self.stop_reason: ExitReason | None = None
        self.stop_text = ""
        self.done = threading.Event()
        # Deadlines on the reactor: the timeout, SIGKILL after the grace, the
        # drain. Added under ``cond`` while the job is not reaped.
        self.timers: list[Timer] = []
        if record.state.is_terminal():
            self.done.set()


class JobRunner:
    """Starts, stops and reports jobs on this worker."""

    def __init__(
        self,
        cfg: JobsSection,
        worker_name: str = "",
        ops: ProcessOps | None = None,
        isolation_mode: str | None = None,
    ):
        self.cfg = cfg
        self.worker_name = worker_name
        self.ops = ops or ProcessOps()
        self.ops.check()
        self.jobs_dir = cfg.state_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.scripts_dir = cfg.scripts_dir.resolve()
        self._scripts = str(self.scripts_dir)
        # Inside it means below it: the directory itself is no script.
        self._scripts_prefix = self._scripts.rstrip("/") + "/"
        self._user, self._group, self._home = self._job_account()
        self.isolation = isolation.choose(
            isolation_mode or cfg.isolation,
            isolation.instance_name(worker_name, cfg.state_dir),
        )
        # Without the one-exec spawner, drop privileges with setpriv rather
        # than in the forked child, so that spawning can use vfork, much
        # cheaper from a large process.
        self._setpriv = (
            getattr(self.isolation, "setpriv", None)
            or shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
            if self._user is not None and not self.ops.native
            else None
        )
        if self.ops.native:
            log.info("jobs start with a single exec (worker._spawn)")
        else:
            log.info(
                "jobs start through /bin/sh and setpriv: %s",
                one_exec.available() or "the one-exec spawner is turned off",
            )
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._by_key: dict[str, str] = {}
        self._active: set[_Job] = set()  # jobs not ended yet
        self._closing = False  # shutdown() began: start() refuses (under _lock)
        self._closed = threading.Event()
        self._records = RecordLog(self.jobs_dir)
        self._load_history()
        self._reactor = Reactor(name="job-reactor")
        self._retention = threading.Thread(
            target=self._retention_loop, name="retention", daemon=True
        )
        self._retention.start()

    # -- set-up -------------------------------------------------------------

    def _job_account(self) -> tuple[int | None, int | None, str]:
        if os.geteuid() != 0:
            return None, None, str(self.scripts_dir)
        try:
            pw = pwd.getpwnam(self.cfg.user)
        except KeyError:
            raise OSError(
                f"[jobs].user: no such account {self.cfg.user!r} on this host"
            ) from None
        if pw.pw_uid == 0:
            raise OSError(
                f"[jobs].user: {self.cfg.user!r} is root; jobs never run as root"
            )
        return pw.pw_uid, pw.pw_gid, pw.pw_dir

    def _output(self, directory: Path, total: int = 0) -> OutputLog:
        return OutputLog(
            directory, self.cfg.output_head_bytes, self.cfg.output_tail_bytes, total
        )

    def _load_history(self) -> None:
        """Read the records a previous run left; jobs it was running are lost.

        Records of the earlier layout, a ``job.json`` in each job's directory,
        are taken over into the record file and their files removed.
        """
        found = self._records.load()
        known = {d["job_id"] for d in found}
        legacy = []  # taken over: removed once the record file holds them
        for path in sorted(self.jobs_dir.glob("*/job.json")):
            try:
                d = json.loads(path.read_text())
                if not isinstance(d, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable job record %s: %s", path, exc)
                continue
            legacy.append(path)
            if d.get("job_id") not in known:
                found.append(d)
        kept = []
        for d in found:
            try:
                record = JobRecord.from_json(d)
                if record.job_id != str(uuid.UUID(record.job_id)):
                    raise ValueError(f"job id {record.job_id!r} is not a UUID")
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                log.warning("ignoring job record %r: %s", d.get("job_id"), exc)
                continue
            directory = self.jobs_dir / record.job_id
            output = self._output(directory, record.output_bytes)
            if record.state is JobState.RUNNING:
                record.state = JobState.LOST
                record.exit_reason = ExitReason.LOST
                record.ended_at = self.ops.now()
                record.reason = "the worker stopped while the job was running"
                record.output_bytes = output.recover()
                log.warning(
                    "job %s was running when the worker stopped: lost",
                    record.job_id,
                    extra={"JOB_ID": record.job_id},
                )
            kept.append(record.to_json())
            job = _Job(record, directory, output)
            self._jobs[record.job_id] = job
            if record.idempotency_key:
                self._by_key[record.idempotency_key] = record.job_id
        # One line per job, the lost ones with their end; a line a crash cut
        # short is gone, so appends start on a line of their own.
        self._records.reset(kept)
        for path in legacy:
            with contextlib.suppress(OSError):
                path.unlink()
        if self._jobs:
            log.info("loaded %d job records from %s", len(self._jobs), self.jobs_dir)

    # -- requests ---------------------------------------------------------------

    def resolve_script(self, path: str) -> Path:
        """The real path of ``path`` inside the scripts directory, or an error."""
        if not path:
            raise InvalidArgument("path is required: a script in the scripts directory")
        if "\0" in path:
            raise InvalidArgument("path must not contain NUL characters")
        if os.path.isabs(path):
            raise PermissionDenied(
                f"path {path!r} is absolute; give it relative to the scripts directory"
            )
        try:
            real = os.path.realpath(os.path.join(self._scripts, path))
            if real != self._scripts and not real.startswith(self._scripts_prefix):
                raise PermissionDenied(
                    f"path {path!r} is outside the scripts directory"
                )
            try:
                mode = os.stat(real).st_mode
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                mode = 0  # nothing there
            if stat.S_ISDIR(mode):
                raise InvalidArgument(f"path {path!r} is a directory, not a script")
            if not stat.S_ISREG(mode):
                raise InvalidArgument(f"no script {path!r} in the scripts directory")
        except OSError as exc:  # e.g. a name longer than the filesystem allows
            raise InvalidArgument(f"path {path!r}: {exc.strerror}") from None
        return Path(real)

    def _interpreter(self, command: str) -> str:
        exe = self.cfg.interpreters.get(command)
        if exe is None:
            allowed = ", ".join(sorted(self.cfg.interpreters)) or "none"
            raise PermissionDenied(
                f"command {command!r} is not allowed on this worker "
                f"(allowed: {allowed})"
            )
        return exe

    def _check_args(self, args: list[str]) -> None:
        if len(args) > self.cfg.max_args:
            raise InvalidArgument(
                f"args has {len(args)} items; this worker allows {self.cfg.max_args}"
            )
        size = 0
        for i, a in enumerate(args):
            if "\0" in a:
                raise InvalidArgument(f"args[{i}] must not contain NUL characters")
            size += len(a.encode())
        if size > self.cfg.max_arg_bytes:
            raise InvalidArgument(
                f"args total {size} bytes; this worker allows {self.cfg.max_arg_bytes}"
            )

    def _timeout(self, requested: int) -> int:
        if requested < 0:
            raise InvalidArgument("timeout_s must be 0 (the default) or positive")
        if requested > self.cfg.max_timeout_s:
            raise InvalidArgument(
                f"timeout_s {requested} is above this worker's maximum "
                f"{self.cfg.max_timeout_s}"
            )
        return requested or self.cfg.default_timeout_s

    def _environment(self, job_id: str) -> dict[str, str]:
        env = {
            "PATH": SAFE_PATH,
            "HOME": self._home,
            "LANG": "C.UTF-8",
            "JOBGATE_JOB_ID": job_id,
            "JOBGATE_WORKER": self.worker_name,
        }
        if self._user is not None:
            env["USER"] = env["LOGNAME"] = self.cfg.user
        env.update(self.cfg.environment)
        return env

    def start(
        self,
        command: str,
        path: str,
        args: list[str] | tuple[str, ...] = (),
        timeout_s: int = 0,
        idempotency_key: str = "",
    ) -> tuple[JobRecord, bool]:
        """Start a job; returns its record and whether it already existed."""
        args = list(args)
        exe = self._interpreter(command)
        script = self.resolve_script(path)
        self._check_args(args)
        timeout = self._timeout(timeout_s)
        if len(idempotency_key) > 256:
            raise InvalidArgument("idempotency_key is longer than 256 characters")
        with self._lock:
            if self._closing:
                raise Unavailable(
                    "the worker is shutting down and starts no more jobs; "
                    "start the job on another worker"
                )
            if idempotency_key and idempotency_key in self._by_key:
                return self._snapshot(self._jobs[self._by_key[idempotency_key]]), True
            running = len(self._active)
            if running >= self.cfg.max_concurrent:
                raise ResourceExhausted(
                    f"{running} jobs are running, the most this worker allows "
                    f"([jobs].max_concurrent); retry when one ends"
                )
            job_id = str(uuid.uuid4())
            record = JobRecord(
                job_id=job_id,
                command=command,
                path=path,
                args=args,
                state=JobState.RUNNING,
                timeout_s=timeout,
                idempotency_key=idempotency_key,
                started_at=self.ops.now(),
            )
            # The output log is opened when the first output arrives.
            directory = self.jobs_dir / job_id
            job = _Job(record, directory, self._output(directory))
            self._jobs[job_id] = job
            self._active.add(job)
            if idempotency_key:
                self._by_key[idempotency_key] = job_id
            # From here on the job must end, whatever fails.
            spawn_started = time.perf_counter()
            failure = self._launch(job, [exe, str(script), *args], timeout)
            if failure is not None and job.proc is None:
                self._end_unstarted(job, failure)  # nothing runs: cheap
                return self._snapshot(job), False
        if failure is not None:
            # A process runs but cannot be watched: kill it and wait for it
            # here, outside the lock, so other requests do not wait with it.
            self._abandon(job, failure)
            return self._snapshot(job), False
        metrics.SPAWN_SECONDS.observe(time.perf_counter() - spawn_started)
        log.info(
            "job %s started: %s %s (pid %d)",
            job_id,
            command,
            path,
            record.pid,
            extra={"JOB_ID": job_id},
        )
        return self._snapshot(job), False

    def _launch(self, job: _Job, argv: list[str], timeout: int) -> str | None:
        """Record, spawn and hand a job to the reactor; None, or why it failed.

        The job's first record is written before its process exists: should
        the worker die at any point after start() returned, its next run
        knows the job (as lost) and its idempotency key.
        """
        stage = "record"
        try:
            self._records.write(job.record.to_json())
            stage = "spawn"
            self._spawn(job, argv)
            stage = "watch"
            job.exit_fd = self.ops.exit_fd(job.record.pid)
            if timeout:
                job.timers.append(
                    self._reactor.call_later(
                        timeout, self._job_event, job, self._on_timeout
                    )
                )
            self._reactor.call_soon(self._job_event, job, self._watch)
            return None
        except Exception as exc:  # noqa: BLE001 - the job is ended by the caller
            if not isinstance(exc, (OSError, RuntimeError)):
                log.exception("job %s: starting it failed", job.record.job_id)
            detail = getattr(exc, "strerror", None) or str(exc)
            if stage == "record":
                return f"could not record the job: {detail}"
            if stage == "spawn" and isinstance(exc, OSError) and not exc.filename:
                # Not the exec: what the child had to do before it, or a
                # descriptor the worker could not get.
                return f"could not start the job: {detail}"
            if stage == "spawn":
                return f"could not execute {argv[0]}: {detail}"
            return f"the worker could not watch the job: {detail}"

    def _end_unstarted(self, job: _Job, text: str) -> None:
        """End a job whose process never started."""
        try:
            if job.status_fd is not None:
                os.close(job.status_fd)
                job.status_fd = None
            self.isolation.release(job.record.job_id)  # its cgroup, if made
        except Exception:  # noqa: BLE001 - end the job regardless
            log.exception("job %s: cleaning up after it failed", job.record.job_id)
        finally:
            self._finish(job, ExitReason.START_FAILED, text, None)

    def _spawn(self, job: _Job, argv: list[str]) -> None:
        _check_executable(argv[0])
        procs = self.isolation.prepare(job.record.job_id)
        env = self._environment(job.record.job_id)
        if self.ops.native:
            job.proc = self.ops.spawn(
                argv,
                cwd=str(self.scripts_dir),
                env=env,
                user=self._user,
                group=self._group,
                cgroup_procs=None if procs == "-" else procs,
            )
            self._spawned(job)
            return
        # The job's program runs with the job's user only, through setpriv:
        # no uid switch in the forked child lets subprocess use vfork.
        priv = []
        if self._setpriv is not None:
            priv = [
                self._setpriv,
                f"--reuid={self._user}",
                f"--regid={self._group}",
                "--clear-groups",
                "--",
            ]
        if procs == "-":
            job.proc = self.ops.spawn(
                [*priv, *argv],
                cwd=str(self.scripts_dir),
                env=env,
                # Without setpriv (not installed), the child switches itself.
                user=self._user if not priv else None,
                group=self._group if not priv else None,
            )
            self._spawned(job)
        else:
            status_r, status_w = os.pipe()
            # The shim needs the worker's privileges to join the cgroup.
            shim = ["/bin/sh", "-c", SHIM, "jobgate-job", procs, *priv, *argv]
            try:
                job.proc = self.ops.spawn(
                    shim,
                    cwd=str(self.scripts_dir),
                    env=env,
                    user=None,
                    group=None,
                    stdin=status_w,
                )
            except BaseException:
                os.close(status_r)
                raise
            finally:
                os.close(status_w)
            self._spawned(job)
            job.status_fd = status_r
            # Read only once the shim has exited; never wait on it.
            os.set_blocking(status_r, False)

    @staticmethod
    def _spawned(job: _Job) -> None:
        assert job.proc is not None and job.proc.stdout is not None
        job.record.pid = job.proc.pid
        job.out_fd = job.proc.stdout.fileno()
        job.reaped = job.sealed = False

    def _abandon(self, job: _Job, text: str) -> None:
        """End a job whose process runs but cannot be watched (no descriptor left).

        Never under ``_lock``: killing and reaping may take a moment, and the
        job's cgroup up to ``CGROUP_REMOVE_S`` to empty.
        """
        jid = job.record.job_id
        log.error("job %s: %s; killing it", jid, text, extra={"JOB_ID": jid})
        try:
            if not self._teardown(job):
                self.isolation.cleanup(jid)
        except Exception:  # noqa: BLE001 - record the end regardless
            log.exception("job %s: cleaning up after it failed", jid)
        finally:
            self._finish(job, ExitReason.START_FAILED, text, None)

    def get(self, job_id: str) -> JobRecord:
        return self._snapshot(self._job(job_id))

    def wait(self, job_id: str, timeout_s: float) -> JobRecord:
        """The job's record once it has ended, or after ``timeout_s``."""
        job = self._job(job_id)
        job.done.wait(min(max(timeout_s, 0.0), self.cfg.max_wait_s))
        return self._snapshot(job)

    def list(self) -> list[JobRecord]:
        with self._lock:
            jobs = list(self._jobs.values())
        records = [self._snapshot(j) for j in jobs]
        records.sort(key=lambda r: r.started_at, reverse=True)
        return records

    def responsive(self, timeout: float = 5.0) -> bool:
        """False if the runner hangs: its lock cannot be taken in ``timeout``,
        or its reactor does not run a call in what is left of it.
        """
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        ran = threading.Event()
        try:
            self._reactor.call_soon(ran.set)
        except RuntimeError:
            return True  # shut down: there is nothing left to watch
        return ran.wait(max(0.0, deadline - time.monotonic()))

    def running_count(self) -> int:
        return len(self._active)

    def stop(
        self, job_id: str, grace_s: float = 0, *, requested_by: str = ""
    ) -> JobRecord:
        """Stop a job: SIGTERM to all its processes, SIGKILL after the grace period.

        Returns the final record. Stopping a job that already ended returns its
        record unchanged.
        """
        job = self._job(job_id)
        if grace_s < 0:
            raise InvalidArgument("grace_s must not be negative")
        who = requested_by or "an unnamed client"
        self._terminate(
            job,
            ExitReason.STOPPED,
            f"stopped on request by {who}",
            grace_s,
            requested_by=who,
        )
        # A job that ended just before (still draining its output) finishes
        # on its own; the answer is its final record either way.
        job.done.wait()
        return self._snapshot(job)

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop every running job (the worker is going away).

        From the moment it takes the lock, start() refuses: a job started
        after the running ones are collected would be left unwatched.
        """
        with self._lock:
            self._closing = True
            running = [j for j in self._jobs.values() if not j.done.is_set()]
        grace = grace_s if grace_s is not None else self.cfg.stop_grace_s
        for j in running:
            try:
                self._terminate(
                    j,
                    ExitReason.STOPPED,
                    "stopped because the worker shut down",
                    grace,
                    requested_by="the worker (shutdown)",
                )
            except Exception:  # noqa: BLE001 - go on stopping the others
                log.exception("job %s: stopping it failed", j.record.job_id)
        for j in running:
            j.done.wait()
        self._closed.set()
        self._reactor.close()
        self.isolation.close()
        self._records.close()

    def read_output(
        self,
        job_id: str,
        offset: int = 0,
        follow: bool = False,
        cancelled: Callable[[], bool] = lambda: False,
        keepalive_s: float | None = None,
    ) -> Iterator[tuple[int, bytes, int]]:
        """Yield ``(offset, data, skipped)`` chunks of the job's output.

        ``skipped`` counts bytes before ``offset`` that the output cap dropped.
        With ``follow``, waits for more output until the job has ended and all
        of it was yielded; ``cancelled`` is checked whenever the job's
        condition is notified (:meth:`wake` notifies it). With ``keepalive_s``,
        a follower that waited that long for output yields ``(offset, b"", 0)``
        so the other end can tell a quiet job from a dead connection.
        """
        job = self._job(job_id)
        if offset < 0:
            raise InvalidArgument("offset must not be negative")
        chunk = self.cfg.read_chunk_bytes
        pos = offset
        while True:
            idle = False
            with job.cond:
                while (
                    follow
                    and not job.sealed
                    and job.output.total <= pos
                    and not cancelled()
                ):
                    if not job.cond.wait(keepalive_s) and keepalive_s is not None:
                        idle = True
                        break
                sealed = job.sealed
                available = job.output.total
            if cancelled():
                return
            if pos >= available:
                if sealed or not follow:
                    return
                if idle:
                    yield pos, b"", 0
                continue
            start, data = job.output.read(pos, chunk, available)
            if not data:
                return  # nothing readable where the record says there is
            yield start, data, start - pos
            pos = start + len(data)

    def wake(self, job_id: str) -> None:
        """Wake the followers of a job so they re-check cancellation."""
        job = self._jobs.get(job_id)
        if job is not None:
            with job.cond:
                job.cond.notify_all()

    # -- internals --------------------------------------------------------------

    def _job(self, job_id: str) -> _Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} on this worker")
        return job

    def _snapshot(self, job: _Job) -> JobRecord:
        with job.cond:
            r = copy.copy(job.record)  # dataclasses.replace costs 5x more
            r.args = list(r.args)
            if not job.sealed:
                r.output_bytes = job.output.total
                r.output_dropped_bytes = job.output.dropped
            return r

    def _terminate(
        self,
        job: _Job,
        reason: ExitReason,
        text: str,
        grace_s: float,
        requested_by: str = "",
    ) -> None:
        """SIGTERM to all the job's processes now, SIGKILL after the grace.

        Returns at once; the reactor holds the deadline. Waiting for the job
        to end is up to the caller (``job.done``).
        """
        grace = grace_s or self.cfg.stop_grace_s
        jid = job.record.job_id
        with job.cond:
            if job.done.is_set() or job.proc is None or job.reaped or job.concluded:
                return  # ended already (perhaps still draining its output)
            if job.stop_reason is None:
                job.stop_reason, job.stop_text = reason, text
                if requested_by:
                    job.record.stopped_by = requested_by
                    job.record.stopped_at = self.ops.now()
            log.info(
                "job %s: %s; SIGTERM to all its processes",
                jid,
                text,
                extra={"JOB_ID": jid},
            )
            self.isolation.signal(jid, job.proc.pid, signal.SIGTERM)
            try:
                timer = self._reactor.call_later(
                    grace, self._job_event, job, self._escalate, grace
                )
            except RuntimeError:  # the reactor is closed: no grace to wait out
                self.isolation.kill_all(jid, job.proc.pid)
                return
            job.timers.append(timer)

    # -- on the reactor's thread -----------------------------------------------
    #
    # Every job event goes through _job_event: an error ends that job (as
    # lost) instead of leaving it running for ever, and the reactor goes on
    # serving the others.

    def _job_event(self, job: _Job, handler: Callable, *args) -> None:
        try:
            handler(job, *args)
        except Exception as exc:  # noqa: BLE001 - see above
            self._fail(job, exc)

    def _watch(self, job: _Job) -> None:
        if job.concluded or job.done.is_set():
            return
        assert job.out_fd is not None and job.exit_fd is not None
        os.set_blocking(job.out_fd, False)
        self._reactor.add_reader(
            job.out_fd, functools.partial(self._job_event, job, self._on_output)
        )
        self._reactor.add_reader(
            job.exit_fd, functools.partial(self._job_event, job, self._on_exit)
        )

    def _escalate(self, job: _Job, grace: float) -> None:
        jid = job.record.job_id
        with job.cond:
            if job.reaped or job.proc is None or job.concluded:
                return
            log.info(
                "job %s still running after %.1fs; SIGKILL",
                jid,
                grace,
                extra={"JOB_ID": jid},
            )
            self.isolation.kill_all(jid, job.proc.pid)

    def _on_timeout(self, job: _Job) -> None:
        self._terminate(
            job,
            ExitReason.TIMED_OUT,
            f"ran longer than its timeout of {job.record.timeout_s}s",
            self.cfg.stop_grace_s,
        )

    def _read_once(self, job: _Job) -> bool:
        """Copy one chunk of the pipe into the output; False if none is there."""
        fd = job.out_fd
        if fd is None:
            return False
        try:
            data = os.read(fd, self.cfg.read_chunk_bytes)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._output_failed(job, exc)
            return False
        if not data:
            self._close_output(job)
            return False
        try:
            with job.cond:
                job.output.append(data)
                job.cond.notify_all()
        except OSError as exc:  # e.g. the disk is full
            self._output_failed(job, exc)
            return False
        metrics.OUTPUT_BYTES.inc(len(data))
        return True

    def _on_output(self, job: _Job) -> None:
        self._read_once(job)

    def _output_failed(self, job: _Job, exc: OSError) -> None:
        log.error(
            "job %s: reading output failed: %s",
            job.record.job_id,
            exc,
            extra={"JOB_ID": job.record.job_id},
        )
        self._close_output(job)

    def _close_output(self, job: _Job) -> None:
        """Stop reading the pipe; once the job is reaped too, record its end."""
        if job.out_fd is not None:
            self._reactor.remove_reader(job.out_fd)
            job.out_fd = None
            assert job.proc is not None and job.proc.stdout is not None
            job.proc.stdout.close()
        job.drained = True
        if job.reaped:
            self._release(job, time.monotonic() + CGROUP_REMOVE_S, 0.001)

    def _on_exit(self, job: _Job) -> None:
        if job.exit_fd is None:
            return  # the job was torn down earlier in this round
        proc = job.proc
        assert proc is not None
        fd, job.exit_fd = job.exit_fd, None
        self._reactor.remove_reader(fd)
        os.close(fd)
        jid = job.record.job_id
        with job.cond:
            # The main process is a zombie, so its pid still names the job's
            # process group: end what the job left behind before it is reaped.
            self.isolation.kill_all(jid, proc.pid)
            job.returncode = proc.wait()
            job.reaped = True
            # The job has ended: a timeout or stop from now on is too late.
            timers, job.timers = job.timers, []
        for timer in timers:
            timer.cancel()
        if job.drained:
            self._release(job, time.monotonic() + CGROUP_REMOVE_S, 0.001)
        else:
            job.timers.append(
                self._reactor.call_later(
                    self.cfg.drain_timeout_s, self._job_event, job, self._drain_expired
                )
            )

    def _drain_expired(self, job: _Job) -> None:
        # What is in the pipe now was written before the deadline: keep it,
        # within reason (a process left behind may still be writing).
        for _ in range(16):
            if not self._read_once(job):
                break
        self._close_output(job)

    def _release(self, job: _Job, deadline: float, delay: float) -> None:
        """Remove the job's cgroup once it is empty (retried), then record the end."""
        if job.concluded:
            return
        for timer in job.timers:
            timer.cancel()
        job.timers = []
        jid = job.record.job_id
        if not self.isolation.release(jid):
            if time.monotonic() < deadline:
                job.timers.append(
                    self._reactor.call_later(
                        delay,
                        self._job_event,
                        job,
                        self._release,
                        deadline,
                        min(delay * 2, 0.1),
                    )
                )
                return
            log.warning(
                "could not remove the cgroup of job %s: processes are still in it",
                jid,
                extra={"JOB_ID": jid},
            )
        job.concluded = True
        assert job.returncode is not None
        start_error = self._start_error(job)
        if start_error:
            self._finish(job, ExitReason.START_FAILED, start_error, job.returncode)
        else:
            self._finish(job, *self._outcome(job, job.returncode), job.returncode)

    def _fail(self, job: _Job, exc: Exception) -> None:
        """Something went wrong watching a job: end it rather than lose it."""
        jid = job.record.job_id
        if job.done.is_set():
            log.warning(
                "job %s: an event after its end failed: %r",
                jid,
                exc,
                extra={"JOB_ID": jid},
            )
            return
        log.error(
            "job %s: watching it failed: %s; ending it",
            jid,
            exc,
            exc_info=exc,
            extra={"JOB_ID": jid},
        )
        try:
            self._teardown(job)
        except Exception:  # noqa: BLE001 - record the end regardless
            log.exception("job %s: cleaning up after it failed", jid)
        finally:
            self._finish(
                job,
                ExitReason.LOST,
                f"the worker lost track of the job: {exc}",
                job.returncode,
            )

    def _teardown(self, job: _Job) -> bool:
        """Kill and reap what is left of a job and close its descriptors.

        Each step runs whatever the others do, so a failing one leaks
        nothing. Returns whether the job's cgroup (if any) could be removed.
        """
        jid = job.record.job_id
        errors: list[BaseException] = []

        def attempt(fn: Callable, *args) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - raised after the rest
                errors.append(exc)

        with job.cond:
            # From now on no stop or timeout signals the job's pid.
            job.concluded = True
            timers, job.timers = job.timers, []
        for timer in timers:
            attempt(timer.cancel)
        if job.out_fd is not None:
            attempt(self._reactor.remove_reader, job.out_fd)
            job.out_fd = None
            if job.proc is not None and job.proc.stdout is not None:
                attempt(job.proc.stdout.close)
        for name in ("exit_fd", "status_fd"):
            fd = getattr(job, name)
            if fd is not None:
                setattr(job, name, None)
                if name == "exit_fd":
                    attempt(self._reactor.remove_reader, fd)
                attempt(os.close, fd)
        proc = job.proc
        if proc is not None and not job.reaped:
            attempt(self.isolation.kill_all, jid, proc.pid)
            try:
                job.returncode = proc.wait(timeout=1.0)
                job.reaped = True
            except subprocess.TimeoutExpired:
                # Not reaped: its pid stays the job's, never another's. It is
                # reaped once it dies (a process in an uninterruptible sleep
                # takes SIGKILL only when it wakes).
                log.error(
                    "job %s: its process %d did not die; it is reaped when it does",
                    jid,
                    proc.pid,
                    extra={"JOB_ID": jid},
                )
                try:
                    self._reactor.call_later(REAP_LATER_S, self._reap_later, job)
                except RuntimeError:
                    pass  # the worker is stopping: init reaps it after us
            except Exception as exc:  # noqa: BLE001 - raised after the rest
                errors.append(exc)
        released = False
        try:
            released = self.isolation.release(jid)
        except Exception as exc:  # noqa: BLE001 - raised after the rest
            errors.append(exc)
        if errors:
            raise errors[0]
        return released

    def _reap_later(self, job: _Job, delay: float = REAP_LATER_S) -> None:
        """Reap the process of an ended job that outlived its SIGKILL."""
        assert job.proc is not None
        try:
            returncode = job.proc.poll()
        except OSError as exc:
            log.warning("job %s: reaping its process: %s", job.record.job_id, exc)
            return
        if returncode is None:
            self._reactor.call_later(
                delay, self._reap_later, job, min(delay * 2, REAP_LATER_MAX_S)
            )
            return
        with job.cond:
            job.reaped = True
        log.info(
            "job %s: its process %d ended at last and was reaped",
            job.record.job_id,
            job.proc.pid,
            extra={"JOB_ID": job.record.job_id},
        )

    def _start_error(self, job: _Job) -> str:
        if job.status_fd is None:
            return ""
        try:
            data = os.read(job.status_fd, 4096).decode(errors="replace")
        except BlockingIOError:
            data = ""
        finally:
            os.close(job.status_fd)
            job.status_fd = None
        if not data:
            return ""
        return "could not move the job into its cgroup"

    def _finish(
        self, job: _Job, reason: ExitReason, text: str, returncode: int | None
    ) -> None:
        r = job.record
        with job.cond:
            # Whatever fails here, the job ends: followers, stop(), shutdown()
            # and the running count never wait on it.
            try:
                job.sealed = True
                try:
                    job.output.close()
                except OSError as exc:
                    log.error("job %s: closing its output: %s", r.job_id, exc)
                if returncode is not None and returncode < 0:
                    r.signal = -returncode
                elif returncode is not None:
                    r.exit_code = returncode
                check_transition(r.state, reason.state)
                r.state, r.exit_reason, r.reason = reason.state, reason, text
                r.ended_at = self.ops.now()
                r.output_bytes = job.output.total
                r.output_dropped_bytes = job.output.dropped
                if r.output_dropped_bytes:
                    r.reason += (
                        f"; {r.output_dropped_bytes} bytes of output were dropped "
                        "between the kept head and tail"
                    )
                try:
                    self._records.write(r.to_json())
                except OSError as exc:  # e.g. the disk is full
                    log.error(
                        "job %s: could not record its end on disk: %s",
                        r.job_id,
                        exc,
                        extra={"JOB_ID": r.job_id},
                    )
            finally:
                job.cond.notify_all()
                self._active.discard(job)
                job.done.set()
        metrics.JOBS_FINISHED.labels(reason.value).inc()
        metrics.JOB_SECONDS.labels(reason.value).observe(r.ended_at - r.started_at)
        log.info(
            "job %s ended: %s (%s)",
            r.job_id,
            r.state.value,
            r.reason,
            extra={"JOB_ID": r.job_id},
        )

    @staticmethod
    def _outcome(job: _Job, returncode: int) -> tuple[ExitReason, str]:
        if job.stop_reason is not None:
            return job.stop_reason, job.stop_text
        if returncode == 0:
            return ExitReason.SUCCEEDED, "exited with code 0"
        if returncode > 0:
            return ExitReason.FAILED, f"exited with code {returncode}"
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return ExitReason.KILLED, f"killed by {name}"

    # -- retention --------------------------------------------------------------

    def _retention_loop(self) -> None:
        while not self._closed.wait(self.cfg.retention_interval_s):
            try:
                self.enforce_retention()
            except Exception:  # noqa: BLE001 - keep retention alive; log once each
                log.exception("retention failed")

    def enforce_retention(self) -> list[str]:
        """Delete finished jobs beyond the configured age and count.

        Records leave the index under the lock; their files are removed after,
        so requests never wait on the disk. Returns the ids removed.
        """
        now = self.ops.now()
        with self._lock:
            finished = sorted(
                (j for j in self._jobs.values() if j.done.is_set()),
                key=lambda j: j.record.ended_at or j.record.started_at,
            )
            excess = max(0, len(finished) - self.cfg.retention_max_jobs)
            doomed = finished[:excess] + [
                j
                for j in finished[excess:]
                if now - (j.record.ended_at or j.record.started_at)
                > self.cfg.retention_max_age_s
            ]
            for j in doomed:
                del self._jobs[j.record.job_id]
                if j.record.idempotency_key:
                    self._by_key.pop(j.record.idempotency_key, None)
        if doomed:
            try:
                self._records.remove(j.record.job_id for j in doomed)
            except OSError as exc:  # they come back after a restart, no worse
                log.error("retention could not record what it removed: %s", exc)
        for j in doomed:
            shutil.rmtree(j.dir, ignore_errors=True)
        if doomed:
            log.info("retention removed %d finished jobs", len(doomed))
        return [j.record.job_id for j in doomed]


def _check_executable(path: str) -> None:
    """Raise the OSError an exec of ``path`` would meet, before spawning."""
    st = os.stat(path)  # ENOENT, ENOTDIR, ELOOP ...
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
