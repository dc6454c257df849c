"""Errors to HTTP, in one place: the gRPC status of an error picks its HTTP code."""

from __future__ import annotations

import logging

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


def http_error(code: grpc.StatusCode, message: str, retry_after: int | None = None):
    status = HTTP_STATUS.get(code, 500)
    headers = {}
    if status in (429, 503):
        headers["Retry-After"] = str(retry_after or 5)
    if status >= 500 and status != 503:
        log.error("worker call failed: %s: %s", code.name, message)
    return falcon.HTTPError(
        falcon.code_to_http_status(status),
        title=TITLES.get(status, "Error"),
        description=message
        if status != 500
        else "internal error; see the scheduler's log",
        headers=headers,
    )


def make_handlers(retry_after_s: int):
    """Falcon error handlers for domain errors and gRPC errors from workers."""

    async def on_domain_error(req, resp, exc: JobgateError, params):
        retry = exc.retry_after_s if isinstance(exc, Unavailable) else retry_after_s
        raise http_error(exc.code, exc.message, retry)

    async def on_rpc_error(req, resp, exc: grpc.RpcError, params):
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"the worker cannot be reached: {details}"
        raise http_error(code, details, retry_after_s)

    async def on_unexpected(req, resp, exc: Exception, params):
        if isinstance(exc, falcon.HTTPError | AbortResponse):
            raise exc
        log.exception("unexpected error serving %s %s", req.method, req.path)
        raise falcon.HTTPInternalServerError(
            title="Internal error",
            description="internal error; see the scheduler's log",
        )

    return [
        (Exception, on_unexpected),
        (grpc.RpcError, on_rpc_error),
        (JobgateError, on_domain_error),
    ]


def json_errors(req, resp, exc: falcon.HTTPError) -> None:
    """Errors are JSON whatever the client accepts (SSE and curl clients too)."""
    resp.data = exc.to_json()
    resp.content_type = falcon.MEDIA_JSON
