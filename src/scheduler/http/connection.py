"""One HTTP/1.1 client connection, served to an ASGI app on the event loop.

The scheduler's HTTP processes serve every connection from one asyncio loop:
an idle, slow or streaming client costs a coroutine and its buffers, never a
thread. Parsing and framing are :mod:`h11`'s (a sans-IO HTTP/1.1 state
machine that refuses ambiguous framing); this module adds what a server
facing untrusted clients must decide itself:

* a deadline for a request's head and body (``request_timeout_s``, from the
  first byte of the request, or from the connection's start for its first
  request): a client still sending when it passes gets ``408`` and the
  connection is closed;
* an idle keep-alive timeout between requests (``keepalive_s``);
* a cap on open connections per process: the connection over it is answered
  ``503`` with ``Retry-After`` at once and closed, never queued;
* limits on the request line (``414``) and the head (``431``);
* a client that goes away cancels its request: nothing it asked for runs
  after it left, and a follower's stream is let go at once;
* every error the server itself produces is JSON (``title``,
  ``description``), like the app's.

The time a request took is measured from its first byte: the app finds it
as ``scope["jobgate.received_at"]`` (a :func:`time.perf_counter` value).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus

import h11

log = logging.getLogger("scheduler.http.access")


# How long a connection refused with an error is read from (and what it
# sends dropped) before it is closed; see HttpConnection._linger.
LINGER_S = 2.0


@dataclass(frozen=True)
class Limits:
    """What one connection may cost; see ``[http]`` in the scheduler's config."""

    request_timeout_s: float = 10.0
    keepalive_s: float = 5.0
    max_connections: int = 10_000
    max_request_line_bytes: int = 8192
    max_head_bytes: int = 32768
    # Body bytes held for the app before the connection stops reading: the
    # app refuses a larger body anyway ([http].max_body_bytes).
    max_body_bytes: int = 65536
    retry_after_s: int = 5


class Counter:
    """The open connections of this process (the cap counts them)."""

    def __init__(self) -> None:
        self.open = 0
        self.refused = 0
        self.draining = False
        self.connections: set[HttpConnection] = set()
        self._idle: asyncio.Event | None = None

    def add(self, conn: HttpConnection) -> None:
        self.open += 1
        self.connections.add(conn)

    def remove(self, conn: HttpConnection) -> None:
        self.open -= 1
        self.connections.discard(conn)
        if self._idle is not None and self.open <= 0:
            self._idle.set()

    def idle_event(self) -> asyncio.Event:
        """Start draining: idle connections close now, busy ones after their
        response; the event is set once none is left."""
        self.draining = True
        self._idle = asyncio.Event()
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
        if self.open <= 0:
            self._idle.set()
        return self._idle


class ClientGone(ConnectionError):
    """The client closed the connection before its response was written."""


class AbortResponse(Exception):  # noqa: N818 - an instruction, not a failure
    """Raised by an app mid-response: end it by closing the connection, so
    the client sees an incomplete transfer rather than a complete one."""


def error_body(status: int, description: str) -> bytes:
    title = HTTPStatus(status).phrase
    return json.dumps({"title": title, "description": description}).encode()


def _error_headers(body: bytes, extra=()) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra,
    ]


class HttpConnection(asyncio.Protocol):
    """The protocol of one client connection (see the module's docstring)."""

    def __init__(
        self,
        app,
        limits: Limits,
        counter: Counter,
        scheme: str = "http",
    ):
        self.app = app
        self.limits = limits
        self.counter = counter
        self.scheme = scheme
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=limits.max_head_bytes
        )
        self.closed = False
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.received_at: float | None = None  # first byte of this request
        self.peer = None
        self.sockname = None
        self.peercert = None
        self.body: list[bytes] = []
        self.body_bytes = 0  # in self.body, not yet taken by the app
        self.body_paused = False
        self.body_done = False
        self.body_event = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.responded = False  # the response to this request is complete
        self.response_started = False
        self.head_request = False
        self._body_ended = False
        self.cycle_bytes = 0

    # -- connection events ----------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.counter.add(self)
        self.peer = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.peercert = ssl_object.getpeercert()
        if self.counter.open > self.limits.max_connections:
            self.counter.refused += 1
            self._refuse(
                503,
                f"this server holds its limit of {self.limits.max_connections} "
                "connections per process ([http].max_connections); retry later",
                ((b"retry-after", str(self.limits.retry_after_s).encode()),),
            )
            return
        self._arm(self.limits.request_timeout_s)

    def connection_lost(self, exc) -> None:
        self.counter.remove(self)
        self._gone()

    def eof_received(self):
        # A client that closes its side is taken as gone: it can no longer
        # be told it was too slow, and what it asked for is not done.
        self._gone()
        return False

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.received_at is None:
            self.received_at = time.perf_counter()
            if self.conn.their_state is h11.IDLE and self.task is None:
                # The first byte of a request after an idle keep-alive: it
                # now has the request deadline to arrive whole.
                self._arm(self.limits.request_timeout_s)
        self.cycle_bytes += len(data)
        self.conn.receive_data(data)
        self._process()

    # -- parsing ----------------------------------------------------------------

    def _process(self) -> None:
        while not self.closed:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is h11.NEED_DATA:
                self._check_line()
                return
            if event is h11.PAUSED:
                # A pipelined request waits until this one is answered.
                self.transport.pause_reading()
                return
            if isinstance(event, h11.Request):
                self._start(event)
            elif isinstance(event, h11.Data):
                self.body.append(event.data)
                self.body_bytes += len(event.data)
                self.body_event.set()
                if (
                    self.body_bytes > self.limits.max_body_bytes
                    and not self.body_paused
                ):
                    # An app that does not read (yet) holds no more than this.
                    self.body_paused = True
                    self.transport.pause_reading()
            elif isinstance(event, h11.EndOfMessage):
                self.body_done = True
                self.body_event.set()
                self._disarm()
            elif isinstance(event, h11.ConnectionClosed):
                self._gone()
                return

    def _check_line(self) -> None:
        """Refuse a request line that is already longer than allowed (414)."""
        if self.conn.their_state is not h11.IDLE:
            return
        pending, _ = self.conn.trailing_data
        limit = self.limits.max_request_line_bytes
        end = pending.find(b"\n", 0, limit + 2)
        if (end == -1 and len(pending) > limit) or end > limit + 1:
            self._refuse(
                414,
                f"the request line is longer than {limit} bytes "
                "([http].max_request_line_bytes)",
            )

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        if status == 431:
            description = (
                f"the request head is larger than {self.limits.max_head_bytes} "
                "bytes ([http].max_head_bytes)"
            )
        else:
            description = f"malformed HTTP request: {exc}"
        self._refuse(status, description)

    # -- one request --------------------------------------------------------------

    def _start(self, request: h11.Request) -> None:
        target = request.target
        limits = self.limits
        if len(target) > limits.max_request_line_bytes:
            self._refuse(
                414,
                f"the request line is longer than {limits.max_request_line_bytes}"
                " bytes ([http].max_request_line_bytes)",
            )
            return
        # h11 bounds a head that arrives in pieces; one that arrives whole
        # is measured here.
        size = len(target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if size > limits.max_head_bytes:
            self._refuse(
                431,
                f"the request head is larger than {limits.max_head_bytes} bytes "
                "([http].max_head_bytes)",
            )
            return
        names = [k for k, _ in request.headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            # Two framings that proxies may read differently (smuggling).
            self._refuse(
                400,
                "malformed HTTP request: both Transfer-Encoding and "
                "Content-Length; send one",
            )
            return
        path, _, query = target.partition(b"?")
        try:
            decoded = _unquote(path)
        except ValueError as exc:
            self._refuse(400, f"the request path is not valid: {exc}")
            return
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(),
            "method": request.method.decode("ascii"),
            "scheme": self.scheme,
            "path": decoded,
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": [(k, v) for k, v in request.headers],
            "client": self.peer[:2] if self.peer else None,
            "server": self.sockname[:2] if self.sockname else None,
            "jobgate.received_at": self.received_at or time.perf_counter(),
            "jobgate.peercert": self.peercert,
        }
        self.body = []
        self.body_bytes = 0
        self.body_done = False
        self.body_event = asyncio.Event()
        self.responded = False
        self.response_started = False
        self.head_request = request.method == b"HEAD"
        self.task = self.loop.create_task(self._run(scope))

    async def _run(self, scope: dict) -> None:
        try:
            await self.app(scope, self._receive, self._send)
        except (ClientGone, asyncio.CancelledError):
            return
        except AbortResponse:
            self.close()
            return
        except Exception:
            log.exception(
                "unexpected error serving %s %s", scope["method"], scope["path"]
            )
            if not self.response_started and not self.closed:
                self._refuse(500, "internal error; see the scheduler's log")
            else:
                self.close()
            return
        if not self.responded and not self.closed:
            # The app ended without a complete response: the client cannot
            # tell where the body ends but by the connection closing.
            self.close()
            return
        self._next_cycle()

    async def _receive(self) -> dict:
        if self.conn.they_are_waiting_for_100_continue and not self.closed:
            # The client (curl, for a body over 1 KiB) holds its body back
            # until told to send it; the app wants it now.
            self._write(
                self.conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        while True:
            if self.closed:
                return {"type": "http.disconnect"}
            if self.body or self.body_done:
                data = b"".join(self.body)
                self.body = []
                self.body_bytes = 0
                if self.body_paused:
                    self.body_paused = False
                    self.transport.resume_reading()
                if not self.body_done:
                    # The app reads the body as it comes: keep the reader fed.
                    return {"type": "http.request", "body": data, "more_body": True}
                if data or not self._body_ended:
                    self._body_ended = True
                    return {"type": "http.request", "body": data, "more_body": False}
                # The body was read whole: wait for the client to go away.
            self.body_event.clear()
            await self.body_event.wait()

    async def _send(self, message: dict) -> None:
        if self.closed:
            raise ClientGone()
        kind = message["type"]
        if kind == "http.response.start":
            self.response_started = True
            self._body_ended = False
            headers = [(k, v) for k, v in message.get("headers", ())]
            self._write(
                self.conn.send(
                    h11.Response(status_code=message["status"], headers=headers)
                )
            )
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if body and not self.head_request:
                self._write(self.conn.send(h11.Data(data=body)))
            if not message.get("more_body", False):
                self._write(self.conn.send(h11.EndOfMessage()))
                self.responded = True
        if not self.writable.is_set():
            await self._drain()

    async def _drain(self) -> None:
        """Wait until the client has taken enough of what was written.

        This is what bounds the memory of a follower whose client reads
        slowly: its stream waits here, not in a growing buffer.
        """
        await self.writable.wait()
        if self.closed:
            raise ClientGone()

    def _write(self, data: bytes | None) -> None:
        if data and not self.closed:
            self.transport.write(data)

    def _next_cycle(self) -> None:
        """After a complete response: the next request, or the end."""
        self.task = None
        self._body_ended = False
        if (
            self.counter.draining
            or self.conn.our_state is h11.MUST_CLOSE
            or self.conn.their_state is not h11.DONE
        ):
            self.close()
            return
        try:
            self.conn.start_next_cycle()
        except h11.LocalProtocolError:
            self.close()
            return
        self.received_at = None
        self.cycle_bytes = 0
        pending, _ = self.conn.trailing_data
        if pending:
            self.received_at = time.perf_counter()
            self._arm(self.limits.request_timeout_s)
        else:
            self._arm(self.limits.keepalive_s)
        self.transport.resume_reading()
        self._process()

    # -- timers and endings -----------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        if seconds > 0:
            self.timer = self.loop.call_later(seconds, self._timed_out)
        else:
            self.timer = self.loop.call_soon(self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.closed or self.task is not None and self.body_done:
            return
        if self.cycle_bytes or self.task is not None:
            self._refuse(
                408,
                f"the request did not arrive whole within "
                f"{self.limits.request_timeout_s:g} s ([http].request_timeout_s)",
            )
        else:
            self.close()  # an idle connection: nothing to answer

    def _refuse(self, status: int, description: str, extra=()) -> None:
        """Answer with a JSON error the server makes itself, then close."""
        if self.closed:
            return
        if not self.response_started:
            body = error_body(status, description)
            head = h11.Response(status_code=status, headers=_error_headers(body, extra))
            try:
                data = self.conn.send(head) + self.conn.send(h11.Data(data=body))
            except h11.LocalProtocolError:
                # h11 is past the point of answering (an error in the head):
                # write the response bytes directly.
                reason = HTTPStatus(status).phrase
                lines = [f"HTTP/1.1 {status} {reason}".encode()]
                lines += [k + b": " + v for k, v in _error_headers(body, extra)]
                data = b"\r\n".join(lines) + b"\r\n\r\n" + body
            self.transport.write(data)
            if self.peer is not None:
                log.info('%s "-" %d (refused: %s)', self.peer[0], status, description)
        self._linger()

    def _linger(self) -> None:
        """Close after an error answer without losing it.

        Closing a socket that still holds unread bytes from the client makes
        the kernel reset the connection, and a reset can destroy the answer
        before the client reads it. So the server stops writing, reads and
        drops whatever else comes for a moment (or until the client closes),
        and only then closes.
        """
        self.closed = True
        self._disarm()
        self._wake()
        if self.task is not None and not self.responded:
            self.task.cancel()
        transport = self.transport
        if self.body_paused:
            self.body_paused = False
            transport.resume_reading()  # what comes now is read and dropped
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()
            return
        self.timer = self.loop.call_later(LINGER_S, transport.close)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _gone(self) -> None:
        """The client left: close, and cancel a request still being served."""
        if not self.closed:
            self.closed = True
            self._disarm()
            if self.transport is not None:
                self.transport.close()
        self._wake()
        if self.task is not None and not self.responded:
            self.task.cancel()

    def _wake(self) -> None:
        self.body_event.set()
        self.writable.set()


def _unquote(path: bytes) -> str:
    """The request path, percent-decoded, as ASGI wants it."""
    if b"%" not in path:
        return path.decode("latin-1")
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(path).decode("utf-8", "surrogateescape")
