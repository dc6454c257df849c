"""The gunicorn worker class that keeps a busy keep-alive connection on its thread."""

from __future__ import annotations

import io
import queue
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from gunicorn.workers.gthread import ThreadWorker

from scheduler.http_worker import LingeringThreadWorker


def make_worker(linger_s: float, queued: int = 0) -> LingeringThreadWorker:
    # Only what the linger looks at: no arbiter, no sockets of gunicorn's own.
    worker = object.__new__(LingeringThreadWorker)
    worker.linger_s = linger_s
    worker.alive = True
    work = queue.SimpleQueue()
    for _ in range(queued):
        work.put(object())
    worker.tpool = SimpleNamespace(_work_queue=work)
    return worker


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def make_conn(sock, buffered: bytes = b"", http2: bool = False):
    return SimpleNamespace(
        sock=sock,
        parser=SimpleNamespace(unreader=SimpleNamespace(buf=io.BytesIO(buffered))),
        is_http2=http2,
    )


def test_a_request_arriving_within_the_linger_is_taken(pair):
    server, client = pair
    worker = make_worker(0.5)
    threading.Timer(0.05, client.sendall, (b"GET / HTTP/1.1\r\n",)).start()
    began = time.monotonic()
    assert worker._next_request_soon(make_conn(server))
    assert time.monotonic() - began < 0.4


def test_a_quiet_connection_is_handed_back_after_the_linger(pair):
    server, _ = pair
    worker = make_worker(0.05)
    began = time.monotonic()
    assert not worker._next_request_soon(make_conn(server))
    assert 0.04 <= time.monotonic() - began < 0.5


def test_bytes_read_ahead_count_as_the_next_request_without_waiting(pair):
    server, _ = pair
    worker = make_worker(0.0)  # even with lingering off
    assert worker._next_request_soon(make_conn(server, b"GET / HTTP/1.1\r\n"))


def test_no_linger_while_other_connections_wait_for_a_thread(pair):
    server, client = pair
    client.sendall(b"GET / HTTP/1.1\r\n")
    assert not make_worker(0.5, queued=1)._next_request_soon(make_conn(server))
    assert make_worker(0.5, queued=0)._next_request_soon(make_conn(server))


def test_linger_zero_never_waits(pair):
    server, client = pair
    client.sendall(b"GET / HTTP/1.1\r\n")
    assert not make_worker(0.0)._next_request_soon(make_conn(server))


def test_http2_connections_are_left_to_gunicorn(pair):
    server, client = pair
    client.sendall(b"data")
    assert not make_worker(0.5)._next_request_soon(make_conn(server, http2=True))


def test_handle_serves_requests_until_the_connection_goes_quiet(monkeypatch):
    answers = iter([True, True, True, False])
    calls = []

    def handle(self, conn):
        calls.append(conn)
        return next(answers)

    monkeypatch.setattr(ThreadWorker, "handle", handle)
    worker = make_worker(0.5)
    monkeypatch.setattr(worker, "_next_request_soon", lambda conn: True)
    conn = object()
    # Not kept alive after the fourth: the connection is not waited on again.
    assert worker.handle(conn) is False
    assert calls == [conn] * 4


def test_handle_returns_a_quiet_connection_to_gunicorn(monkeypatch):
    monkeypatch.setattr(ThreadWorker, "handle", lambda self, conn: True)
    worker = make_worker(0.5)
    monkeypatch.setattr(worker, "_next_request_soon", lambda conn: False)
    # Kept alive: gunicorn's own poller watches it from here.
    assert worker.handle(object()) is True


def test_a_stopping_worker_does_not_linger(monkeypatch):
    calls = []
    monkeypatch.setattr(
        ThreadWorker, "handle", lambda self, conn: calls.append(1) or True
    )
    worker = make_worker(0.5)
    worker.alive = False
    monkeypatch.setattr(worker, "_next_request_soon", lambda conn: True)
    assert worker.handle(object()) is True
    assert calls == [1]
