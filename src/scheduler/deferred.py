"""Work a request leaves until its response has been sent.

Bookkeeping that the client does not wait for (the access log line, request
metrics, the log line and count of a job just started) is handed to
:func:`after_response` and runs once gunicorn has written the response,
while the client reads it and sends its next request. A streamed response
does not wait for that: its work runs as soon as the stream starts. Outside
an HTTP request (fan-out threads, tests that call the gateway directly) it runs at
once.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

_TASKS: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "jobgate_after_response", default=None
)


def after_response(fn: Callable, *args) -> None:
    """Call ``fn(*args)`` after the response to the current request is sent.

    It runs in a copy of the caller's context, so log lines keep the request
    id and other fields bound to the request.
    """
    tasks = _TASKS.get()
    if tasks is None:
        fn(*args)
    else:
        tasks.append((contextvars.copy_context(), fn, args))


class AfterResponse:
    """WSGI wrapper that runs the deferred work once the body is written."""

    def __init__(self, app: Callable):
        self.app = app

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        tasks: list = []
        token = _TASKS.set(tasks)
        try:
            body = self.app(environ, start_response)
        except BaseException:
            _run(tasks)
            raise
        finally:
            _TASKS.reset(token)
        if not tasks:
            return body
        if not isinstance(body, list):
            # A stream (a job's output) can last for hours: its access line
            # and metrics are not held back until it ends.
            _run(tasks)
            return body
        return _ThenRun(body, tasks)


class _ThenRun:
    """A response body whose ``close()`` (called by the server after the last
    byte is written) also runs the request's deferred work."""

    def __init__(self, body: Iterable[bytes], tasks: list):
        self._body = body
        self._tasks = tasks

    def __iter__(self):
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            _run(self._tasks)


def _run(tasks: list) -> None:
    for ctx, fn, args in tasks:
        try:
            ctx.run(fn, *args)
        except Exception:  # noqa: BLE001 - the response is out; keep serving
            log.exception("work deferred until after a response failed: %r", fn)
    tasks.clear()
