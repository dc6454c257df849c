"""Request ids and the access log: what every HTTP request leaves behind."""

from __future__ import annotations

import logging
import re
import time
import uuid

from jobgate import logs

_VALID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestId:
    """Takes a sane ``X-Request-ID`` from the client or makes one.

    The id is bound to the logging context (``REQUEST_ID`` field), echoed in
    the response and passed on to the worker as gRPC metadata, so one request
    can be traced through the scheduler's and the worker's journals.
    """

    async def process_request(self, req, resp) -> None:
        given = req.get_header("X-Request-ID") or ""
        rid = given if _VALID.match(given) else uuid.uuid4().hex
        req.context.request_id = rid
        req.context.log_token = logs.bind(REQUEST_ID=rid)
        resp.set_header("X-Request-ID", rid)

    async def process_response(self, req, resp, resource, req_succeeded) -> None:
        token = getattr(req.context, "log_token", None)
        if token is not None:
            logs.unbind(token)


def received_at(req) -> float:
    """When the request's first byte arrived (``time.perf_counter``).

    The HTTP server notes it in the ASGI scope; an app served otherwise
    (tests) counts from when the app saw the request.
    """
    return req.scope.get("jobgate.received_at") or time.perf_counter()


class AccessLog:
    """One log line per request: client, method, path, status and time taken.

    The time runs from the request's first byte to when the response's
    status and headers are ready, so a request that waited anywhere in the
    server shows it; for an output stream it is the time to the first byte
    (as in the ``jobgate_http_request_duration_seconds`` histogram). The
    line carries the request id like every other line of the request.
    """

    def __init__(self, logger: logging.Logger | None = None):
        self.log = logger or logging.getLogger("scheduler.http.access")

    async def process_response(self, req, resp, resource, req_succeeded) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return
        self.log.info(
            '%s "%s %s" %d %.1fms',
            req.remote_addr,
            req.method,
            req.relative_uri,
            resp.status_code,
            (time.perf_counter() - received_at(req)) * 1000,
        )
