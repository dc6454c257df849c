"""Draining workers for maintenance, on a live cluster of its own."""

from __future__ import annotations

import secrets
import time

import pytest
from conftest import Api, cluster_of_its_own
from test_lifecycle import wait_for

from jobgate.tokens import hash_token

# A drain with ?wait=true gives up after this long (202).
MAX_WAIT_S = 4


@pytest.fixture(scope="module")
def drain_cluster(scripts_dir):
    with cluster_of_its_own(
        "drain",
        scripts_dir,
        ("worker-1", "worker-2"),
        http_processes=2,
        scheduler_extra=f"max_wait_s = {MAX_WAIT_S}\nretry_after_s = 3\n",
    ) as c:
        yield c


@pytest.fixture
def api(drain_cluster):
    """The cluster's API; every worker is undrained after each test."""
    api = Api(drain_cluster)
    yield api
    for name in ("worker-1", "worker-2"):
        if drain_cluster.workers[name].running():
            api.post(f"/v1/workers/{name}/drain", {"enable": False})


def drain(api: Api, worker: str, query: str = "", body=None):
    return api.post(f"/v1/workers/{worker}/drain{query}", body)


def start(api: Api, worker: str, path: str, *args: str, query: str = ""):
    return api.post(
        f"/v1/workers/{worker}/jobs{query}",
        {"command": "bash", "path": path, "args": list(args)},
    )


def test_a_drained_worker_refuses_starts_and_lets_its_running_job_succeed(api):
    job = api.start("worker-1", "sleep.sh", ["2"])
    status, _, worker = drain(api, "worker-1")
    assert status == 200, worker
    assert worker["name"] == "worker-1" and worker["draining"] is True
    assert worker["degraded"].startswith("draining: asked by token dev at 20")
    assert worker["running_jobs"] == 1
    assert api.get("/v1/workers/worker-1")[2]["draining"] is True

    status, headers, refused = start(api, "worker-1", "hello.sh")
    assert status == 503, refused
    assert headers["Retry-After"] == "3"
    assert "worker 'worker-1' is drained" in refused["description"]
    assert "asked by token dev" in refused["description"]

    # ?wait=true answers once the running job has ended, and it succeeded.
    began = time.monotonic()
    status, _, worker = drain(api, "worker-1", "?wait=true")
    assert status == 200, worker
    assert (worker["draining"], worker["running_jobs"]) == (True, 0)
    assert time.monotonic() - began < MAX_WAIT_S
    status, _, ended = api.get(f"/v1/workers/worker-1/jobs/{job['job_id']}")
    assert (status, ended["state"], ended["exit_code"]) == (200, "succeeded", 0)

    # Lifted, the worker starts jobs again.
    status, _, worker = drain(api, "worker-1", body={"enable": False})
    assert status == 200, worker
    assert (worker["draining"], worker["degraded"]) == (False, None)
    status, _, done = start(api, "worker-1", "hello.sh", query="?wait=true")
    assert (status, done["state"]) == (201, "succeeded")


def test_a_drain_waits_at_most_max_wait_s_then_answers_202(api):
    job = api.start("worker-2", "sleep.sh", ["60"])
    try:
        began = time.monotonic()
        status, _, worker = drain(api, "worker-2", "?wait=true", {"enable": True})
        waited = time.monotonic() - began
        assert status == 202, worker
        assert (worker["draining"], worker["running_jobs"]) == (True, 1)
        assert MAX_WAIT_S - 0.5 <= waited < MAX_WAIT_S + 5
        status, _, running = api.get(f"/v1/workers/worker-2/jobs/{job['job_id']}")
        assert running["state"] == "running"
    finally:
        api.post(f"/v1/workers/worker-2/jobs/{job['job_id']}/stop")


def test_fanout_to_all_skips_a_drained_worker_and_says_why(api):
    assert drain(api, "worker-2")[0] == 200
    status, _, data = api.post(
        "/v1/jobs", {"all": True, "command": "bash", "path": "hello.sh"}
    )
    assert status == 201, data
    assert [j["worker_name"] for j in data["jobs"]] == ["worker-1"]
    [error] = data["errors"]
    assert (error["worker_name"], error["status"]) == ("worker-2", 503)
    assert "drained" in error["error"] and "asked by token dev" in error["error"]


def test_a_drain_survives_a_restart_of_the_worker(api, drain_cluster):
    status, _, before = drain(api, "worker-2")
    assert status == 200
    assert drain_cluster.workers["worker-2"].stop() == 0
    offline = api.get("/v1/workers/worker-2")[2]
    assert (offline["state"], offline["draining"]) == ("offline", True)

    drain_cluster.start_worker("worker-2")
    # Drained from its registration on, without a word from anyone.
    after = api.get("/v1/workers/worker-2")[2]
    assert (after["state"], after["draining"]) == ("online", True)
    assert after["degraded"] == before["degraded"]
    status, _, refused = start(api, "worker-2", "hello.sh")
    assert status == 503 and "drained" in refused["description"]

    assert drain(api, "worker-2", body={"enable": False})[0] == 200
    status, _, done = start(api, "worker-2", "hello.sh", query="?wait=true")
    assert (status, done["state"]) == (201, "succeeded")


def test_a_read_token_may_not_drain(api, drain_cluster):
    token = secrets.token_urlsafe(24)
    tokens = drain_cluster.dir / "tokens"
    original = tokens.read_text()
    tokens.write_text(original + f"{hash_token(token)} reader read\n")
    try:
        for body in (None, {"enable": False}):
            status, _, data = api.post("/v1/workers/worker-1/drain", body, token=token)
            assert status == 403, data
            assert "scope run" in data["description"]
        assert api.get("/v1/workers/worker-1", token=token)[2]["draining"] is False
    finally:
        tokens.write_text(original)


@pytest.mark.parametrize(
    ("query", "body", "status", "needle"),
    [
        ("", {"enable": "yes"}, 400, "enable"),
        ("", {"enabled": False}, 400, "enabled: unknown field"),
        ("", [True], 400, "JSON object"),
        ("?wait=true", {"enable": False}, 400, "wait: only with a drain"),
        ("?wait=maybe", None, 400, "wait"),
    ],
)
def test_bad_drain_requests_are_400_saying_what_to_fix(
    api, query, body, status, needle
):
    got, _, data = drain(api, "worker-1", query, body)
    assert (got, needle in data["description"]) == (status, True), data
    assert api.get("/v1/workers/worker-1")[2]["draining"] is False


def test_draining_an_unknown_or_offline_worker_is_refused(api, drain_cluster):
    status, _, data = drain(api, "worker-9")
    assert status == 404 and "worker-9" in data["description"]
    drain_cluster.workers["worker-2"].stop()
    try:
        status, _, data = drain(api, "worker-2")
        assert status == 503 and "offline" in data["description"]
    finally:
        drain_cluster.start_worker("worker-2")
    assert wait_for(lambda: api.get("/v1/workers/worker-2")[2]["state"] == "online")
    assert api.get("/v1/workers/worker-2")[2]["draining"] is False


def test_a_retry_with_an_idempotency_key_gets_its_job_from_a_drained_worker(api):
    body = {"command": "bash", "path": "hello.sh", "idempotency_key": "retry-1"}
    status, _, first = api.post("/v1/workers/worker-2/jobs", body)
    assert status == 201, first
    assert drain(api, "worker-2")[0] == 200
    # The same request again: the job the worker already has, not a refusal.
    status, _, again = api.post("/v1/workers/worker-2/jobs", body)
    assert (status, again["job_id"]) == (200, first["job_id"]), again
    # A new key is refused by the worker itself, naming the drain.
    status, _, refused = api.post(
        "/v1/workers/worker-2/jobs", {**body, "idempotency_key": "retry-2"}
    )
    assert status == 503 and "drain" in refused["description"], refused
