"""One HTTP connection on the event loop: framing, deadlines, caps, departures.

The connection is driven with a fake transport: bytes in through
``data_received``, what the server wrote collected from ``write``.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from scheduler.http.connection import (
    AbortResponse,
    Counter,
    HttpConnection,
    Limits,
)


class Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.eof = False
        self.reading = True
        self.protocol: HttpConnection | None = None

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.written += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 80)}.get(
            name, default
        )


async def hello_app(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    text = f"{scope['method']} {scope['path']} {body.decode()}".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(text)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": text})


def connect(app=hello_app, counter=None, **limits) -> tuple[HttpConnection, Transport]:
    conn = HttpConnection(app, Limits(**limits), counter or Counter())
    transport = Transport()
    transport.protocol = conn
    conn.connection_made(transport)
    return conn, transport


async def settle(times: int = 5) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


def answers(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each Content-Length answer in ``raw``."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        out.append((int(lines[0].split()[1]), rest[:length]))
        raw = rest[length:]
    return out


def test_pipelined_requests_are_answered_in_order():
    async def main():
        conn, t = connect()
        conn.data_received(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
        )
        await settle(10)
        assert answers(bytes(t.written)) == [(200, b"GET /a "), (200, b"POST /b hi")]
        assert not t.closed

    run(main())


def test_a_body_in_pieces_reaches_the_app_whole():
    async def main():
        conn, t = connect()
        conn.data_received(
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab"
        )
        await settle()
        assert t.written == b""
        conn.data_received(b"cde")
        await settle()
        assert answers(bytes(t.written)) == [(200, b"POST /b abcde")]

    run(main())


def test_a_body_the_app_has_not_read_stops_the_reading_at_the_body_limit():
    go = asyncio.Event()

    async def slow_app(scope, receive, send):
        await go.wait()  # busy elsewhere before it reads the body
        await hello_app(scope, receive, send)

    async def main():
        conn, t = connect(slow_app, max_body_bytes=1024)
        conn.data_received(
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n" + b"a" * 1000
        )
        await settle()
        assert t.reading
        conn.data_received(b"b" * 1000)
        await settle()
        assert not t.reading  # 2,000 bytes held for an app that reads none
        go.set()
        await settle()
        assert t.reading
        conn.data_received(b"c" * 1000)
        await settle()
        assert answers(bytes(t.written)) == [
            (200, b"POST /b " + b"a" * 1000 + b"b" * 1000 + b"c" * 1000)
        ]

    run(main())


def test_a_client_that_expects_100_continue_is_told_to_send_its_body():
    async def main():
        conn, t = connect()
        conn.data_received(
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        await settle()
        assert t.written == b"HTTP/1.1 100 \r\n\r\n"
        conn.data_received(b"hi")
        await settle()
        head, _, rest = bytes(t.written).partition(b"\r\n\r\n")
        assert answers(rest) == [(200, b"POST /b hi")]

    run(main())


def test_a_request_that_does_not_arrive_in_time_gets_408_json_and_is_closed():
    async def main():
        conn, t = connect(request_timeout_s=0.05)
        conn.data_received(b"GET /v1/wor")
        await asyncio.sleep(0.1)
        [(status, body)] = answers(bytes(t.written))
        assert status == 408
        assert "request_timeout_s" in json.loads(body)["description"]
        assert t.eof  # the answer is sent before the connection goes
        await asyncio.sleep(0)

    run(main())


def test_an_idle_kept_alive_connection_is_closed_without_an_answer():
    async def main():
        conn, t = connect(keepalive_s=0.05)
        conn.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        written = bytes(t.written)
        await asyncio.sleep(0.1)
        assert t.closed and bytes(t.written) == written

    run(main())


def test_a_connection_over_the_cap_is_refused_at_once_with_503():
    async def main():
        counter = Counter()
        first, _ = connect(counter=counter, max_connections=16)
        for _ in range(15):
            connect(counter=counter, max_connections=16)
        _, t = connect(counter=counter, max_connections=16)
        [(status, body)] = answers(bytes(t.written))
        assert status == 503
        assert "[http].max_connections" in json.loads(body)["description"]
        assert b"retry-after: 5" in t.written.lower()
        assert counter.refused == 1

    run(main())


def test_a_client_that_leaves_cancels_its_request():
    started, cancelled = asyncio.Event(), []

    async def slow_app(scope, receive, send):
        await receive()
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(scope["path"])
            raise

    async def main():
        conn, t = connect(slow_app)
        conn.data_received(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await started.wait()
        conn.eof_received()
        await settle()
        assert cancelled == ["/slow"]
        assert t.written == b""

    run(main())


def test_a_head_answer_has_no_body():
    async def main():
        conn, t = connect()
        conn.data_received(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        assert t.written.startswith(b"HTTP/1.1 200")
        assert t.written.endswith(b"\r\n\r\n")

    run(main())


def test_an_aborted_stream_ends_without_its_last_chunk():
    async def aborting(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise AbortResponse()

    async def main():
        conn, t = connect(aborting)
        conn.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        assert b"4\r\npart\r\n" in t.written
        assert not t.written.endswith(b"0\r\n\r\n")
        assert t.closed

    run(main())


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /" + b"a" * 300, 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"b" * 2000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nX: " + b"b" * 2000, 431),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    ],
)
def test_the_servers_own_errors_are_json(data, status):
    async def main():
        conn, t = connect(max_request_line_bytes=256, max_head_bytes=1024)
        conn.data_received(data)
        await settle()
        [(got, body)] = answers(bytes(t.written))
        assert got == status
        assert set(json.loads(body)) == {"title", "description"}

    run(main())


def test_draining_closes_idle_connections_and_waits_for_busy_ones():
    release = asyncio.Event

    async def main():
        gate = release()

        async def waiting_app(scope, receive, send):
            await receive()
            await gate.wait()
            await hello_app(scope, _empty, send)

        counter = Counter()
        idle, idle_t = connect(counter=counter)
        busy, busy_t = connect(waiting_app, counter=counter)
        busy.data_received(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        done = counter.idle_event()
        await settle()
        assert idle_t.closed and not busy_t.closed
        gate.set()
        await asyncio.wait_for(done.wait(), 1)
        assert answers(bytes(busy_t.written)) == [(200, b"GET /b ")]
        assert busy_t.closed  # no keep-alive while draining

    run(main())


async def _empty():
    return {"type": "http.request", "body": b"", "more_body": False}
