"""Domain errors: each carries the gRPC status it is reported with.

The servicers raise these; :func:`abort` turns one into a gRPC status. The
scheduler maps gRPC status codes to HTTP in one table (``scheduler.errors``).
"""

from __future__ import annotations

import grpc


class JobgateError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(JobgateError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(JobgateError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(JobgateError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(JobgateError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(JobgateError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(JobgateError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(JobgateError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(JobgateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
