"""Runs jobs: spawning, output capture, following, stopping, history.

Each job is a script from the scripts directory run by an allow-listed
interpreter, in its own session and process group, with stdin from /dev/null
and a scrubbed environment. Its stdout and stderr share one pipe, so the
output keeps the order in which the job wrote it. A reader thread copies the
pipe to ``<state_dir>/jobs/<id>/output.log`` and wakes the followers waiting on
the job's condition variable; nobody polls.

A waiter thread notices the main process exit without reaping it
(``waitid(WNOWAIT)``), kills whatever is left of the process group while the
group id still belongs to the job, reaps, lets the reader drain the pipe (for
at most ``drain_timeout_s``), and only then records the end state. So a job
that is reported ended has no process left in its group and no output still
to come.

OS effects (spawn, signals, clock) go through :class:`ProcessOps` so tests can
replace them; the tests also run the real thing.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import pwd
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from jobgate.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from jobgate.jobstate import JobState, check_transition
from worker.config import JobsSection

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclasses.dataclass
class JobRecord:
    """What is known and persisted about one job (``job.json``)."""

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
    output_bytes: int = 0
    timeout_s: int = 0
    idempotency_key: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_json(cls, d: dict) -> JobRecord:
        d = dict(d)
        d["state"] = JobState(d["state"])
        return cls(**d)


class ProcessOps:
    """The runner's seam to the operating system."""

    def spawn(self, argv, *, cwd, env, user, group) -> subprocess.Popen:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
        )

    def killpg(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def wait_exit(self, pid: int) -> None:
        """Block until ``pid`` exits, leaving it unreaped (a zombie)."""
        while True:
            try:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
                return
            except ChildProcessError:
                return
            except InterruptedError:
                continue

    def now(self) -> float:
        return time.time()


class _Job:
    """A job and the synchronisation around it."""

    def __init__(self, record: JobRecord, directory: Path):
        self.record = record
        self.dir = directory
        self.output_path = directory / "output.log"
        self.cond = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self.reaped = True  # no live process group unless spawned
        self.sealed = True  # no more output unless spawned
        self.stop_state: JobState | None = None
        self.stop_reason = ""
        self.done = threading.Event()
        self.timer: threading.Timer | None = None
        if record.state.is_terminal():
            self.done.set()


class JobRunner:
    """Starts, stops and reports jobs on this worker."""

    def __init__(
        self, cfg: JobsSection, worker_name: str = "", ops: ProcessOps | None = None
    ):
        self.cfg = cfg
        self.worker_name = worker_name
        self.ops = ops or ProcessOps()
        self.jobs_dir = cfg.state_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.scripts_dir = cfg.scripts_dir.resolve()
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._by_key: dict[str, str] = {}
        self._user, self._group, self._home = self._job_account()
        self._load_history()

    # -- set-up -------------------------------------------------------------

    def _job_account(self) -> tuple[int | None, int | None, str]:
        if os.geteuid() != 0:
            return None, None, str(self.scripts_dir)
        try:
            pw = pwd.getpwnam(self.cfg.user)
        except KeyError:
            raise FailedPrecondition(
                f"[jobs].user: no such account {self.cfg.user!r} on this host"
            ) from None
        if pw.pw_uid == 0:
            raise FailedPrecondition(
                f"[jobs].user: {self.cfg.user!r} is root; jobs never run as root"
            )
        return pw.pw_uid, pw.pw_gid, pw.pw_dir

    def _load_history(self) -> None:
        """Read the records a previous run left; jobs it was running are lost."""
        for path in sorted(self.jobs_dir.glob("*/job.json")):
            try:
                record = JobRecord.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.warning("ignoring unreadable job record %s: %s", path, exc)
                continue
            if record.state is JobState.RUNNING:
                record.state = JobState.LOST
                record.ended_at = self.ops.now()
                record.reason = "the worker stopped while the job was running"
                try:
                    record.output_bytes = (path.parent / "output.log").stat().st_size
                except OSError:
                    pass
                self._persist(path.parent, record)
            job = _Job(record, path.parent)
            self._jobs[record.job_id] = job
            if record.idempotency_key:
                self._by_key[record.idempotency_key] = record.job_id
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
        real = Path(os.path.realpath(self.scripts_dir / path))
        if os.path.commonpath([real, self.scripts_dir]) != str(self.scripts_dir):
            raise PermissionDenied(f"path {path!r} is outside the scripts directory")
        if not real.is_file():
            raise InvalidArgument(f"no script {path!r} in the scripts directory")
        return real

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
            if idempotency_key and idempotency_key in self._by_key:
                return self._snapshot(self._jobs[self._by_key[idempotency_key]]), True
            running = sum(not j.done.is_set() for j in self._jobs.values())
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
            directory = self.jobs_dir / job_id
            directory.mkdir(mode=0o750)
            job = _Job(record, directory)
            job.done.clear()
            job.output_path.touch(mode=0o640)
            try:
                job.proc = self.ops.spawn(
                    [exe, str(script), *args],
                    cwd=str(self.scripts_dir),
                    env=self._environment(job_id),
                    user=self._user,
                    group=self._group,
                )
            except OSError as exc:
                record.state = JobState.FAILED
                record.ended_at = self.ops.now()
                record.reason = (
                    f"could not start {exe}: {os.strerror(exc.errno or errno.EIO)}"
                )
                self._persist(directory, record)
                job.done.set()
                self._jobs[job_id] = job
                raise FailedPrecondition(record.reason) from None
            record.pid = job.proc.pid
            job.reaped = job.sealed = False
            self._jobs[job_id] = job
            if idempotency_key:
                self._by_key[idempotency_key] = job_id
            self._persist(directory, record)
        log.info(
            "job %s started: %s %s (pid %d)",
            job_id,
            command,
            path,
            record.pid,
            extra={"JOB_ID": job_id},
        )
        reader = threading.Thread(
            target=self._read_output, args=(job,), name=f"out-{job_id[:8]}", daemon=True
        )
        reader.start()
        threading.Thread(
            target=self._wait,
            args=(job, reader),
            name=f"wait-{job_id[:8]}",
            daemon=True,
        ).start()
        if timeout:
            job.timer = threading.Timer(timeout, self._on_timeout, args=(job,))
            job.timer.daemon = True
            job.timer.start()
        return self._snapshot(job), False

    def get(self, job_id: str) -> JobRecord:
        return self._snapshot(self._job(job_id))

    def list(self) -> list[JobRecord]:
        with self._lock:
            jobs = list(self._jobs.values())
        records = [self._snapshot(j) for j in jobs]
        records.sort(key=lambda r: r.started_at, reverse=True)
        return records

    def responsive(self, timeout: float = 5.0) -> bool:
        """False if the runner's lock cannot be taken in ``timeout`` (a hang)."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True

    def running_count(self) -> int:
        with self._lock:
            return sum(not j.done.is_set() for j in self._jobs.values())

    def stop(self, job_id: str, grace_s: float = 0, *, reason: str = "") -> JobRecord:
        """Stop a job: SIGTERM to its group, SIGKILL after the grace period.

        Returns the final record. Stopping a job that already ended returns its
        record unchanged.
        """
        job = self._job(job_id)
        if grace_s < 0:
            raise InvalidArgument("grace_s must not be negative")
        self._terminate(job, JobState.STOPPED, reason or "stopped on request", grace_s)
        return self._snapshot(job)

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop every running job (the worker is going away)."""
        with self._lock:
            running = [j for j in self._jobs.values() if not j.done.is_set()]
        threads = [
            threading.Thread(
                target=self._terminate,
                args=(
                    j,
                    JobState.STOPPED,
                    "stopped because the worker shut down",
                    grace_s if grace_s is not None else self.cfg.stop_grace_s,
                ),
            )
            for j in running
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def read_output(
        self,
        job_id: str,
        offset: int = 0,
        follow: bool = False,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[tuple[int, bytes]]:
        """Yield ``(offset, data)`` chunks of the job's output from ``offset``.

        With ``follow``, waits for more output until the job has ended and all
        of it was yielded; ``cancelled`` is checked whenever the job's
        condition is notified (call :meth:`wake` to notify it).
        """
        job = self._job(job_id)
        if offset < 0:
            raise InvalidArgument("offset must not be negative")
        chunk = self.cfg.read_chunk_bytes
        with open(job.output_path, "rb") as f:
            pos = offset
            f.seek(pos)
            while True:
                with job.cond:
                    while (
                        follow
                        and not job.sealed
                        and job.record.output_bytes <= pos
                        and not cancelled()
                    ):
                        job.cond.wait()
                    sealed = job.sealed
                    available = job.record.output_bytes
                if cancelled() or pos >= available:
                    # Nothing more now: done unless following a live job.
                    if cancelled() or sealed or not follow:
                        return
                    continue
                data = f.read(min(chunk, available - pos))
                if not data:  # the file is shorter than recorded; never spin
                    return
                yield pos, data
                pos += len(data)

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
            return dataclasses.replace(job.record, args=list(job.record.args))

    def _persist(self, directory: Path, record: JobRecord) -> None:
        tmp = directory / "job.json.tmp"
        tmp.write_text(json.dumps(record.to_json()))
        os.replace(tmp, directory / "job.json")

    def _signal(self, job: _Job, sig: int) -> None:
        with job.cond:
            if not job.reaped and job.proc is not None:
                self.ops.killpg(job.proc.pid, sig)

    def _terminate(self, job: _Job, state: JobState, reason: str, grace_s: float):
        with job.cond:
            if job.done.is_set() or job.proc is None:
                return
            if job.stop_state is None:
                job.stop_state, job.stop_reason = state, reason
        grace = grace_s or self.cfg.stop_grace_s
        log.info(
            "job %s: %s; SIGTERM to its process group",
            job.record.job_id,
            reason,
            extra={"JOB_ID": job.record.job_id},
        )
        self._signal(job, signal.SIGTERM)
        if not job.done.wait(grace):
            log.info(
                "job %s still running after %.1fs; SIGKILL",
                job.record.job_id,
                grace,
                extra={"JOB_ID": job.record.job_id},
            )
            self._signal(job, signal.SIGKILL)
            job.done.wait()

    def _on_timeout(self, job: _Job) -> None:
        self._terminate(
            job,
            JobState.TIMED_OUT,
            f"ran longer than its timeout of {job.record.timeout_s}s",
            self.cfg.stop_grace_s,
        )

    def _read_output(self, job: _Job) -> None:
        assert job.proc is not None and job.proc.stdout is not None
        fd = job.proc.stdout.fileno()
        chunk = self.cfg.read_chunk_bytes
        try:
            with open(job.output_path, "ab", buffering=0) as out:
                while True:
                    data = os.read(fd, chunk)
                    if not data:
                        break
                    with job.cond:
                        if job.sealed:
                            break  # the job was recorded as ended: drop late output
                        out.write(data)
                        job.record.output_bytes += len(data)
                        job.cond.notify_all()
        except OSError as exc:
            log.error("job %s: reading output failed: %s", job.record.job_id, exc)
        finally:
            job.proc.stdout.close()

    def _wait(self, job: _Job, reader: threading.Thread) -> None:
        proc = job.proc
        assert proc is not None
        self.ops.wait_exit(proc.pid)
        with job.cond:
            # The leader is a zombie, so its pid still names the group: kill
            # what the job left behind before the id can be reused.
            self.ops.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
            job.reaped = True
        reader.join(self.cfg.drain_timeout_s)
        if job.timer is not None:
            job.timer.cancel()
        with job.cond:
            job.sealed = True
            r = job.record
            if returncode < 0:
                r.signal = -returncode
            else:
                r.exit_code = returncode
            new_state, r.reason = self._outcome(job, returncode)
            check_transition(r.state, new_state)
            r.state = new_state
            r.ended_at = self.ops.now()
            self._persist(job.dir, r)
            job.cond.notify_all()
        job.done.set()
        log.info(
            "job %s ended: %s (%s)",
            r.job_id,
            r.state.value,
            r.reason,
            extra={"JOB_ID": r.job_id},
        )

    @staticmethod
    def _outcome(job: _Job, returncode: int) -> tuple[JobState, str]:
        if job.stop_state is not None:
            return job.stop_state, job.stop_reason
        if returncode == 0:
            return JobState.SUCCEEDED, "exited with code 0"
        if returncode > 0:
            return JobState.FAILED, f"exited with code {returncode}"
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return JobState.FAILED, f"killed by {name}"
