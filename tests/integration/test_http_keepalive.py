"""Kept-alive HTTP connections: requests back to back, after pauses and
pipelined, are answered in order."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor


def connect(cluster) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(
        "127.0.0.1", cluster.scheduler_info["http_port"], timeout=30
    )


def headers(cluster, **extra) -> dict:
    return {"Authorization": f"Bearer {cluster.token}", **extra}


def get_json(conn, cluster, path):
    conn.request("GET", path, headers=headers(cluster))
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_requests_back_to_back_on_one_connection(api, cluster):
    job = api.start("worker-1", "hello.sh")
    conn = connect(cluster)
    body = json.dumps({"worker_id": "worker-1", "job_id": job["job_id"]})
    try:
        for i in range(60):
            if i % 2:
                conn.request(
                    "POST",
                    "/query",
                    body=body,
                    headers=headers(cluster, **{"Content-Type": "application/json"}),
                )
                resp = conn.getresponse()
                status, data = resp.status, json.loads(resp.read())
                assert status == 200 and "done" in data, (status, data)
            else:
                status, data = get_json(
                    conn, cluster, f"/v1/workers/worker-1/jobs/{job['job_id']}"
                )
                assert status == 200 and data["job_id"] == job["job_id"], data
    finally:
        conn.close()


def test_a_connection_with_pauses_between_requests_is_still_served(cluster):
    conn = connect(cluster)
    try:
        for pause in (0, 0.05, 0.3, 0):
            time.sleep(pause)
            status, data = get_json(conn, cluster, "/v1/workers/worker-1")
            assert status == 200 and data["name"] == "worker-1"
    finally:
        conn.close()


def read_response(reader) -> tuple[int, bytes]:
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, reader.read(length)


def test_pipelined_requests_are_answered_in_order(cluster):
    port = cluster.scheduler_info["http_port"]
    request = (
        "GET /v1/workers/{} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {cluster.token}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        # Both in one write: the second is read ahead with the first.
        s.sendall((request.format("worker-2") + request.format("worker-1")).encode())
        reader = s.makefile("rb")
        answers = [read_response(reader) for _ in range(2)]
    assert [status for status, _ in answers] == [200, 200]
    assert [json.loads(body)["name"] for _, body in answers] == ["worker-2", "worker-1"]


def test_many_busy_connections_are_all_served(cluster):
    # 48 connections that never pause, on two processes' event loops.
    def client(_):
        conn = connect(cluster)
        try:
            for _ in range(20):
                status, data = get_json(conn, cluster, "/v1/workers/worker-1")
                assert status == 200, data
        finally:
            conn.close()
        return True

    with ThreadPoolExecutor(48) as pool:
        assert all(pool.map(client, range(48)))
