"""The job runner: a registry of jobs, admission, and the wiring around them.

A start is checked (:mod:`worker.validation`), admitted (not shutting down,
below ``[jobs].max_concurrent``, a new idempotency key), recorded
(:mod:`worker.records`), spawned (:mod:`worker.process`, in its own cgroup
where the host allows, :mod:`worker.isolation`) and handed to the reactor.
Each job's lifecycle is the explicit state machine of :mod:`worker.job`;
this module performs what the machine decides (signals, reaping, recording)
and feeds it the events it sees. Earlier runs' jobs and retention are in
:mod:`worker.history`.

One thread per runner, the :class:`~worker.reactor.Reactor`, watches every
running job, however many there are; what it does for each job is in
:mod:`worker.watcher`. A job's user id and private directory come from
:mod:`worker.accounts`, its limits from :mod:`worker.limits`, and whether
the worker can take jobs at all from :mod:`worker.health` and
:mod:`worker.drain`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from jobgate.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from jobgate.jobstate import ExitReason, JobState
from worker import history, isolation, linux, metrics, watcher
from worker.accounts import Accounts
from worker.config import JobsSection
from worker.drain import Drain, DrainState
from worker.health import Health
from worker.job import Job, JobRecord, Phase
from worker.kept import EXIT_FILE
from worker.limits import NAMES as LIMIT_NAMES
from worker.limits import Enforcer, Limits
from worker.output import (
    DATA_NAME,
    EXIT_TMP_NAME,
    KeptOutput,
    OutputLog,
    prepare_jobs_dir,
    read_chunks,
)
from worker.process import (
    SAFE_PATH,
    KeptProcess,
    ProcessOps,
    Spawner,
    start_error_text,
)
from worker.reactor import Reactor
from worker.records import RecordLog
from worker.validation import Validator
from worker.watcher import Watcher

__all__ = ["SAFE_PATH", "JobRecord", "JobRunner", "ProcessOps"]

log = logging.getLogger(__name__)


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
        self.validator = Validator(cfg)
        self.scripts_dir = self.validator.scripts_dir
        # What is made from here on is undone if a later step fails (a
        # setting the host cannot honour, say): a worker that refuses to
        # start leaves no cgroup, thread or keeper server behind.
        with contextlib.ExitStack() as undo:
            # The jobs of the worker's earlier run first: the kept ones still
            # running keep their cgroups and user ids (everything else an
            # earlier run left is swept away below).
            self._records = RecordLog(self.jobs_dir)
            undo.callback(self._records.close)
            self._alive = history.AliveStamp(cfg.state_dir)
            adoption_began = time.monotonic()
            self._boot = linux.boot_id()
            loaded = history.load(
                self._records, self.jobs_dir, self._output, self._alive.last()
            )
            adopt, ended_away = self._survivors(loaded)
            keep = {j.record.job_id for j in adopt}
            instance = isolation.instance_name(worker_name, cfg.state_dir)
            self.isolation = isolation.choose(
                isolation_mode or cfg.isolation, instance, keep
            )
            undo.callback(self.isolation.close)
            v2_base = getattr(self.isolation, "base", None)
            self.enforcer = Enforcer.discover(
                instance,
                v2_base,
                (lambda job_id: f"{v2_base}/{job_id}") if v2_base is not None else None,
                keep,
            )
            undo.callback(self.enforcer.close)
            self._check_limit_settings()
            log.info("%s", self.enforcer.describe())
            self.accounts = Accounts(
                cfg,
                instance,
                contained=self.isolation.name == "cgroup",
                keep={j.record.job_id for j in adopt + ended_away},
            )
            undo.callback(self.accounts.close)
            for job in adopt + ended_away:
                job.account = self.accounts.adopt(job.extra.get("account") or {})
            undo.callback(self.ops.close)  # the keeper server, once started
            if self.ops.kept:
                prepare_jobs_dir(self.jobs_dir)
                # Started now rather than by the first job; its keepers make
                # the jobs' directories when the jobs need them.
                self.ops.jobs_dir = str(self.jobs_dir)
                self.ops.keeper_idle_s = cfg.keeper_idle_s
                self.ops.keeper_server()
            self.spawner = Spawner(
                cfg,
                self.ops,
                worker_name,
                switches_user=self.accounts.mode != "worker",
            )
            self._lock = threading.Lock()
            self._jobs: dict[str, Job] = {}
            self._by_key: dict[str, str] = {}
            self._active: set[Job] = set()  # jobs not ended yet
            self._closing = False  # shutdown() began: start() refuses (under _lock)
            self._closed = threading.Event()
            # Jobs whose end could not be written (a full disk): written again
            # once the worker has recovered, so a restart does not call them lost.
            self._unrecorded: dict[str, Job] = {}
            self.health = Health(cfg.state_dir, cfg.min_free_bytes)
            self.health.check()
            self.drain = Drain(cfg.state_dir)
            for job in loaded:
                self._jobs[job.record.job_id] = job
                if job.record.idempotency_key:
                    self._by_key[job.record.idempotency_key] = job.record.job_id
            self._stamp_alive()
            self._reactor = Reactor(name="job-reactor")
            undo.callback(self._reactor.close)
            self.watcher = Watcher(
                cfg,
                self._reactor,
                self.isolation,
                self.enforcer,
                self.health,
                self._finish,
                self._give_back,
            )
            for job in adopt + ended_away:
                self._adopt(job)
            if adopt or ended_away:
                log.info(
                    "adopted %d running job(s) of the worker's earlier run, and the "
                    "end of %d that ended meanwhile, in %.3fs",
                    len(adopt),
                    len(ended_away),
                    time.monotonic() - adoption_began,
                )
            undo.pop_all()  # shutdown() closes them from now on

        self._housekeeping = threading.Thread(
            target=self._housekeeping_loop, name="housekeeping", daemon=True
        )
        self._housekeeping.start()

    # -- jobs of an earlier run ---------------------------------------------------

    def _survivors(self, loaded: list[Job]) -> tuple[list[Job], list[Job]]:
        """Sort out the jobs the earlier run left running (history.load).

        Returns the kept jobs whose keeper still runs (to adopt) and those
        whose keeper ended meanwhile and recorded the job's end; every other
        one is lost (:meth:`KeptProcess.find`).
        """
        adopt, ended_away = [], []
        for job in loaded:
            if job.phase is not Phase.STARTING:
                continue  # ended before the restart
            proc = KeptProcess.find(
                job.record.pid, job.extra.get("keeper") or {}, str(job.dir), self._boot
            )
            if proc is None:
                history.lose(job, self._alive.last(), self._records)
                continue
            job.proc = proc
            (ended_away if proc.ended else adopt).append(job)
        return adopt, ended_away

    def _adopt(self, job: Job) -> None:
        """Watch a kept job of the earlier run as if this run had started it."""
        jid = job.record.job_id
        proc = job.proc
        self._active.add(job)
        job.started(
            proc, f"adopted from the worker's earlier run (keeper {proc.keeper_pid})"
        )
        if proc.ended:
            log.info(
                "job %s ended while the worker was away", jid, extra={"JOB_ID": jid}
            )
            self.watcher.watch_ended(job)
            return
        job.exit_fd = proc.exit_fd()
        left = 0.0
        if job.record.timeout_s:
            # The timeout counts from the job's start, not from the adoption.
            left = job.record.started_at + job.record.timeout_s - self.ops.now()
            left = max(left, 0.001)
        self.watcher.watch(job, left)
        log.info(
            "job %s adopted from the worker's earlier run: it is still running "
            "(pid %d, keeper %d)",
            jid,
            job.record.pid,
            proc.keeper_pid,
            extra={"JOB_ID": jid},
        )
        if job.record.stopped_by:  # asked before the restart: ask again
            self.watcher.terminate(
                job,
                ExitReason.STOPPED,
                f"stopped on request by {job.record.stopped_by}",
                self.cfg.stop_grace_s,
            )

    def _check_limit_settings(self) -> None:
        """Refuse defaults and maxima the host cannot enforce (never ignored)."""
        for name in LIMIT_NAMES:
            for key in (f"default_{name}", f"max_{name}"):
                if getattr(self.cfg, key) and not self.enforcer.how(name):
                    raise OSError(
                        f"[jobs].{key} is set, but this host cannot enforce "
                        f"{name}: {self.enforcer.why_not(name)}; remove the "
                        "setting or give the worker the controller"
                    )

    def _output(
        self, directory, total: int = 0, kept: bool = False
    ) -> OutputLog | KeptOutput:
        """The output of a job of an earlier run: ``kept`` (its record names
        a keeper: it may still run), or else by the files it left."""
        head, tail = self.cfg.output_head_bytes, self.cfg.output_tail_bytes
        # A kept job's keeper makes its output file only with the job's first
        # byte, and its directory only then or for its exit file.
        if kept or any(
            (directory / name).exists()
            for name in (DATA_NAME, EXIT_TMP_NAME, EXIT_FILE)
        ):
            output = KeptOutput(directory, head, tail)
            output.total = total
            return output
        return OutputLog(directory, head, tail, total)

    def _new_output(self, directory) -> OutputLog | KeptOutput:
        """A new job's output: its keeper's file, or the worker's own log."""
        head, tail = self.cfg.output_head_bytes, self.cfg.output_tail_bytes
        if self.ops.kept:
            return KeptOutput(directory, head, tail)
        return OutputLog(directory, head, tail)

    # -- requests ---------------------------------------------------------------

    def resolve_script(self, path: str):
        """The real path of ``path`` inside the scripts directory, or an error."""
        return self.validator.resolve_script(path)

    def start(
        self,
        command: str,
        path: str,
        args: list[str] | tuple[str, ...] = (),
        timeout_s: int = 0,
        idempotency_key: str = "",
        limits: dict[str, int] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Start a job; returns its record and whether it already existed.

        ``limits`` (worker.limits.NAMES, 0 or absent: the worker's default)
        above the worker's maxima, or that its host cannot enforce, are
        refused.
        """
        req = self.validator.start(
            command, path, list(args), timeout_s, idempotency_key, limits, self.enforcer
        )
        with self._lock:
            if self._closing:
                raise Unavailable(
                    "the worker is shutting down and starts no more jobs; "
                    "start the job on another worker"
                )
            key = req.idempotency_key
            if key and key in self._by_key:
                return self._snapshot(self._jobs[self._by_key[key]]), True
            if self.drain.reason:
                raise Unavailable(
                    f"the worker is {self.drain.reason}; start the job on "
                    "another worker, or once the drain is lifted"
                )
            if self.health.reason:
                raise Unavailable(
                    f"the worker is degraded: {self.health.reason}; start the "
                    "job on another worker or retry later"
                )
            running = len(self._active)
            if running >= self.cfg.max_concurrent:
                raise ResourceExhausted(
                    f"{running} jobs are running, the most this worker allows "
                    f"([jobs].max_concurrent); retry when one ends"
                )
            job_id = str(uuid.uuid4())
            try:
                account = self.accounts.acquire(job_id)
            except OSError as exc:
                raise Unavailable(
                    "the worker could not make the job's temporary directory: "
                    f"{exc.strerror or exc}"
                ) from None
            record = JobRecord(
                job_id=job_id,
                command=req.command,
                path=req.path,
                args=req.args,
                state=JobState.RUNNING,
                timeout_s=req.timeout_s,
                idempotency_key=key,
                started_at=self.ops.now(),
                limits=req.limits.set(),
            )
            # The output log is opened when the first output arrives.
            directory = self.jobs_dir / job_id
            job = Job(
                record, directory, self._new_output(directory), clock=self.ops.now
            )
            job.account = account
            self._jobs[job_id] = job
            self._active.add(job)
            if key:
                self._by_key[key] = job_id
            # From here on the job must end, whatever fails.
            spawn_started = time.perf_counter()
            failure = self._launch(job, req.argv, req.timeout_s)
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

    def _launch(self, job: Job, argv: list[str], timeout: int) -> str | None:
        """Record, spawn and hand a job to the reactor; None, or why it failed.

        The job's first record is written before its process exists: should
        the worker die at any point after start() returned, its next run
        knows the job (as lost) and its idempotency key. A second line, once
        it runs, gives its pid.
        """
        jid = job.record.job_id
        stage = "record"
        try:
            self._records.write(job.record.to_json())
            stage = "limits"
            joined = self.isolation.prepare(jid)
            procs = [] if joined == "-" else [joined]
            procs += self.enforcer.prepare(jid, Limits.from_json(job.record.limits))
            stage = "spawn"
            kept = job.output if isinstance(job.output, KeptOutput) else None
            account = job.account
            proc, job.status_fd = self.spawner.spawn(
                jid,
                argv,
                procs,
                account,
                kept=kept,
                cgroup_kill=self.isolation.kill_file(jid),
                # The keeper holds the lock of the job's user id for as long
                # as the job may run, whether the worker is there or not.
                hold_fds=() if account.lock_fd is None else (account.lock_fd,),
            )
            if kept is None:
                job.out_fd = proc.stdout.fileno()
            else:
                job.extra = self._adoption_record(proc, account)
            pending_stop = job.started(proc)
            stage = "watch"
            self._record_pid(job)
            # A kept job ends with its keeper: watched through the pidfd it
            # came with (its pid alone may name another process by now).
            job.exit_fd = proc.exit_fd() if kept else self.ops.exit_fd(proc.pid)
            self.watcher.watch(job, timeout)
            if pending_stop is not None:
                self.watcher.send_stop(job, pending_stop[1], self.cfg.stop_grace_s)
            return None
        except Exception as exc:  # noqa: BLE001 - the job is ended by the caller
            if not isinstance(exc, (OSError, RuntimeError)):
                log.exception("job %s: starting it failed", jid)
            detail = getattr(exc, "strerror", None) or str(exc)
            if stage == "record":
                if isinstance(exc, OSError):
                    self.health.write_failed("job records", exc)
                return f"could not record the job: {detail}"
            if stage == "limits":
                return f"could not set up the job's cgroups and limits: {detail}"
            if stage == "spawn" and isinstance(exc, OSError):
                return start_error_text(exc, argv[0])
            if stage == "spawn":
                return f"could not execute {argv[0]}: {detail}"
            return f"the worker could not watch the job: {detail}"

    def _adoption_record(self, proc: KeptProcess, account) -> dict:
        """What the next run of the worker needs to adopt a kept job."""
        return {
            "keeper": {
                "pid": proc.keeper_pid,
                "start": proc.keeper_start,
                "boot": self._boot,
            },
            "account": account.to_json(),
        }

    def _record_pid(self, job: Job) -> None:
        """Persist the running job's pid (a lost job keeps it after a restart),
        and for a kept job what names its keeper and its account."""
        try:
            self._records.write(job.record.to_json() | job.extra)
        except OSError as exc:  # it runs all the same; only its pid is not kept
            self.health.write_failed("job records", exc)
            log.error(
                "job %s: could not record its pid: %s",
                job.record.job_id,
                exc,
                extra={"JOB_ID": job.record.job_id},
            )

    def _end_unstarted(self, job: Job, text: str) -> None:
        """End a job whose process never started."""
        job.end("it could not start", forced=(ExitReason.START_FAILED, text))
        try:
            if job.status_fd is not None:
                os.close(job.status_fd)
                job.status_fd = None
            self.isolation.release(job.record.job_id)  # its cgroup, if made
            limits = Limits.from_json(job.record.limits)
            self.enforcer.release(job.record.job_id, limits)
        except Exception:  # noqa: BLE001 - end the job regardless
            log.exception("job %s: cleaning up after it failed", job.record.job_id)
        finally:
            self._finish(job)

    def _abandon(self, job: Job, text: str) -> None:
        """End a job whose process runs but cannot be watched (no descriptor left).

        Never under ``_lock``: killing and reaping may take a moment, and the
        job's cgroup up to ``watcher.CGROUP_REMOVE_S`` to empty.
        """
        jid = job.record.job_id
        log.error("job %s: %s; killing it", jid, text, extra={"JOB_ID": jid})
        job.end("it cannot be watched", forced=(ExitReason.START_FAILED, text))
        try:
            if not self.watcher.teardown(job):
                watcher.escaped(job)
                self.isolation.cleanup(jid)
        except Exception:  # noqa: BLE001 - record the end regardless
            watcher.escaped(job)
            log.exception("job %s: cleaning up after it failed", jid)
        finally:
            self._finish(job)

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

    def degraded(self) -> str:
        """Why the worker starts no jobs now (drained, unhealthy); empty if it does."""
        return "; ".join(r for r in (self.drain.reason, self.health.reason) if r)

    def set_drain(self, enable: bool, requested_by: str = "") -> DrainState | None:
        """Drain the worker (no new jobs; running ones go on) or lift the drain.

        The drain is on disk before this returns; a start that was admitted
        before it took effect is among the running jobs by then.
        """
        try:
            state = self.drain.set(enable, requested_by, self.ops.now())
        except OSError as exc:
            raise Unavailable(
                f"could not record the drain in {self.drain.path}: "
                f"{exc.strerror or exc}; nothing was changed"
            ) from None
        # Starts check the drain under the lock: once it is taken here, every
        # start admitted before the drain has its job in _active.
        with self._lock:
            pass
        return state

    def wait_idle(self, timeout_s: float) -> int:
        """Wait until no job runs, at most ``timeout_s`` (capped by
        ``[jobs].max_wait_s``); returns how many jobs still run."""
        deadline = time.monotonic() + min(max(timeout_s, 0.0), self.cfg.max_wait_s)
        while True:
            with self._lock:
                active = list(self._active)
            if not active:
                return 0
            for job in active:
                left = deadline - time.monotonic()
                if left <= 0 or not job.done.wait(left):
                    return self.running_count()

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
        self.watcher.terminate(
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

    def shutdown(self, grace_s: float | None = None, keep_jobs: bool = False) -> None:
        """Stop every running job (the worker is going away).

        From the moment it takes the lock, start() refuses: a job started
        after the running ones are collected would be left unwatched. Jobs
        whose main process has exited already end on their own. With
        ``keep_jobs`` (the worker restarts), kept jobs go on running for the
        next run of the worker to adopt; the others are stopped.
        """
        with self._lock:
            self._closing = True
            running = [j for j in self._jobs.values() if not j.done.is_set()]
        if keep_jobs:
            left = [j for j in running if isinstance(j.proc, KeptProcess)]
            running = [j for j in running if j not in left]
            for j in left:  # their keepers write exit files for the next run
                j.proc.close_channel()
            if left:
                log.info(
                    "leaving %d kept job(s) running for the worker's next run",
                    len(left),
                )
        grace = grace_s if grace_s is not None else self.cfg.stop_grace_s
        for j in running:
            try:
                self.watcher.terminate(
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
        self.ops.close()
        self._reactor.close()
        self.enforcer.close()
        self.isolation.close()
        self.accounts.close()
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
        return read_chunks(
            job, offset, self.cfg.read_chunk_bytes, follow, cancelled, keepalive_s
        )

    def wake(self, job_id: str) -> None:
        """Wake the followers of a job so they re-check cancellation."""
        job = self._jobs.get(job_id)
        if job is not None:
            with job.cond:
                job.cond.notify_all()

    # -- internals --------------------------------------------------------------

    def _job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} on this worker")
        return job

    def _snapshot(self, job: Job) -> JobRecord:
        with job.cond:
            r = copy.copy(job.record)  # a snapshot; its list is copied below
            r.args = list(r.args)
            if not job.sealed:
                r.output_bytes = job.output.total
                r.output_dropped_bytes = job.output.dropped
            return r

    def _finish(self, job: Job) -> None:
        """Record the end the machine decided, then release everyone waiting."""
        with job.cond:
            # Whatever fails here, the job ends: followers, stop(), shutdown()
            # and the running count never wait on it.
            try:
                try:
                    job.output.close()
                except OSError as exc:
                    log.error("job %s: closing its output: %s", job.record.job_id, exc)
                r = job.seal()
                recorded = False
                try:
                    self._records.write(r.to_json())
                    recorded = True
                except OSError as exc:  # e.g. the disk is full
                    self.health.write_failed("job records", exc)
                    self._unrecorded[r.job_id] = job
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
        if isinstance(job.proc, KeptProcess):
            # Its keeper waits for this: recorded here, the end needs no exit
            # file; else the keeper writes one, for a later run to read.
            job.proc.acknowledge(recorded)
        if job.reaped:  # else once it is (_reap_later)
            self._give_back(job)
        reason = r.exit_reason
        metrics.JOBS_FINISHED.labels(reason.value).inc()
        metrics.JOB_SECONDS.labels(reason.value).observe(r.ended_at - r.started_at)
        log.info(
            "job %s ended: %s (%s)",
            r.job_id,
            r.state.value,
            r.reason,
            extra={"JOB_ID": r.job_id},
        )

    def _give_back(self, job: Job) -> None:
        """Return the job's account (its user id, its directory): it has ended."""
        with job.cond:
            account, job.account = job.account, None
        if account is not None:
            self.accounts.release(account)

    # -- housekeeping -----------------------------------------------------------

    def _stamp_alive(self) -> None:
        try:
            self._alive.touch()
        except OSError as exc:
            log.error("could not stamp %s: %s", self._alive.path, exc)

    def _housekeeping_loop(self) -> None:
        """Stamp the state directory as alive; enforce retention when due."""
        next_retention = time.monotonic() + self.cfg.retention_interval_s
        step = min(self.cfg.alive_interval_s, self.cfg.retention_interval_s)
        while not self._closed.wait(step):
            self._stamp_alive()
            if not self.health.check() and self._unrecorded:
                self._record_late()
            if time.monotonic() < next_retention:
                continue
            next_retention = time.monotonic() + self.cfg.retention_interval_s
            try:
                self.enforce_retention()
            except Exception:  # noqa: BLE001 - keep retention alive; log once each
                log.exception("retention failed")

    def _record_late(self) -> None:
        """Write the ends that could not be written when the jobs ended."""
        for job_id, job in list(self._unrecorded.items()):
            try:
                self._records.write(job.record.to_json())
            except OSError as exc:
                self.health.write_failed("job records", exc)
                return
            del self._unrecorded[job_id]
            log.info(
                "job %s: its end is recorded at last", job_id, extra={"JOB_ID": job_id}
            )

    def enforce_retention(self) -> list[str]:
        """Delete finished jobs beyond the configured age and count.

        Records leave the index under the lock; their files are removed after,
        so requests never wait on the disk. Returns the ids removed.
        """
        now = self.ops.now()
        with self._lock:
            doomed = history.expired(
                (j for j in self._jobs.values() if j.done.is_set()),
                now,
                self.cfg.retention_max_jobs,
                self.cfg.retention_max_age_s,
            )
            for j in doomed:
                del self._jobs[j.record.job_id]
                self._unrecorded.pop(j.record.job_id, None)
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
