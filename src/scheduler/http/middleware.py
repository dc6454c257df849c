"""Request ids: one per HTTP request, in the response and in every log line."""

from __future__ import annotations

import re
import uuid

import falcon

from jobgate import logs

_VALID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestId:
    """Takes a sane ``X-Request-ID`` from the client or makes one.

    The id is bound to the logging context (``REQUEST_ID`` field), echoed in
    the response and passed on to the worker as gRPC metadata, so one request
    can be traced through the scheduler's and the worker's journals.
    """

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        given = req.get_header("X-Request-ID") or ""
        rid = given if _VALID.match(given) else uuid.uuid4().hex
        req.context.request_id = rid
        req.context.log_token = logs.bind(REQUEST_ID=rid)
        resp.set_header("X-Request-ID", rid)

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        token = getattr(req.context, "log_token", None)
        if token is not None:
            logs.unbind(token)
