"""Token scopes and tokens-file reloads against the live cluster."""

from __future__ import annotations

import http.client
import os
import secrets
import signal
import threading
import time

import pytest

from jobgate.tokens import hash_token


@pytest.fixture
def extra_token(cluster):
    """Adds tokens to the cluster's tokens file; restores the file afterwards."""
    path = cluster.dir / "tokens"
    original = path.read_text()

    def add(scope: str, name: str = "extra") -> str:
        token = secrets.token_urlsafe(24)
        with path.open("a") as f:
            f.write(f"{hash_token(token)} {name} {scope}\n")
        return token

    yield add
    path.write_text(original)


def remove_token_lines(cluster, name: str) -> None:
    path = cluster.dir / "tokens"
    kept = [ln for ln in path.read_text().splitlines() if f" {name} " not in ln]
    path.write_text("\n".join(kept) + "\n")


def test_read_token_reads_but_cannot_start_or_stop(api, extra_token):
    token = extra_token("read", "reader")
    assert api.get("/v1/workers", token=token)[0] == 200
    job = api.start("worker-1", "sleep.sh", ["300"])
    status, _, data = api.get(f"/v1/workers/worker-1/jobs/{job['job_id']}", token=token)
    assert status == 200
    for method, path, body in [
        ("POST", "/v1/workers/worker-1/jobs", {"command": "bash", "path": "hello.sh"}),
        ("POST", f"/v1/workers/worker-1/jobs/{job['job_id']}/stop", None),
        ("POST", "/v1/jobs", {"all": True, "command": "bash", "path": "hello.sh"}),
        (
            "POST",
            "/start",
            {"worker_id": "worker-1", "command": "bash", "path": "hello.sh"},
        ),
        ("POST", "/stop", {"worker_id": "worker-1", "job_id": job["job_id"]}),
    ]:
        status, _, data = api.call(method, path, body, token=token)
        assert status == 403, (path, data)
        assert "scope run" in data["description"]
    # The original API's read routes are open to it.
    status, _, data = api.post(
        "/query", {"worker_id": "worker-1", "job_id": job["job_id"]}, token=token
    )
    assert (status, data["done"]) == (200, False)
    # The job is still running: nothing was stopped by the read token.
    status, _, stopped = api.post(f"/v1/workers/worker-1/jobs/{job['job_id']}/stop")
    assert stopped["stopped_by"] == "token dev"


def test_added_token_works_at_once_and_removed_token_stops_at_once(
    api, cluster, extra_token
):
    token = extra_token("run", "temp")
    assert api.get("/v1/workers", token=token)[0] == 200
    remove_token_lines(cluster, "temp")
    status, _, _ = api.get("/v1/workers", token=token)
    assert status == 401
    assert api.get("/v1/workers")[0] == 200  # the others still work


def test_removed_token_ends_an_open_stream(api, cluster, extra_token):
    token = extra_token("read", "streamer")
    job = api.start("worker-2", "sleep.sh", ["300"])
    conn = http.client.HTTPConnection(
        "127.0.0.1", cluster.scheduler_info["http_port"], timeout=30
    )
    conn.request(
        "GET",
        f"/v1/workers/worker-2/jobs/{job['job_id']}/output?follow=true",
        headers={"Authorization": f"Bearer {token}"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read1(100) == b"sleeping\n"
    ended = threading.Event()
    received = []

    def drain():
        try:
            while chunk := resp.read1(100):
                received.append(chunk)
        except (http.client.HTTPException, OSError):
            pass
        ended.set()

    threading.Thread(target=drain, daemon=True).start()
    time.sleep(0.5)
    assert not ended.is_set()  # the job is quiet; the stream stays open
    removed_at = time.monotonic()
    remove_token_lines(cluster, "streamer")
    assert ended.wait(10), "the stream stayed open after its token was removed"
    assert time.monotonic() - removed_at < 5
    assert received == []
    conn.close()
    api.post(f"/v1/workers/worker-2/jobs/{job['job_id']}/stop")


def test_broken_tokens_file_fails_closed_until_fixed(api, cluster):
    path = cluster.dir / "tokens"
    original = path.read_text()
    try:
        path.write_text(original + "this is not a token line\n")
        status, _, data = api.get("/v1/workers")
        assert status == 401, data
        status, _, data = api.get("/readyz")
        assert status == 503
        assert any("tokens" in p and "not a token" not in p for p in data["problems"])
    finally:
        path.write_text(original)
    assert api.get("/v1/workers")[0] == 200
    assert api.get("/readyz")[0] == 200


def test_removed_tokens_file_fails_closed_also_after_sighup(api, cluster):
    path = cluster.dir / "tokens"
    original = path.read_text()
    try:
        path.unlink()
        os.kill(cluster.scheduler.pid, signal.SIGHUP)
        status, _, data = api.get("/v1/workers")
        assert status == 401, data
        status, _, data = api.get("/readyz")
        assert status == 503
        assert any("tokens file" in p for p in data["problems"]), data
    finally:
        path.write_text(original)
    assert api.get("/v1/workers")[0] == 200
