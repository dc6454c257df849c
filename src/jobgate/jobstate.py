"""The states of a job a client sees, shared by the worker (which derives
them, see :mod:`worker.job`) and the scheduler (which reports them)."""

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


class ExitReason(enum.Enum):
    """Why a finished job ended; the state a client sees follows from it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    KILLED = "killed"
    STOPPED = "stopped"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    START_FAILED = "start_failed"
    OUTPUT_FAILED = "output_failed"
    OOM = "oom"

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
    ExitReason.OUTPUT_FAILED: JobState.FAILED,
    ExitReason.OOM: JobState.FAILED,
}
