"""Errors to HTTP, in one place: the gRPC status of an error picks its HTTP code.

Everything the API answers an error with comes from :func:`problem`: the
error handlers of the app, and each worker's entry of a fan-out (so a worker
that refuses its part of a fan-out is reported with the very status, title
and description that starting the job on that worker alone is answered
with). Errors are :mod:`jobgate.errors` exceptions; a worker's gRPC error was
converted to one where the call was made (:mod:`scheduler.worker_errors`).
Any other exception is a defect: logged with its traceback and answered 500,
without details.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import falcon
import grpc

from jobgate.errors import JobgateError, Unavailable
from scheduler.http.connection import AbortResponse

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    429: "Too many requests",
    499: "Cancelled",
    500: "Internal error",
    501: "Not implemented",
    503: "Worker unavailable",
    504: "Worker timed out",
}

# What a 500 says instead of its message: the log has the details.
INTERNAL_DESCRIPTION = "internal error; see the scheduler's log"

# Statuses that tell the client when to try again.
RETRY_STATUSES = (429, 503)


@dataclass(frozen=True)
class Problem:
    """An error as HTTP answers it: status, title, description, Retry-After."""

    status: int
    title: str
    description: str
    retry_after_s: int | None = None
    challenge: str | None = None  # a 401's WWW-Authenticate

    def http_error(self) -> falcon.HTTPError:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        if self.challenge is not None:
            headers["WWW-Authenticate"] = self.challenge
        return falcon.HTTPError(
            falcon.code_to_http_status(self.status),
            title=self.title,
            description=self.description,
            headers=headers,
        )

    def entry(self) -> dict:
        """The error as a fan-out reports one worker's: ``error`` is the
        description, beside the status and title."""
        return {"error": self.description, "status": self.status, "title": self.title}


def problem(exc: BaseException, retry_after_s: int = 5, doing: str = "") -> Problem:
    """How HTTP answers ``exc``: the one map from errors to HTTP.

    ``retry_after_s`` is the Retry-After of a 429, and of a 503 whose error
    does not carry its own. ``doing`` says what failed, for the log line of
    an unexpected exception.
    """
    if not isinstance(exc, JobgateError):
        log.error("unexpected error%s", f" {doing}" if doing else "", exc_info=exc)
        return Problem(500, TITLES[500], INTERNAL_DESCRIPTION)
    status = HTTP_STATUS.get(exc.code, 500)
    retry = None
    if status in RETRY_STATUSES:
        retry = exc.retry_after_s if isinstance(exc, Unavailable) else retry_after_s
    if status >= 500 and status != 503:
        log.error("answering %d: %s: %s", status, exc.code.name, exc.message)
    description = INTERNAL_DESCRIPTION if status == 500 else exc.message
    challenge = getattr(exc, "challenge", None) if status == 401 else None
    title = getattr(exc, "title", None) or TITLES.get(status, "Error")
    return Problem(status, title, description, retry, challenge)


def make_handlers(retry_after_s: int):
    """The app's error handlers: every exception a responder raises."""

    async def on_error(req, resp, exc: Exception, params):
        if isinstance(exc, falcon.HTTPError | AbortResponse):
            raise exc
        raise problem(
            exc, retry_after_s, f"serving {req.method} {req.path}"
        ).http_error()

    return [(Exception, on_error)]


def install(app, retry_after_s: int) -> None:
    """Answer every error ``app`` meets through the one map, as JSON."""
    app.set_error_serializer(json_errors)
    for exc, handler in make_handlers(retry_after_s):
        app.add_error_handler(exc, handler)


def json_errors(req, resp, exc: falcon.HTTPError) -> None:
    """Errors are JSON whatever the client accepts (SSE and curl clients too)."""
    resp.data = exc.to_json()
    resp.content_type = falcon.MEDIA_JSON
