"""The HTTP API against a live cluster: real gunicorn, real workers, real TLS."""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import re
import time
import uuid

import pytest

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def wait_state(api, worker, job_id, timeout=15.0):
    """Follow the job's output to its end, then return its status."""
    api.output(worker, job_id)
    status, _, job = api.get(f"/v1/workers/{worker}/jobs/{job_id}")
    assert status == 200
    return job


# -- workers -------------------------------------------------------------------


def test_workers_lists_both_online(api):
    status, _, data = api.get("/v1/workers")
    assert status == 200
    workers = {w["name"]: w for w in data["workers"]}
    assert {"worker-1", "worker-2"} <= set(workers)
    for w in workers.values():
        if w["name"] in ("worker-1", "worker-2"):
            assert w["state"] == "online"
            assert UUID_RE.match(w["id"])
            assert w["address"].startswith("127.0.0.1:")
            assert w["registered_at"].endswith("Z")
            assert set(w) >= {
                "id",
                "name",
                "address",
                "state",
                "labels",
                "registered_at",
                "last_seen_at",
                "running_jobs",
            }


def test_worker_found_by_name_and_by_id(api):
    _, _, by_name = api.get("/v1/workers/worker-1")
    status, _, by_id = api.get(f"/v1/workers/{by_name['id']}")
    assert status == 200
    assert by_id["name"] == "worker-1"
    assert by_id["id"] == by_name["id"]


def test_unknown_worker_is_404_with_description(api):
    status, _, data = api.get("/v1/workers/no-such-worker")
    assert status == 404
    assert "no-such-worker" in data["description"]
    status, _, data = api.post(
        "/v1/workers/no-such-worker/jobs", {"command": "bash", "path": "hello.sh"}
    )
    assert status == 404


# -- starting and inspecting jobs ----------------------------------------------


def test_start_returns_201_location_and_runs_script(api):
    status, headers, job = api.post(
        "/v1/workers/worker-1/jobs",
        {"command": "bash", "path": "hello.sh", "args": ["a b", "c"]},
    )
    assert status == 201
    assert UUID_RE.match(job["job_id"])
    assert headers["Location"] == f"/v1/workers/{job['worker_id']}/jobs/{job['job_id']}"
    assert job["state"] == "running" or job["state"] == "succeeded"
    out = api.output("worker-1", job["job_id"])
    assert out == b"hello from worker-1\narg: a b\narg: c\n"
    final = wait_state(api, "worker-1", job["job_id"])
    assert final["state"] == "succeeded"
    assert final["exit_code"] == 0
    assert final["signal"] is None
    assert final["output_bytes"] == len(out)
    assert final["ended_at"] >= final["started_at"]
    assert final["args"] == ["a b", "c"]


def test_failed_job_reports_exit_code_and_merged_output(api):
    job = api.start("worker-2", "mixed.sh", ["3"])
    out = api.output("worker-2", job["job_id"])
    assert out == b"out 1\nerr 1\nout 2\nerr 2\n"
    final = wait_state(api, "worker-2", job["job_id"])
    assert final["state"] == "failed"
    assert final["exit_code"] == 3
    assert "3" in final["reason"]


def test_list_jobs_newest_first(api):
    first = api.start("worker-2", "hello.sh")
    second = api.start("worker-2", "hello.sh")
    status, _, data = api.get("/v1/workers/worker-2/jobs")
    assert status == 200
    ids = [j["job_id"] for j in data["jobs"]]
    assert ids.index(second["job_id"]) < ids.index(first["job_id"])


def test_idempotency_key_returns_original_job(api):
    key = str(uuid.uuid4())
    body = {"command": "bash", "path": "hello.sh", "idempotency_key": key}
    s1, _, j1 = api.post("/v1/workers/worker-1/jobs", body)
    s2, _, j2 = api.post("/v1/workers/worker-1/jobs", body)
    assert (s1, s2) == (201, 200)
    assert j1["job_id"] == j2["job_id"]


def test_unknown_job_is_404(api):
    status, _, data = api.get(f"/v1/workers/worker-1/jobs/{uuid.uuid4()}")
    assert status == 404
    assert data["title"] and data["description"]
    status, _, _ = api.get(f"/v1/workers/worker-1/jobs/{uuid.uuid4()}/output")
    assert status == 404
    status, _, _ = api.post(f"/v1/workers/worker-1/jobs/{uuid.uuid4()}/stop")
    assert status == 404


# -- stop --------------------------------------------------------------------


def test_stop_running_job_then_stop_again_is_unchanged(api):
    job = api.start("worker-1", "sleep.sh", ["300"])
    status, _, stopped = api.post(f"/v1/workers/worker-1/jobs/{job['job_id']}/stop")
    assert status == 200
    assert stopped["state"] == "stopped"
    assert stopped["signal"] == 15
    assert stopped["ended_at"] is not None
    status, _, again = api.post(f"/v1/workers/worker-1/jobs/{job['job_id']}/stop")
    assert status == 200
    assert again == stopped


# -- output ------------------------------------------------------------------


def test_output_offset_and_non_follow(api):
    job = api.start("worker-1", "count.sh", ["5", "0"])
    full = api.output("worker-1", job["job_id"])
    assert full == b"1\n2\n3\n4\n5\n"
    assert api.output("worker-1", job["job_id"], "offset=4") == full[4:]
    assert api.output("worker-1", job["job_id"], "offset=100") == b""
    assert api.output("worker-1", job["job_id"], "follow=false") == full


def test_output_is_chunked_text_and_follows_live(api, cluster):
    job = api.start("worker-2", "count.sh", ["3", "0.3"])
    conn = http.client.HTTPConnection(
        "127.0.0.1", cluster.scheduler_info["http_port"], timeout=30
    )
    conn.request(
        "GET",
        f"/v1/workers/worker-2/jobs/{job['job_id']}/output?follow=true",
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.getheader("Content-Type").startswith("text/plain")
    first = resp.read1(100)
    # The first line arrives while the job is still running.
    _, _, status = cluster.request("GET", f"/v1/workers/worker-2/jobs/{job['job_id']}")
    assert json.loads(status)["state"] == "running"
    rest = resp.read()
    conn.close()
    assert first + rest == b"1\n2\n3\n"


def test_binary_output_passes_byte_exact(api):
    job = api.start("worker-1", "binary.sh")
    out = api.output("worker-1", job["job_id"])
    assert out == bytes(range(256)) + b"\xff\xfe\xc3\x28"


def test_many_concurrent_followers_get_identical_bytes(api):
    job = api.start("worker-1", "big.sh", ["20000"])  # 2 MB
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        outs = list(
            pool.map(lambda _: api.output("worker-1", job["job_id"]), range(12))
        )
    expected = (b"0" * 99 + b"\n") * 20000
    digests = {hashlib.sha256(o).hexdigest() for o in outs}
    assert digests == {hashlib.sha256(expected).hexdigest()}


def test_follower_ends_when_job_is_stopped(api):
    job = api.start("worker-2", "sleep.sh", ["300"])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(api.output, "worker-2", job["job_id"])
        time.sleep(0.3)
        api.post(f"/v1/workers/worker-2/jobs/{job['job_id']}/stop")
        assert fut.result(timeout=15) == b"sleeping\n"


# -- the original API ------------------------------------------------------------


def test_legacy_start_query_stream_stop(api, cluster):
    worker_id = api.get("/v1/workers/worker-1")[2]["id"]
    status, _, data = api.post(
        "/start", {"worker_id": worker_id, "path": "mixed.sh", "command": "bash"}
    )
    assert status == 201
    assert set(data) == {"job_id"}
    job_id = data["job_id"]
    status, _, out = api.post("/stream", {"worker_id": worker_id, "job_id": job_id})
    assert status == 200
    assert out == b"out 1\nerr 1\nout 2\nerr 2\n"
    status, _, q = api.post("/query", {"worker_id": worker_id, "job_id": job_id})
    assert status == 200
    assert q == {"done": True, "error": False, "error_text": ""}

    status, _, data = api.post(
        "/start", {"worker_id": "worker-1", "path": "sleep.sh", "command": "bash"}
    )
    job_id = data["job_id"]
    status, _, q = api.post("/query", {"worker_id": "worker-1", "job_id": job_id})
    assert q == {"done": False, "error": False, "error_text": ""}
    status, _, s = api.post("/stop", {"worker_id": "worker-1", "job_id": job_id})
    assert (status, s) == (200, {"success": True})
    status, _, q = api.post("/query", {"worker_id": "worker-1", "job_id": job_id})
    assert q["done"] is True and q["error"] is True and q["error_text"]


def test_legacy_query_reports_failure(api):
    status, _, data = api.post(
        "/start", {"worker_id": "worker-2", "path": "fail.sh", "command": "bash"}
    )
    # fail.sh is not in the test scripts: a clear 400, nothing run.
    assert status == 400
    status, _, data = api.post(
        "/start", {"worker_id": "worker-2", "path": "mixed.sh", "command": "bash"}
    )
    job_id = data["job_id"]
    api.post("/stream", {"worker_id": "worker-2", "job_id": job_id})
    _, _, q = api.post("/query", {"worker_id": "worker-2", "job_id": job_id})
    assert q["done"] is True
    assert q["error"] is False


@pytest.mark.parametrize("route", ["/start", "/stop", "/query", "/stream"])
def test_legacy_routes_reject_bad_bodies(api, route):
    status, _, data = api.post(route, b"{not json")
    assert status == 400
    assert "JSON" in data["description"]
    status, _, data = api.post(route, {"worker_id": 5})
    assert status == 400
    assert "worker_id" in data["description"]
    status, _, data = api.post(
        route,
        {"worker_id": "nope", "job_id": "x", "path": "hello.sh", "command": "bash"},
    )
    assert status == 404


# -- authentication --------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/workers"),
        ("GET", "/v1/workers/worker-1"),
        ("POST", "/v1/workers/worker-1/jobs"),
        ("GET", "/v1/workers/worker-1/jobs"),
        ("GET", "/v1/workers/worker-1/jobs/x"),
        ("POST", "/v1/workers/worker-1/jobs/x/stop"),
        ("GET", "/v1/workers/worker-1/jobs/x/output"),
        ("POST", "/start"),
        ("POST", "/stop"),
        ("POST", "/query"),
        ("POST", "/stream"),
    ],
)
def test_every_route_needs_a_token(api, method, path):
    status, headers, _ = api.call(method, path, token="")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = api.call(method, path, token="wrong-token-wrong-token")
    assert status == 401


def test_health_routes_are_open(api):
    status, _, data = api.get("/healthz", token="")
    assert (status, data["status"]) == (200, "ok")
    status, _, data = api.get("/readyz", token="")
    assert (status, data["status"]) == (200, "ready")


# -- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,field",
    [
        ({"path": "hello.sh"}, "command"),
        ({"command": "bash"}, "path"),
        ({"command": 1, "path": "hello.sh"}, "command"),
        ({"command": "bash", "path": "hello.sh", "args": "x"}, "args"),
        ({"command": "bash", "path": "hello.sh", "args": [1]}, "args[0]"),
        ({"command": "bash", "path": "hello.sh", "timeout_s": "5"}, "timeout_s"),
        ({"command": "bash", "path": "hello.sh", "timeout_s": -1}, "timeout_s"),
        ({"command": "bash", "path": "hello.sh", "arg": []}, "arg"),
    ],
)
def test_start_rejects_bad_fields_naming_them(api, body, field):
    status, _, data = api.post("/v1/workers/worker-1/jobs", body)
    assert status == 400, data
    assert data["description"].startswith(field)


def test_start_rejects_malformed_and_oversized_bodies(api):
    assert api.post("/v1/workers/worker-1/jobs", b"[1, 2]")[0] == 400
    assert api.post("/v1/workers/worker-1/jobs", b"")[0] == 400
    assert api.post("/v1/workers/worker-1/jobs", b"\xff\xfe")[0] == 400
    big = {"command": "bash", "path": "hello.sh", "args": ["x" * 100_000]}
    status, _, data = api.post("/v1/workers/worker-1/jobs", big)
    assert status == 413
    assert "limit" in data["description"]


@pytest.mark.parametrize(
    "path",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "sub/../../x.sh",
        "./../hello.sh",
    ],
)
def test_script_outside_scripts_dir_is_403_and_nothing_runs(api, path):
    before = len(api.get("/v1/workers/worker-1/jobs")[2]["jobs"])
    status, _, data = api.post(
        "/v1/workers/worker-1/jobs", {"command": "bash", "path": path}
    )
    assert status == 403
    assert "scripts directory" in data["description"]
    assert len(api.get("/v1/workers/worker-1/jobs")[2]["jobs"]) == before


def test_command_not_allowed_is_403(api):
    status, _, data = api.post(
        "/v1/workers/worker-1/jobs", {"command": "python3", "path": "hello.sh"}
    )
    assert status == 403
    assert "python3" in data["description"] and "allowed" in data["description"]


def test_missing_script_is_400(api):
    status, _, data = api.post(
        "/v1/workers/worker-1/jobs", {"command": "bash", "path": "nope.sh"}
    )
    assert status == 400
    assert "nope.sh" in data["description"]


def test_bad_query_parameters_are_400(api):
    job = api.start("worker-1", "hello.sh")
    base = f"/v1/workers/worker-1/jobs/{job['job_id']}/output"
    assert api.get(base + "?offset=-1")[0] == 400
    assert api.get(base + "?offset=abc")[0] == 400
    assert api.get(base + "?follow=maybe")[0] == 400


def test_unknown_route_and_method(api):
    assert api.get("/v1/nothing")[0] == 404
    assert api.call("DELETE", "/v1/workers")[0] == 405


def established_connections_to(port: int) -> int:
    """Established TCP connections whose server side is local ``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":
                count += 1
    return count


def test_scheduler_reuses_one_channel_per_worker_per_process(api, cluster):
    port = cluster.worker_info["worker-2"]["grpc_port"]
    for _ in range(30):
        assert api.get("/v1/workers/worker-2/jobs")[0] == 200
    # Two gunicorn processes, each with at most one channel to worker-2.
    assert 1 <= established_connections_to(port) <= 2
