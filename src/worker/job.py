"""One job's lifecycle on the worker: an explicit state machine.

::

    STARTING ──▶ RUNNING ──▶ STOPPING
        │           │           │
        │           ▼           ▼
        │        EXITED ◀───────┘      (the main process was reaped)
        │           │
        │           ▼
        │        DRAINED                (and its output read to the end)
        │           │
        └───────────┴──────▶ ENDED      (from any phase when something fails)

Every change goes through :meth:`Job.change`, which refuses a change the
table does not allow and keeps the reason for it in :attr:`Job.history`. The
public state of the API (``running``, ``succeeded``, ``failed``...) and the
``exit_reason`` follow from what the machine saw, in one place:
:meth:`Job.outcome`.

The machine does nothing to the operating system: the runner asks it what
may happen (``request_stop`` says whether SIGTERM is to be sent now,
``exited`` and ``output_closed`` whether the job's output is complete) and
does the signalling, reaping and recording itself. So the races between a
stop, a timeout, the process's exit and the end of its output are decided
here, under the job's lock, and tested without any process.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from jobgate.jobstate import ExitReason, JobState
from worker.output import OutputLog


class Phase(enum.Enum):
    STARTING = "starting"  # recorded; its process is being spawned
    RUNNING = "running"  # its process runs and is watched
    STOPPING = "stopping"  # SIGTERM was sent (stop, timeout or shutdown)
    EXITED = "exited"  # the main process was reaped; output may still come
    DRAINED = "drained"  # and the output was read to its end (or given up)
    ENDED = "ended"  # the end is decided; nothing signals the job any more

    def is_terminal(self) -> bool:
        return self is Phase.ENDED


_NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.RUNNING, Phase.ENDED}),
    Phase.RUNNING: frozenset({Phase.STOPPING, Phase.EXITED, Phase.ENDED}),
    Phase.STOPPING: frozenset({Phase.EXITED, Phase.ENDED}),
    Phase.EXITED: frozenset({Phase.DRAINED, Phase.ENDED}),
    Phase.DRAINED: frozenset({Phase.ENDED}),
    Phase.ENDED: frozenset(),
}


class TransitionError(RuntimeError):
    """A change of phase the machine does not allow (a bug in the runner)."""


@dataclasses.dataclass(frozen=True)
class Transition:
    at: float
    old: Phase
    new: Phase
    why: str


@dataclasses.dataclass
class JobRecord:
    """What is known and persisted about one job (:mod:`worker.records`).

    Its fields are those of the job in ``jobgate.model`` that are on the
    wire (all but ``worker_id``), with types that hold their values; a
    field that may be null there is ``None`` here, or empty for a string.
    ``tests/unit/test_model.py`` checks.
    """

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
    # The limits the job runs with, those set only (worker.limits.NAMES).
    limits: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        d = {name: getattr(self, name) for name in _RECORD_FIELDS}
        d["args"] = list(self.args)
        d["limits"] = dict(self.limits)
        d["state"] = self.state.value
        d["exit_reason"] = self.exit_reason.value if self.exit_reason else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> JobRecord:
        d = {k: v for k, v in d.items() if k in _RECORD_FIELDS}
        d["state"] = JobState(d["state"])
        d["exit_reason"] = (
            ExitReason(d["exit_reason"]) if d.get("exit_reason") else None
        )
        return cls(**d)


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))


class Job:
    """A job: its record, its phase, and the synchronisation around it.

    ``cond`` guards the phase and the record; it is re-entrant, so the
    methods below take it themselves and a caller may hold it around several.
    Followers of the output wait on it.
    """

    def __init__(
        self,
        record: JobRecord,
        directory: Path,
        output: OutputLog,
        clock: Callable[[], float] = time.time,
    ):
        self.record = record
        self.dir = directory
        self.output = output
        self.clock = clock
        self.cond = threading.Condition()  # an RLock inside
        self.done = threading.Event()  # set once the end is recorded
        self.history: list[Transition] = []
        self.phase = Phase.STARTING
        # What the runner attaches while the job's process lives.
        self.proc = None  # subprocess.Popen or spawn.Child
        self.status_fd: int | None = None  # the shim's report of a failed join
        self.out_fd: int | None = None  # the output pipe, while it is read
        self.exit_fd: int | None = None  # readable once the main process exits
        self.timers: list = []  # deadlines on the reactor
        # What names a kept job's keeper and account, written with its record
        # while it runs, so that the next run of the worker can adopt it.
        self.extra: dict = {}
        self.watch = -1  # a kept job's inotify watch of its output
        self.account = None  # accounts.Account, until given back
        self.returncode: int | None = None
        # The main process was waited for (its pid is free for reuse). Not a
        # phase: a job torn down after a failure ends while a process that
        # outlived SIGKILL is reaped later.
        self.reaped = True
        self.output_open = False  # the pipe is still read
        self.output_error = ""  # why output could not be kept, from then on
        self.start_error = ""  # the job's process could not get ready to run
        self.lost_why = ""  # why the exit of a job that ended is not known
        self.oom_kills = 0  # processes of it the OOM killer ended (memory limit)
        self._stop: tuple[ExitReason, str] | None = None  # first stop asked
        self._forced: tuple[ExitReason, str] | None = None  # an end imposed
        if record.state.is_terminal():
            self.phase = Phase.ENDED
            self.done.set()

    def __repr__(self) -> str:
        return f"<Job {self.record.job_id} {self.phase.value}>"

    # -- the one way a phase changes ------------------------------------------

    def change(self, new: Phase, why: str) -> None:
        """Move to ``new``, or raise :class:`TransitionError` if it is not allowed."""
        with self.cond:
            old = self.phase
            if new not in _NEXT[old]:
                raise TransitionError(
                    f"job {self.record.job_id}: cannot go from {old.value} to "
                    f"{new.value} ({why})"
                )
            self.history.append(Transition(self.clock(), old, new, why))
            self.phase = new

    # -- events ---------------------------------------------------------------

    def started(self, proc, why: str = "") -> tuple[ExitReason, str] | None:
        """The process runs and is watched. Returns a stop asked meanwhile.

        A stop that came while the job was starting was kept; now that there
        is a process to signal, it takes effect (the job goes on to STOPPING).
        The worker reads the output of a job it started without a keeper;
        a kept job's keeper (``proc.kept``) does, and drains it before it
        ends.
        """
        with self.cond:
            self.proc = proc
            self.record.pid = proc.pid
            self.reaped = False
            self.output_open = not getattr(proc, "kept", False)
            self.change(Phase.RUNNING, why or f"process {proc.pid} spawned")
            if self._stop is not None:
                self.change(Phase.STOPPING, f"{self._stop[1]} (asked while starting)")
                return self._stop
            return None

    def request_stop(
        self, reason: ExitReason, text: str, requested_by: str = ""
    ) -> bool:
        """Ask the job to stop; True when the caller is to send SIGTERM now.

        The first stop wins (a timeout and a stop at once: whichever came
        first names the end). A stop before the process exists is kept for
        :meth:`started`; one after the main process exited changes nothing.
        """
        with self.cond:
            if self.phase not in (Phase.STARTING, Phase.RUNNING):
                return False
            if self._stop is not None:
                return False  # asked while starting, already
            self._stop = (reason, text)
            if requested_by:
                self.record.stopped_by = requested_by
                self.record.stopped_at = self.clock()
            if self.phase is Phase.STARTING:
                return False
            self.change(Phase.STOPPING, text)
            return True

    def exited(self, returncode: int) -> bool:
        """The main process was reaped; True when the output is complete too."""
        with self.cond:
            self.returncode = returncode
            self.reaped = True
            self.change(Phase.EXITED, f"the main process exited ({returncode})")
            if not self.output_open:
                self.change(Phase.DRAINED, "its output had ended before")
                return True
            return False

    def output_closed(self, why: str) -> bool:
        """No more output is read; True when the main process had exited too."""
        with self.cond:
            self.output_open = False
            if self.phase is Phase.EXITED:
                self.change(Phase.DRAINED, why)
                return True
            return False

    def output_failed(self, error: str) -> bool:
        """Output could not be kept from now on; False if it failed before."""
        with self.cond:
            if self.output_error:
                return False
            self.output_error = error
            return True

    def end(self, why: str, forced: tuple[ExitReason, str] | None = None) -> bool:
        """Decide the end: no stop or timeout acts on the job from now on.

        ``forced`` imposes an outcome (the job could not start, the worker lost
        track of it). False when the job had ended already.
        """
        with self.cond:
            if self.phase is Phase.ENDED:
                return False
            if forced is not None:
                self._forced = forced
            self.change(Phase.ENDED, why)
            return True

    # -- what a client sees ---------------------------------------------------

    def outcome(self) -> tuple[ExitReason, str]:
        """Why the job ended and a sentence saying so: the one place that decides.

        In order: an imposed end; a process that could not get ready to run;
        a stop or timeout (the job would not have ended then otherwise);
        output that could not be kept (the job's own result is in the text);
        then the job's own exit.
        """
        if self._forced is not None:
            return self._forced
        if self.start_error:
            return ExitReason.START_FAILED, self.start_error
        natural = _natural(self.returncode)
        if self.returncode is None and self.lost_why:
            natural = (ExitReason.LOST, self.lost_why)
        if self.oom_kills:
            limit = self.record.limits.get("memory_mb", 0)
            # The main process killed with SIGKILL, or a shell reporting so.
            if self.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
                natural = (
                    ExitReason.OOM,
                    f"killed for using more than its memory limit of {limit} MiB",
                )
            else:
                natural = (
                    natural[0],
                    f"{natural[1]}; {self.oom_kills} of its processes were killed "
                    f"for using more than its memory limit of {limit} MiB",
                )
        if self._stop is not None:
            reason, text = self._stop
        else:
            reason, text = natural
        if self.output_error:
            if self._stop is None:
                reason = ExitReason.OUTPUT_FAILED
                text = f"{self.output_error} ({natural[1]})"
            else:
                text = f"{text}; {self.output_error}"
        return reason, text

    def seal(self) -> JobRecord:
        """Write the outcome into the record (after :meth:`end`); returns it.

        The caller persists the record and then sets :attr:`done`.
        """
        with self.cond:
            assert self.phase is Phase.ENDED, self.phase
            r = self.record
            reason, text = self.outcome()
            rc = self.returncode
            if self._forced is not None and reason is ExitReason.START_FAILED:
                rc = None  # killed by the worker before it ran: no exit of its own
            if rc is not None and rc < 0:
                r.signal = -rc
            elif rc is not None:
                r.exit_code = rc
            r.state, r.exit_reason, r.reason = reason.state, reason, text
            r.ended_at = self.clock()
            r.output_bytes = self.output.total
            r.output_dropped_bytes = self.output.dropped
            if r.output_dropped_bytes:
                r.reason += (
                    f"; {r.output_dropped_bytes} bytes of output were dropped "
                    "between the kept head and tail"
                )
            return r

    @property
    def sealed(self) -> bool:
        """No more output will come (followers stop waiting)."""
        return self.done.is_set()


def _natural(returncode: int | None) -> tuple[ExitReason, str]:
    """The end of a job nobody stopped, from its main process's exit."""
    if returncode is None:
        return ExitReason.LOST, "the job's end is not known"
    if returncode == 0:
        return ExitReason.SUCCEEDED, "exited with code 0"
    if returncode > 0:
        return ExitReason.FAILED, f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return ExitReason.KILLED, f"killed by {name}"
