"""The HTTP front under slow, idle, streaming and malformed clients.

A cluster of its own with short deadlines, so the tests see them pass: a
request has 2 s to arrive whole, and each HTTP process takes at most 600
connections.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import time
import uuid

import pytest
from conftest import Api, cluster_of_its_own, make_public_dir
from test_lifecycle import wait_for

from jobgate.dev.cluster import DevCluster

REQUEST_TIMEOUT_S = 2
MAX_CONNECTIONS = 600


@pytest.fixture(scope="module")
def front(scripts_dir):
    with cluster_of_its_own(
        "front",
        scripts_dir,
        http_processes=2,
        http_extra=(
            f"request_timeout_s = {REQUEST_TIMEOUT_S}\n"
            f"max_connections = {MAX_CONNECTIONS}\n"
            "max_followers_per_caller = 400\n"
        ),
    ) as c:
        yield c


def port(cluster) -> int:
    return cluster.scheduler_info["http_port"]


def raw_request(cluster, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a new connection; everything the server answers."""
    with socket.create_connection(("127.0.0.1", port(cluster)), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def read_answer(s: socket.socket, raw: bytes = b"") -> bytes:
    """One answer with a Content-Length body, read whole from ``s`` (after
    the ``raw`` bytes of it read already)."""
    while b"\r\n\r\n" not in raw:
        raw += s.recv(65536)
    _, headers, body = split_response(raw)
    while len(body) < int(headers.get("content-length", 0)):
        body += s.recv(65536)
        raw = raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    return raw


def timed(fn, *args) -> tuple[float, object]:
    started = time.monotonic()
    result = fn(*args)
    return time.monotonic() - started, result


# -- slow and idle clients ---------------------------------------------------------


def test_slow_and_idle_clients_starve_nobody(front):
    api = Api(front)
    partial, idle = [], []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", port(front)))
            s.sendall(b"GET /v1/wor")
            partial.append(s)
            idle.append(socket.create_connection(("127.0.0.1", port(front))))
        opened = time.monotonic()
        for call in (
            lambda: api.get("/healthz"),
            lambda: api.get("/v1/workers"),
            lambda: api.start("worker-1", "hello.sh"),
        ):
            elapsed, result = timed(call)
            assert elapsed < 1, (elapsed, result)
        # The partial requests are answered 408 (JSON) and closed once the
        # request deadline passes; the idle connections are closed.
        for s in partial:
            s.settimeout(REQUEST_TIMEOUT_S + 5)
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
            status, headers, body = split_response(raw)
            assert status == 408
            assert headers["content-type"] == "application/json"
            assert "request_timeout_s" in json.loads(body)["description"]
        for s in idle:
            s.settimeout(REQUEST_TIMEOUT_S + 5)
            assert s.recv(65536) == b""
        assert time.monotonic() - opened < REQUEST_TIMEOUT_S + 5
    finally:
        for s in partial + idle:
            s.close()


def over_the_cap(front) -> tuple[int, str, float]:
    """Hold more connections than both processes take, then send 20 starts;
    how many were refused, their idempotency key, and the seconds it took."""
    held = []
    opened = time.monotonic()
    try:
        # Enough for both processes, whichever takes which connection.
        for _ in range(2 * MAX_CONNECTIONS + 50):
            held.append(socket.create_connection(("127.0.0.1", port(front))))
        key = uuid.uuid4().hex
        body = json.dumps(
            {"command": "bash", "path": "hello.sh", "idempotency_key": key}
        ).encode()
        refused = 0
        for _ in range(20):
            raw = raw_request(
                front,
                b"POST /v1/workers/worker-1/jobs HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {front.token}\r\n".encode()
                + b"Content-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body,
            )
            if not raw:
                continue
            status, headers, data = split_response(raw)
            if status == 503:
                refused += 1
                assert headers["retry-after"].isdigit()
                assert "[http].max_connections" in json.loads(data)["description"]
        return refused, key, time.monotonic() - opened
    finally:
        for s in held:
            s.close()


def test_connections_over_the_cap_are_refused_at_once_with_json(front):
    for _ in range(3):
        refused, key, took = over_the_cap(front)
        # The held connections are idle, and the server closes them once
        # their request deadline passes: on a machine slow enough to take
        # longer than that, nothing was over the cap any more. Again, then.
        if refused or took < REQUEST_TIMEOUT_S:
            break
    assert refused > 0
    # None of the refused starts ran.
    time.sleep(0.5)
    _, _, data = Api(front).get("/v1/workers/worker-1/jobs")
    started = [j for j in data["jobs"] if j["idempotency_key"] == key]
    assert len(started) <= 20 - refused


def test_a_start_whose_client_left_before_its_body_arrived_starts_nothing(front):
    key = uuid.uuid4().hex
    body = json.dumps({"command": "bash", "path": "hello.sh", "idempotency_key": key})
    with socket.create_connection(("127.0.0.1", port(front))) as s:
        s.sendall(
            b"POST /v1/workers/worker-1/jobs HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {front.token}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10].encode()
        )
        time.sleep(0.3)
    # The rest of the body would have come now; the client is gone instead.
    time.sleep(REQUEST_TIMEOUT_S + 0.5)
    _, _, data = Api(front).get("/v1/workers/worker-1/jobs")
    assert not [j for j in data["jobs"] if j["idempotency_key"] == key]


def test_the_access_log_counts_from_the_first_byte(front):
    path = f"/v1/workers/worker-1?probe={uuid.uuid4().hex}"
    with socket.create_connection(("127.0.0.1", port(front))) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\n".encode())
        time.sleep(0.6)
        s.sendall(
            f"Host: x\r\nAuthorization: Bearer {front.token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        while s.recv(65536):
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [
            line
            for line in (front.logs / "scheduler.log").read_text().splitlines()
            if path in line
        ]
        if lines:
            break
        time.sleep(0.1)
    ms = float(re.search(r" (\d+\.\d)ms", lines[-1]).group(1))
    assert ms >= 600, lines[-1]


# -- errors the server makes itself ------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "needle"),
    [
        (
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "max_request_line_bytes",
        ),
        (b"GET /" + b"a" * 9000, 414, "max_request_line_bytes"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 40000 + b"\r\n\r\n",
            431,
            "max_head_bytes",
        ),
        (b"NOT AN HTTP REQUEST\r\n\r\n", 400, "malformed HTTP request"),
        (
            b"POST /start HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "malformed HTTP request",
        ),
    ],
)
def test_server_errors_are_json(front, data, status, needle):
    got, headers, body = split_response(raw_request(front, data))
    assert got == status
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["title"] and needle in doc["description"]


def test_deep_json_is_400_on_every_body_route(front):
    deep = '{"a": ' + "[" * 20_000 + "]" * 20_000 + "}"
    api = Api(front)
    for path in ("/v1/workers/worker-1/jobs", "/v1/jobs", "/query", "/start"):
        status, _, data = front.request("POST", path, deep.encode())
        assert status == 400, (path, status, data)
        assert b"max_json_depth" in data
    assert api.get("/healthz")[0] == 200


def test_a_path_with_a_newline_cannot_forge_a_log_line(front):
    marker = uuid.uuid4().hex
    raw_request(
        front,
        f"GET /v1/workers/x%0a{marker}%0d%0aINFO HTTP/1.1\r\nHost: x\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    time.sleep(0.5)
    log = (front.logs / "scheduler.log").read_text().splitlines()
    assert not [line for line in log if line.startswith(marker)]
    assert [line for line in log if f"\\n{marker}" in line]


# -- followers -------------------------------------------------------------------


async def _follow(port: int, token: str, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return _unchunk(body)


def _unchunk(body: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2


def test_a_follower_storm_starves_nobody_and_everyone_gets_every_byte(front):
    api = Api(front)
    # 40 numbered lines, one every 50 ms: about 2 s of output.
    job = api.start("worker-1", "count.sh", ["40", "0.05"])
    path = f"/v1/workers/worker-1/jobs/{job['job_id']}/output?follow=true"
    followers = 300

    async def storm() -> tuple[list[bytes], list[float]]:
        tasks = [
            asyncio.create_task(_follow(port(front), front.token, path))
            for _ in range(followers)
        ]
        await asyncio.sleep(0.3)
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            status = await asyncio.to_thread(
                api.get, f"/v1/workers/worker-1/jobs/{job['job_id']}"
            )
            latencies.append(time.monotonic() - started)
            assert status[0] == 200
            await asyncio.sleep(0.1)
        return await asyncio.gather(*tasks), latencies

    outputs, latencies = asyncio.run(storm())
    assert max(latencies) < 1, latencies
    expected = api.output("worker-1", job["job_id"], "offset=0")
    assert expected.count(b"\n") == 40
    digests = {hashlib.sha256(o).hexdigest() for o in outputs}
    assert digests == {hashlib.sha256(expected).hexdigest()}


def test_followers_over_the_per_caller_cap_get_503(front):
    api = Api(front)
    job = api.start("worker-1", "sleep.sh", ["30"])
    path = f"/v1/workers/worker-1/jobs/{job['job_id']}/output?follow=true"
    held = []
    try:
        refused = None
        # Two processes at 400 each: the 801st is over the cap wherever it lands.
        for _ in range(801):
            s = socket.create_connection(("127.0.0.1", port(front)))
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {front.token}\r\n\r\n".encode()
            )
            held.append(s)
        for s in held:
            s.settimeout(5)
            first = s.recv(12)
            if first.startswith(b"HTTP/1.1 503"):
                refused = read_answer(s, first)
                break
        assert refused is not None
        status, headers, body = split_response(refused)
        assert headers["retry-after"].isdigit()
        assert "[http].max_followers_per_caller" in json.loads(body)["description"]
        # A start that would follow its job is refused the same way, before
        # the job is started: a client that retries does not get it twice.
        refused_keys = []
        for _ in range(20):
            key = f"capped-{uuid.uuid4()}"
            start = json.dumps(
                {"command": "bash", "path": "hello.sh", "idempotency_key": key}
            )
            s = socket.create_connection(("127.0.0.1", port(front)))
            s.sendall(
                f"POST /v1/workers/worker-1/jobs?follow=true HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {front.token}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(start)}\r\n\r\n{start}".encode()
            )
            held.append(s)
            s.settimeout(5)
            if s.recv(12).startswith(b"HTTP/1.1 503"):
                refused_keys.append(key)
        assert refused_keys
        # The listing needs a connection of its own: with 821 held, the HTTP
        # process it lands on may be at [http].max_connections (a 503).
        for s in held:
            s.close()
        held.clear()
        listed: dict = {}

        def listing() -> bool:
            status, _, body = api.get("/v1/workers/worker-1/jobs")
            listed.update(body if status == 200 else {})
            return status == 200

        assert wait_for(listing, timeout=10)
        started_keys = {j["idempotency_key"] for j in listed["jobs"]}
        assert not started_keys & set(refused_keys)
    finally:
        for s in held:
            s.close()
        api.post(f"/v1/workers/worker-1/jobs/{job['job_id']}/stop")


# -- the HTTP process dies with the scheduler --------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def test_kill_9_of_the_scheduler_leaves_no_http_process_and_a_restart_works(
    scripts_dir,
):
    directory = make_public_dir("jobgate-test-orphan-")
    c = DevCluster(directory, scripts_dir=scripts_dir, http_processes=2)
    try:
        c.start(("worker-1",))
        main = c.scheduler.pid
        arbiter = _children(main)
        workers = [p for a in arbiter for p in _children(a)]
        assert arbiter and workers
        c.scheduler.signal(signal.SIGKILL)
        c.scheduler.proc.wait(10)
        deadline = time.monotonic() + 10
        left = arbiter + workers
        while left and time.monotonic() < deadline:
            left = [p for p in left if os.path.exists(f"/proc/{p}/stat")]
            time.sleep(0.1)
        assert not left, f"HTTP processes outlived the scheduler: {left}"
        c.restart_scheduler()
        assert Api(c).get("/healthz")[0] == 200
    finally:
        c.stop()
        shutil.rmtree(directory, ignore_errors=True)
