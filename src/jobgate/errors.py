"""Domain errors: each carries the gRPC status it is reported with.

Every error a service means to report is one of these classes, raised with a
message that says what to fix. They cross each boundary through one map per
direction:

- out of a gRPC servicer: :class:`jobgate.grpc_guard.ServerGuard` aborts the call
  with the error's :attr:`~JobgateError.code` and message;
- back in from a worker's answer: :func:`from_status` gives the error of a
  status code (the scheduler converts a worker's ``grpc.RpcError`` with it in
  one place, ``scheduler.worker_errors``);
- out over HTTP: ``scheduler.http.errors`` maps the status code to an HTTP
  status and the JSON body ``{"title", "description"}``.
"""

from __future__ import annotations

import grpc


class JobgateError(Exception):
    """An error to report to the caller, with its status code and message."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Internal(JobgateError):
    code = grpc.StatusCode.INTERNAL


class Unknown(JobgateError):
    code = grpc.StatusCode.UNKNOWN


class Cancelled(JobgateError):
    code = grpc.StatusCode.CANCELLED


class InvalidArgument(JobgateError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfRange(JobgateError):
    code = grpc.StatusCode.OUT_OF_RANGE


class NotFound(JobgateError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(JobgateError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(JobgateError):
    code = grpc.StatusCode.ABORTED


class PermissionDenied(JobgateError):
    code = grpc.StatusCode.PERMISSION_DENIED


# What an HTTP 401 asks for (its WWW-Authenticate header, RFC 6750).
BEARER_CHALLENGE = 'Bearer realm="jobgate"'
INVALID_TOKEN_CHALLENGE = 'Bearer realm="jobgate", error="invalid_token"'  # noqa: S105


class Unauthenticated(JobgateError):
    """No identity, or one that is not valid; ``challenge`` is what HTTP asks for."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str, challenge: str = BEARER_CHALLENGE):
        super().__init__(message)
        self.challenge = challenge


class ResourceExhausted(JobgateError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(JobgateError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(JobgateError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DataLoss(JobgateError):
    code = grpc.StatusCode.DATA_LOSS


class Unavailable(JobgateError):
    """Not now: ``retry_after_s`` is when the caller had better try again."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SchedulerUnavailable(Unavailable):
    """The scheduler that answered cannot serve now (its state database does
    not answer it); another scheduler of the cluster may. HTTP answers it
    503 with :data:`SCHEDULER_UNAVAILABLE` as the title, which clients given
    several schedulers take as a reason to try the next one."""

    title = "Scheduler unavailable"


# The title of an HTTP 503 that another scheduler may not give.
SCHEDULER_UNAVAILABLE = SchedulerUnavailable.title


class DeadlineExceeded(JobgateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StreamExpired(DeadlineExceeded):
    """An output stream ran for its longest allowed time
    (``[workers].stream_timeout_s``); a new one resumes where it ended."""

    def __init__(
        self,
        message: str = "the output stream lasted its longest allowed time "
        "([workers].stream_timeout_s); follow again from the last offset "
        "received to go on",
    ):
        super().__init__(message)


_BY_CODE: dict[grpc.StatusCode, type[JobgateError]] = {
    cls.code: cls
    for cls in (
        Internal,
        Unknown,
        Cancelled,
        InvalidArgument,
        OutOfRange,
        NotFound,
        AlreadyExists,
        Aborted,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        FailedPrecondition,
        Unimplemented,
        DataLoss,
        Unavailable,
        DeadlineExceeded,
    )
}


def from_status(code: grpc.StatusCode, message: str) -> JobgateError:
    """The domain error a call answered with ``code`` and ``message`` reports.

    A code no class is known for (a newer gRPC's, or OK where an error was
    expected) is reported as UNKNOWN, its name kept in the message.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        return Unknown(f"{getattr(code, 'name', code)}: {message}")
    return cls(message)
