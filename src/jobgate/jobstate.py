"""The lifecycle of a job, shared by the worker (which drives it) and the
scheduler (which reports it)."""

from __future__ import annotations

import enum

from jobgate.v1 import common_pb2


class JobState(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    TIMED_OUT = "timed_out"
    LOST = "lost"

    def is_terminal(self) -> bool:
        return self is not JobState.RUNNING

    def to_proto(self) -> int:
        return common_pb2.JobState.Value(f"JOB_STATE_{self.name}")

    @classmethod
    def from_proto(cls, value: int) -> JobState:
        name = common_pb2.JobState.Name(value).removeprefix("JOB_STATE_")
        if name == "UNSPECIFIED":
            raise ValueError("job state is unspecified")
        return cls[name]


# The only transitions a job makes: it starts running and ends once.
_ALLOWED = {JobState.RUNNING: frozenset(s for s in JobState if s.is_terminal())}


def check_transition(old: JobState, new: JobState) -> None:
    """Raise ValueError unless a job may go from ``old`` to ``new``."""
    if new not in _ALLOWED.get(old, frozenset()):
        raise ValueError(f"a job cannot go from {old.value} to {new.value}")


class ExitReason(enum.Enum):
    """Why a finished job ended; the state a client sees follows from it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    KILLED = "killed"
    STOPPED = "stopped"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    START_FAILED = "start_failed"

    @property
    def state(self) -> JobState:
        return _STATE_OF[self]

    def to_proto(self) -> int:
        return common_pb2.ExitReason.Value(f"EXIT_REASON_{self.name}")

    @classmethod
    def from_proto(cls, value: int) -> ExitReason | None:
        name = common_pb2.ExitReason.Name(value).removeprefix("EXIT_REASON_")
        return None if name == "UNSPECIFIED" else cls[name]


_STATE_OF = {
    ExitReason.SUCCEEDED: JobState.SUCCEEDED,
    ExitReason.FAILED: JobState.FAILED,
    ExitReason.KILLED: JobState.FAILED,
    ExitReason.STOPPED: JobState.STOPPED,
    ExitReason.TIMED_OUT: JobState.TIMED_OUT,
    ExitReason.LOST: JobState.LOST,
    ExitReason.START_FAILED: JobState.FAILED,
}
