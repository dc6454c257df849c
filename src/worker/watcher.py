"""The reactor's side of every running job: its output, its exit, its deadlines.

The :class:`~worker.reactor.Reactor` thread copies each job's pipe into the
job's :class:`~worker.output.OutputLog` as data arrives, waking the followers
(nobody polls), notices through a pidfd when the job's main process exits,
and holds the deadlines: timeouts, the SIGTERM to SIGKILL grace, the output
drain. Every event is fed to the job's state machine (:mod:`worker.job`),
which decides; this module does what it decides to the job's processes and
cgroups, and hands the job to ``finish`` once its end is decided.

When the main process exits, whatever is left of the job is killed while
the main process is a zombie (its pid still names the job), then it is
reaped, the pipe is drained (for at most ``drain_timeout_s``), the job's
cgroups are removed, and only then does the job end: a job reported ended
has no process left and no output still to come.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable

from jobgate.jobstate import ExitReason
from worker import linux, metrics
from worker.config import JobsSection
from worker.health import Health
from worker.job import Job, Phase
from worker.kept import start_failure
from worker.limits import Enforcer, Limits
from worker.process import KeptProcess, read_start_error, start_error_text
from worker.reactor import Reactor

log = logging.getLogger(__name__)

# How long the cgroup of a job that ended may take to empty before it is
# left for the next start of the worker to remove.
CGROUP_REMOVE_S = 5.0
# A job's process that outlived SIGKILL is looked at again after this long,
# then at doubling intervals up to the maximum, until it can be reaped.
REAP_LATER_S = 1.0
REAP_LATER_MAX_S = 60.0


class Watcher:
    def __init__(
        self,
        cfg: JobsSection,
        reactor: Reactor,
        isolation,
        enforcer: Enforcer,
        health: Health,
        finish: Callable[[Job], None],
        give_back: Callable[[Job], None],
    ):
        self.cfg = cfg
        self.reactor = reactor
        self.isolation = isolation
        self.enforcer = enforcer
        self.health = health
        self.finish = finish  # records the end the machine decided
        self.give_back = give_back  # returns the job's account
        # Kept jobs' directories, watched for their output file's growth (on
        # the reactor's thread).
        self._inotify: linux.Inotify | None = None
        self._watches: dict[int, Job] = {}
        # Kept jobs whose directory the keeper has not made yet (it does with
        # the job's first byte), by its name; the jobs' directory is watched
        # for its making (IN_CREATE) once one is.
        self._awaiting: dict[str, Job] = {}
        self._made_wd: int | None = None

    # -- from any thread ----------------------------------------------------------

    def terminate(
        self,
        job: Job,
        reason: ExitReason,
        text: str,
        grace_s: float,
        requested_by: str = "",
    ) -> None:
        """Ask the job to stop; if the machine says so, SIGTERM it now.

        Returns at once; the reactor holds the deadline of the SIGKILL.
        Waiting for the job to end is up to the caller (``job.done``).
        """
        with job.cond:
            if exited_in_keeper(job):
                return  # it ended in time; its keeper is reading the rest
            if job.request_stop(reason, text, requested_by):
                self.send_stop(job, text, grace_s)

    def send_stop(self, job: Job, text: str, grace_s: float) -> None:
        """SIGTERM to all the job's processes now, SIGKILL after the grace."""
        grace = grace_s or self.cfg.stop_grace_s
        jid = job.record.job_id
        with job.cond:
            log.info(
                "job %s: %s; SIGTERM to all its processes",
                jid,
                text,
                extra={"JOB_ID": jid},
            )
            self.isolation.signal(jid, job.proc.pid, signal.SIGTERM)
            if isinstance(job.proc, KeptProcess):
                # Just started, the job may not lead its process group nor be
                # in its cgroup yet; its own pid is safe to signal (its keeper
                # keeps it a zombie until the keeper itself ends).
                _signal_pid(job.proc.pid, signal.SIGTERM)
            try:
                timer = self.reactor.call_later(
                    grace, self._job_event, job, self._escalate, grace
                )
            except RuntimeError:  # the reactor is closed: no grace to wait out
                self.isolation.kill_all(jid, job.proc.pid)
                return
            job.timers.append(timer)

    def watch(self, job: Job, timeout: int) -> None:
        """Hand a job whose process runs to the reactor (from any thread)."""
        if timeout:
            job.timers.append(
                self.reactor.call_later(timeout, self._job_event, job, self._on_timeout)
            )
        self.reactor.call_soon(self._job_event, job, self._watch)

    # -- on the reactor's thread -----------------------------------------------
    #
    # Every job event goes through _job_event: an error ends that job (as
    # lost) instead of leaving it running for ever, and the reactor goes on
    # serving the others.

    def _job_event(self, job: Job, handler: Callable, *args) -> None:
        try:
            handler(job, *args)
        except Exception as exc:  # noqa: BLE001 - see above
            self._fail(job, exc)

    def watch_ended(self, job: Job) -> None:
        """Hand over a kept job whose keeper ended while no worker watched."""
        self.reactor.call_soon(self._job_event, job, self._kept_ended)

    def _watch(self, job: Job) -> None:
        if job.phase is Phase.ENDED:
            return
        assert job.exit_fd is not None
        if job.out_fd is not None:
            os.set_blocking(job.out_fd, False)
            self.reactor.add_reader(
                job.out_fd, functools.partial(self._job_event, job, self._on_output)
            )
        else:  # kept: its keeper writes the output file, the worker watches it
            self._watch_output(job)
        self.reactor.add_reader(
            job.exit_fd, functools.partial(self._job_event, job, self._on_exit)
        )

    def _watch_output(self, job: Job) -> None:
        """Watch a kept job's directory for its output file's growth.

        The directory, not the file: the keeper makes the file only with the
        job's first byte. Its writes of an exit file come as events too, and
        cost a look at the size each. The keeper makes the directory itself
        only then too: until it is there, the job waits for its IN_CREATE in
        the jobs' directory.
        """
        if self._inotify is None:
            self._inotify = linux.Inotify()
            self.reactor.add_reader(self._inotify.fd, self._on_growth)
        directory = job.output.directory
        if self._made_wd is None:  # first: a making after it is heard of
            self._made_wd = self._inotify.watch(str(directory.parent), linux.IN_CREATE)
        try:
            job.watch = self._inotify.watch(str(directory))
        except FileNotFoundError:
            self._awaiting[directory.name] = job  # its IN_CREATE will tell
            return
        self._watches[job.watch] = job
        self._grown(job)  # what it wrote before the watch began

    def _on_growth(self) -> None:
        assert self._inotify is not None
        for wd, names in self._inotify.read().items():
            if wd == self._made_wd:
                for name in names:
                    job = self._awaiting.pop(name, None)
                    if job is not None and job.phase is not Phase.ENDED:
                        self._job_event(job, self._watch_output)
                continue
            job = self._watches.get(wd)
            if job is not None:
                self._grown(job)

    def _grown(self, job: Job) -> None:
        grew = job.output.refresh()
        if grew:
            metrics.OUTPUT_BYTES.inc(grew)
            with job.cond:
                job.cond.notify_all()

    def _unwatch(self, job: Job) -> None:
        if self._awaiting.get(job.dir.name) is job:
            del self._awaiting[job.dir.name]
        wd, job.watch = job.watch, -1
        if wd >= 0 and self._watches.pop(wd, None) is not None:
            try:
                self._inotify.unwatch(wd)
            except OSError as exc:
                log.warning("job %s: unwatching its output: %s", job.record.job_id, exc)

    def _escalate(self, job: Job, grace: float) -> None:
        jid = job.record.job_id
        with job.cond:
            if job.phase is not Phase.STOPPING:
                return  # it exited within the grace
            log.info(
                "job %s still running after %.1fs; SIGKILL",
                jid,
                grace,
                extra={"JOB_ID": jid},
            )
            self.isolation.kill_all(jid, job.proc.pid)
            if isinstance(job.proc, KeptProcess):
                _signal_pid(job.proc.pid, signal.SIGKILL)

    def _on_timeout(self, job: Job) -> None:
        self.terminate(
            job,
            ExitReason.TIMED_OUT,
            f"ran longer than its timeout of {job.record.timeout_s}s",
            self.cfg.stop_grace_s,
        )

    def _read_once(self, job: Job) -> bool:
        """Copy one chunk of the pipe into the output; False if none is there.

        Once the output cannot be written (a full disk), the pipe is still
        read to its end and what comes is dropped: the job runs on, never
        killed by a SIGPIPE of the worker's making, and its end says what
        was lost (``output_failed``).
        """
        fd = job.out_fd
        if fd is None:
            return False
        try:
            data = os.read(fd, self.cfg.read_chunk_bytes)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._read_failed(job, exc)
            return False
        if not data:
            self._close_output(job, "its output ended")
            return False
        if job.output_error:
            return True  # dropped: see above
        try:
            with job.cond:
                job.output.append(data)
                job.cond.notify_all()
        except OSError as exc:  # e.g. the disk is full
            self._write_failed(job, exc)
            return True
        metrics.OUTPUT_BYTES.inc(len(data))
        return True

    def _on_output(self, job: Job) -> None:
        self._read_once(job)

    def _write_failed(self, job: Job, exc: OSError, kept: int | None = None) -> None:
        jid = job.record.job_id
        kept = job.output.total if kept is None else kept
        if job.output_failed(
            f"the worker could not write its output after {kept} bytes: "
            f"{exc.strerror or exc}"
        ):
            log.error(
                "job %s: writing its output failed after %d bytes: %s; the rest "
                "of its output is dropped",
                jid,
                kept,
                exc,
                extra={"JOB_ID": jid},
            )
        self.health.write_failed("job output", exc)

    def _read_failed(self, job: Job, exc: OSError) -> None:
        jid = job.record.job_id
        log.error(
            "job %s: reading its output failed: %s", jid, exc, extra={"JOB_ID": jid}
        )
        job.output_failed(f"the worker could not read its output: {exc}")
        self._close_output(job, f"reading its output failed: {exc}")

    def _close_output(self, job: Job, why: str) -> None:
        """Stop reading the pipe; once the job is reaped too, record its end."""
        if job.out_fd is not None:
            self.reactor.remove_reader(job.out_fd)
            job.out_fd = None
            assert job.proc is not None and job.proc.stdout is not None
            job.proc.stdout.close()
        if job.output_closed(why):
            self._release(job, time.monotonic() + CGROUP_REMOVE_S, 0.001)

    def _on_exit(self, job: Job) -> None:
        if job.exit_fd is None:
            return  # the job was torn down earlier in this round
        proc = job.proc
        assert proc is not None
        fd, job.exit_fd = job.exit_fd, None
        self.reactor.remove_reader(fd)
        os.close(fd)
        if isinstance(proc, KeptProcess):
            self._kept_ended(job)
            return
        jid = job.record.job_id
        with job.cond:
            # The main process is a zombie, so its pid still names the job's
            # process group: end what the job left behind before it is reaped.
            self.isolation.kill_all(jid, proc.pid)
            returncode = proc.wait()
            # Read while the job's cgroups are still there.
            job.oom_kills = self.enforcer.oom_kills(
                jid, Limits.from_json(job.record.limits)
            )
            drained = job.exited(returncode)
            # The job has ended: a timeout or stop from now on is too late.
            timers, job.timers = job.timers, []
        for timer in timers:
            timer.cancel()
        if drained:
            self._release(job, time.monotonic() + CGROUP_REMOVE_S, 0.001)
        else:
            job.timers.append(
                self.reactor.call_later(
                    self.cfg.drain_timeout_s, self._job_event, job, self._drain_expired
                )
            )

    def _kept_ended(self, job: Job) -> None:
        """A kept job's keeper has ended: the job has, and its output is complete.

        The keeper ended what the job left in its process group and its
        cgroup while the main process was a zombie, read the output to its
        end and wrote the exit status; what is left here is what escaped
        both (a process in a v1 cgroup only).
        """
        proc = job.proc
        assert isinstance(proc, KeptProcess)
        jid = job.record.job_id
        returncode = proc.wait()
        self._unwatch(job)
        self._grown(job)
        job.output.close()
        with job.cond:
            self.isolation.kill_all(jid, 0)  # never by pid: its pid is free now
            job.oom_kills = self.enforcer.oom_kills(
                jid, Limits.from_json(job.record.limits)
            )
            done = proc.exit
            if done is None:
                job.lost_why = (
                    "its keeper ended without recording how the job ended "
                    "(killed, or its state directory unwritable)"
                )
            elif done.start_error is not None:
                step, err = done.start_error
                program = proc.program or job.record.command
                failure = start_failure(step, err, program)
                job.start_error = start_error_text(failure, program)
            elif done.output_error is not None:
                err, kept = done.output_error
                exc = OSError(err, os.strerror(err))
                self._write_failed(job, exc, kept)
            if done is not None and done.drain_cut:
                log.warning(
                    "job %s: its output was given up %.1fs after its exit "
                    "(a process it left still held it)",
                    jid,
                    self.cfg.drain_timeout_s,
                    extra={"JOB_ID": jid},
                )
            drained = job.exited(returncode)
            timers, job.timers = job.timers, []
        for timer in timers:
            timer.cancel()
        assert drained, "a kept job has no output left to read"
        self._release(job, time.monotonic() + CGROUP_REMOVE_S, 0.001)

    def _drain_expired(self, job: Job) -> None:
        # What is in the pipe now was written before the deadline: keep it,
        # within reason (a process left behind may still be writing).
        for _ in range(16):
            if not self._read_once(job):
                break
        self._close_output(
            job, f"its output was given up {self.cfg.drain_timeout_s}s after the exit"
        )

    def _release(self, job: Job, deadline: float, delay: float) -> None:
        """Remove the job's cgroup once it is empty (retried), then record the end."""
        if job.phase is not Phase.DRAINED:
            return
        for timer in job.timers:
            timer.cancel()
        job.timers = []
        jid = job.record.job_id
        released = self.isolation.release(jid)
        released &= self.enforcer.release(jid, Limits.from_json(job.record.limits))
        if not released:
            if time.monotonic() < deadline:
                job.timers.append(
                    self.reactor.call_later(
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
            escaped(job)
        if job.status_fd is not None:
            fd, job.status_fd = job.status_fd, None
            job.start_error = read_start_error(fd)
        job.end("its processes are gone and its output is complete")
        self.finish(job)

    def _fail(self, job: Job, exc: Exception) -> None:
        """Something went wrong watching a job: end it rather than lose it."""
        jid = job.record.job_id
        text = f"the worker lost track of the job: {exc}"
        if not job.end(f"watching it failed: {exc}", forced=(ExitReason.LOST, text)):
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
            if not self.teardown(job):
                escaped(job)
        except Exception:  # noqa: BLE001 - record the end regardless
            escaped(job)
            log.exception("job %s: cleaning up after it failed", jid)
        finally:
            self.finish(job)

    def teardown(self, job: Job) -> bool:
        """Kill and reap what is left of a job (ended) and close its descriptors.

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
            assert job.phase is Phase.ENDED, job.phase
            timers, job.timers = job.timers, []
        for timer in timers:
            attempt(timer.cancel)
        attempt(self._unwatch, job)
        if job.out_fd is not None:
            attempt(self.reactor.remove_reader, job.out_fd)
            job.out_fd = None
            if job.proc is not None and job.proc.stdout is not None:
                attempt(job.proc.stdout.close)
        for name in ("exit_fd", "status_fd"):
            fd = getattr(job, name)
            if fd is not None:
                setattr(job, name, None)
                if name == "exit_fd":
                    attempt(self.reactor.remove_reader, fd)
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
                    self.reactor.call_later(REAP_LATER_S, self._reap_later, job)
                except RuntimeError:
                    pass  # the worker is stopping: init reaps it after us
            except Exception as exc:  # noqa: BLE001 - raised after the rest
                errors.append(exc)
        released = False
        try:
            released = self.isolation.release(jid)
            limits = Limits.from_json(job.record.limits)
            released &= self.enforcer.release(jid, limits)
        except Exception as exc:  # noqa: BLE001 - raised after the rest
            errors.append(exc)
        if errors:
            raise errors[0]
        return released

    def _reap_later(self, job: Job, delay: float = REAP_LATER_S) -> None:
        """Reap the process of an ended job that outlived its SIGKILL."""
        assert job.proc is not None
        try:
            returncode = job.proc.poll()
        except OSError as exc:
            log.warning("job %s: reaping its process: %s", job.record.job_id, exc)
            return
        if returncode is None:
            self.reactor.call_later(
                delay, self._reap_later, job, min(delay * 2, REAP_LATER_MAX_S)
            )
            return
        with job.cond:
            job.reaped = True
        self.give_back(job)
        log.info(
            "job %s: its process %d ended at last and was reaped",
            job.record.job_id,
            job.proc.pid,
            extra={"JOB_ID": job.record.job_id},
        )


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def exited_in_keeper(job: Job) -> bool:
    """Whether a kept job's main process has exited (a zombie its keeper
    keeps until it has read the output to its end and writes the exit), so
    that neither a timeout nor a stop applies to it any more."""
    proc = job.proc
    if not isinstance(proc, KeptProcess) or proc.ended:
        return False
    return linux.process_state(proc.pid) in ("Z", "")


def escaped(job: Job) -> None:
    """Processes of ``job`` may be left: its id must not go back unswept."""
    account = job.account
    if account is not None:
        account.escaped = True
