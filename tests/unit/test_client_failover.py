"""The client with several scheduler URLs: which requests go to the next one.

Each "scheduler" is a small HTTP server on 127.0.0.1 that records what it
got and answers as the test says: with JSON, or by closing the connection
once the request is in (a scheduler killed while it handled it).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading

import pytest

from jobgate.client.api import OWN_KEY_PREFIX, SCHEDULER_UNAVAILABLE, Client
from jobgate.client.errors import ApiError, ConnectionFailed, SettingsError
from jobgate.errors import SchedulerUnavailable


class Scheduler(http.server.ThreadingHTTPServer):
    def __init__(self, behaviour: str = "answer"):
        self.behaviour = behaviour
        self.requests: list[tuple[str, str, dict | None]] = []
        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        server: Scheduler = self.server  # type: ignore[assignment]
        server.requests.append((self.command, self.path, body))
        if server.behaviour == "die":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if server.behaviour == "die in the answer":
            # Killed while it wrote the answer: the headers, part of the body.
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"job_id": ')
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if server.behaviour in ("cut off", "worker down"):
            # Cut off from its database, or the worker asked for is down.
            title = {
                "cut off": SCHEDULER_UNAVAILABLE,
                "worker down": "Worker unavailable",
            }[server.behaviour]
            data = json.dumps({"title": title, "description": "not now"})
            self.send_response(503)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())
            return
        data = json.dumps({"job_id": "j-1", "state": "running", "workers": []})
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())

    do_GET = do_POST = _handle  # noqa: N815 - the handler's method names


def closed_port_url() -> str:
    """A URL nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def schedulers():
    made: list[Scheduler] = []

    def make(behaviour: str = "answer") -> Scheduler:
        made.append(Scheduler(behaviour))
        return made[-1]

    yield make
    for s in made:
        with contextlib.suppress(OSError):
            s.stop()


def test_a_scheduler_that_cannot_be_reached_is_passed_over(schedulers):
    alive = schedulers()
    client = Client(f"{closed_port_url()}, {alive.url}", "t")
    assert client.workers() == []
    assert client.url == alive.url  # and it stays with the one that answers
    client.workers()
    assert len(alive.requests) == 2


def test_a_read_that_broke_once_sent_is_sent_again_to_the_next(schedulers):
    dying, alive = schedulers("die"), schedulers()
    client = Client(f"{dying.url},{alive.url}", "t")
    assert client.job("worker-1", "j-1")["job_id"] == "j-1"
    assert [r[0] for r in dying.requests] == ["GET"]
    assert [r[0] for r in alive.requests] == ["GET"]


def test_a_read_whose_answer_broke_is_sent_again_to_the_next(schedulers):
    dying, alive = schedulers("die in the answer"), schedulers()
    client = Client(f"{dying.url},{alive.url}", "t")
    assert client.job("worker-1", "j-1")["job_id"] == "j-1"
    assert len(dying.requests) == len(alive.requests) == 1
    # With one scheduler, or a request not safe to repeat, it is the caller's.
    with pytest.raises(ConnectionFailed) as exc:
        Client(dying.url, "t").job("worker-1", "j-1")
    assert exc.value.sent
    other = schedulers()
    with pytest.raises(ConnectionFailed):
        Client(f"{dying.url},{other.url}", "t").request("POST", "/v1/x", {})
    assert other.requests == []


def test_a_start_gets_a_key_of_its_own_so_that_it_may_be_sent_again(schedulers):
    dying, alive = schedulers("die"), schedulers()
    client = Client(f"{dying.url},{alive.url}", "t")
    status, _ = client.start_job("worker-1", "count.sh")
    assert status == 201
    (_, _, first), (_, _, second) = dying.requests[0], alive.requests[0]
    assert first["idempotency_key"].startswith(OWN_KEY_PREFIX)
    assert second["idempotency_key"] == first["idempotency_key"]


def test_a_key_the_caller_gave_is_kept(schedulers):
    dying, alive = schedulers("die"), schedulers()
    client = Client(f"{dying.url},{alive.url}", "t")
    client.start_job("worker-1", "count.sh", idempotency_key="nightly-42")
    assert alive.requests[0][2]["idempotency_key"] == "nightly-42"


def test_with_one_scheduler_a_start_is_neither_keyed_nor_repeated(schedulers):
    dying = schedulers("die")
    client = Client(dying.url, "t")
    with pytest.raises(ConnectionFailed) as exc:
        client.start_job("worker-1", "count.sh")
    assert exc.value.sent
    assert len(dying.requests) == 1
    assert "idempotency_key" not in dying.requests[0][2]


def test_a_scheduler_cut_off_from_its_database_is_passed_over(schedulers):
    assert SCHEDULER_UNAVAILABLE == SchedulerUnavailable.title  # the one title
    cut, alive = schedulers("cut off"), schedulers()
    client = Client(f"{cut.url},{alive.url}", "t")
    assert client.job("worker-1", "j-1")["job_id"] == "j-1"
    status, _ = client.start_job("worker-1", "count.sh")  # keyed: repeatable
    assert status == 201
    assert len(cut.requests) == 1 and len(alive.requests) == 2


def test_a_503_of_the_worker_or_of_the_only_scheduler_is_the_callers(schedulers):
    down, alive = schedulers("worker down"), schedulers()
    with pytest.raises(ApiError) as exc:
        Client(f"{down.url},{alive.url}", "t").job("worker-1", "j-1")
    assert exc.value.title == "Worker unavailable"  # another would say the same
    assert alive.requests == []
    cut = schedulers("cut off")
    with pytest.raises(ApiError) as exc:
        Client(cut.url, "t").job("worker-1", "j-1")
    assert (exc.value.status, exc.value.retry_after) == (503, "1")
    a, b = schedulers("cut off"), schedulers("cut off")
    with pytest.raises(ApiError):  # every one cut off: the last answer
        Client(f"{a.url},{b.url}", "t").job("worker-1", "j-1")
    assert len(a.requests) == len(b.requests) == 1


def test_every_scheduler_unreachable_names_each(schedulers):
    a, b = closed_port_url(), closed_port_url()
    with pytest.raises(ConnectionFailed) as exc:
        Client(f"{a},{b}", "t").workers()
    assert a in str(exc.value) and b in str(exc.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://a:1,,http://b:1", "has an empty URL between its commas"),
        ("http://a:1,https://b:1", "mixes http:// and https:// URLs"),
        ("http://a:1,ftp://b:1", "is not an http:// or https:// URL"),
    ],
)
def test_a_bad_list_of_urls_is_refused_with_what_to_fix(url, message):
    with pytest.raises(SettingsError, match=message):
        Client(url, "t")
